"""Predict with one checkpoint or an ensemble; write a competition submission.

    python inference.py                                   # runs/*/best.pt on the demo test set
    python inference.py --checkpoints "runs/*-fold*" --tta --tta-vflip --tta-scales 0.75 1.0 1.25
    python inference.py --json val.json --eval            # score a labelled json
    python inference.py --oof "runs/*-fold*"              # out-of-fold mIoU of k-fold runs
    python inference.py --json val.json --eval --report reports/val   # charts and the worst images
    python inference.py --checkpoints runs/demo --images photos/ --save-vis vis/   # photos; a CSV only with --output
    python inference.py --images big_photo.jpg --tile 512 --save-masks masks/     # huge photos, window by window
    python inference.py --checkpoints runs/demo --images pool/ --rank-uncertain 50 --output to_label.csv  # label next
    python inference.py --checkpoints runs/demo --video clip.mp4 --save-vis overlay.mp4 --save-shares shares.csv
    python inference.py --checkpoints runs/demo --video 0 --every 3 --smooth 0.8 --save-vis camera.mp4   # a camera

Each checkpoint describes itself (model, encoder, classes, image size,
normalisation), so nothing else is needed. ONNX files written by export.py work
wherever a checkpoint does (run with onnxruntime; ensembles may mix both). Softmax probabilities are averaged
over test-time augmentations and over checkpoints; they are resized to the photo a band of rows at a time, so
a huge photo never holds its probabilities whole (or window by window with --tile).
"""
import argparse
import collections
import csv
import os

import cv2
import numpy as np
import torch

import coco_utils
import dataset as data
import ensemble as ensembles
import images as imaging
import utils
import video

DEFAULT_JSON = "test.json"  # of --data-root, when neither --json nor --images nor --video is given


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    ensembles.add_ensemble_args(p)
    p.add_argument("--json", default=None, help=f"images to predict, relative to --data-root (default {DEFAULT_JSON})")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="predict these image files, folders (recursively) and globs instead of a json; "
                        "unreadable files are skipped and counted")
    p.add_argument("--output", default=None,
                   help="submission CSV path (written atomically); default submission.csv for a --json, none for "
                        "--images (pass one to get a CSV of the photos too); with --rank-uncertain, the ranking's CSV")
    p.add_argument("--eval", action="store_true", help="the json is labelled: print mIoU and per-class IoU")
    p.add_argument("--oof", default=None, metavar="RUN_GLOB",
                   help="out-of-fold report: each fold run predicts its own val images, scored as one dataset")
    p.add_argument("--paint-order", choices=coco_utils.PAINT_ORDERS, default=None,
                   help="overlap rule of the ground truth for --eval and --oof (default: the checkpoints' training's)")
    p.add_argument("--save-masks", default=None,
                   help="folder for paletted PNG label maps <stem>.png, at each photo's size as displayed")
    p.add_argument("--save-vis", default=None,
                   help="folder for image | prediction overlay panels <stem>.png; with --video, the overlay video "
                        "(.mp4 or .avi) with a legend of the classes' colours")
    p.add_argument("--vote", choices=ensembles.VOTES, default="soft",
                   help="ensemble vote: soft averages probabilities; hard takes each pixel's majority class "
                        "(ties go to the highest mean probability)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="with --eval or --oof: write the evaluation report (charts, report.json, index.html) here")
    p.add_argument("--report-worst", type=int, default=12, metavar="K", help="worst images shown in the report")
    p.add_argument("--rank-uncertain", type=utils.positive_int, default=None, metavar="N",
                   help="what to label next: write the N photos the model is least sure of to --output (a CSV: rank, "
                        "file_name, path, score, then per class the share of the photo's pixels predicted as that "
                        "class and uncertain), a COCO json of them without annotations (same stem, .json) and a "
                        "contact sheet (same stem, .png); no submission. Score: the mean over the photo's pixels of "
                        "1 - (p1 - p2), the gap between the two most probable classes (after the ensemble's vote and "
                        f"TTA); a pixel is uncertain above {UNCERTAIN_ABOVE}")
    p.add_argument("--duplicate-distance", type=hash_distance, default=6, metavar="BITS",
                   help="with --rank-uncertain, skip a photo whose 64-bit difference hash is within BITS bits of an "
                        "already chosen photo's (near-duplicates such as video frames of one scene); 0: only equal "
                        "hashes")
    p.add_argument("--video", default=None, metavar="PATH|CAMERA",
                   help="label a video file's frames, or a camera's (its index, 0 for the first) until Ctrl-C, which "
                        "stops cleanly with what was written valid; outputs: --save-vis VIDEO, --save-shares CSV")
    p.add_argument("--every", type=utils.positive_int, default=1, metavar="N",
                   help="with --video, predict every N-th frame; the overlay shows the last prediction in between")
    p.add_argument("--smooth", type=video.smoothing_weight, default=0.0, metavar="ALPHA",
                   help="with --video, average the class probabilities over the predicted frames: p = ALPHA * "
                        "p_previous + (1 - ALPHA) * p_frame (0: off; 0.8 steadies flickering labels), restarted at a "
                        "scene cut")
    p.add_argument("--scene-cut", type=utils.positive_float, default=video.SCENE_CUT, metavar="LEVELS",
                   help="with --smooth, a frame whose 32x32 grey thumbnail differs from the previous frame's by more "
                        "than LEVELS grey levels (0-255) on average starts a new scene")
    p.add_argument("--save-shares", default=None, metavar="CSV",
                   help="with --video, a CSV row per predicted frame: frame, time_s (frame / fps), then per class the "
                        "share of the frame's pixels it covers")
    return p


def eval_paint_order(ensemble, paths, override=None):
    """The overlap rule to paint the ground truth with: --paint-order, else the members' training's.

    Members trained with different rules are named, and the first one's rule is used.
    """
    if override:
        return override
    orders = [member.paint_order for member in ensemble.members]
    if len(set(orders)) > 1:
        print("warning: the ensemble's members were trained with different paint orders ("
              + ", ".join(f"{path}: {order}" for path, order in zip(paths, orders))
              + f"); the ground truth is painted with {orders[0]}; choose with --paint-order")
    return orders[0]


# ---------------------------------------------------------------- outputs
def submission_path(args):
    """Where the CSV goes (None: nowhere), after refusing outputs that could not be written, before any work.

    With --images the CSV is written only when --output is given: a 256 x 256 row per photo is
    rarely wanted for a folder of photos.
    """
    output = args.output or (None if args.images else "submission.csv")
    if output:
        refuse_folder("--output", output, "submission.csv")
    for flag, folder in (("--save-masks", args.save_masks), ("--save-vis", args.save_vis)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise utils.UserError(f"{flag} {folder} is a file, not a folder: pass a folder to write the PNGs into")
    if not (output or args.save_masks or args.save_vis):
        raise utils.UserError("--images alone writes nothing: add --save-masks DIR, --save-vis DIR or --output CSV")
    return output


def refuse_folder(flag, output, example):
    if os.path.isdir(output):
        raise utils.UserError(f"{flag} {output} is a folder: pass the CSV file's path, e.g. "
                              f"{os.path.join(output, example)}")


def check_unique_file_names(json_path, images):
    """A file_name listed under two image ids would give the CSV two rows of one image_id."""
    first_id = {}
    for image in images:
        name = image["file_name"]
        if name in first_id:
            raise utils.UserError(f"{json_path} lists {name} under image ids {first_id[name]} and {image['id']}: "
                                  f"the submission has one row per file name; remove or rename one of them")
        first_id[name] = image["id"]


def report_written(args, output, count, skipped):
    """One line for each output written: the CSV, the masks, the panels; then the unreadable files."""
    if output:
        print(f"wrote {output} ({count} images)")
    if args.save_masks:
        print(f"wrote {count} masks to {args.save_masks}")
    if args.save_vis:
        print(f"wrote {count} overlays to {args.save_vis}")
    if skipped:
        print(f"{skipped} unreadable file(s) skipped")


def save_outputs(args, info, image_path, mask, class_names):
    """<stem>.png label map and overlay panel, at the photo's size as displayed (the reader applies EXIF);
    the panel is titled with the photo and the checkpoints, and a legend names the classes' colours."""
    stem = data.output_name(info["file_name"])
    if args.save_masks:
        utils.atomic_write_png(os.path.join(args.save_masks, stem), mask,
                               palette=utils.label_palette(len(class_names)))
    if args.save_vis:
        rgb = imaging.read_image(image_path, max_pixels=args.max_image_pixels)
        title = f"{info['file_name']} | {' + '.join(ensembles.expand_checkpoints(args.checkpoints))}"
        panel = utils.explained_panel(rgb, [mask], class_names, title)
        utils.atomic_write_png(os.path.join(args.save_vis, stem), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))


def new_report(args, class_names):
    """The evaluation report's accumulator, or None without --report."""
    if not args.report:
        return None
    if not (args.eval or args.oof):
        raise utils.UserError("--report scores predictions: add --eval (with a labelled --json) or use --oof")
    if args.report_worst < 0:
        raise utils.UserError(f"--report-worst must be 0 or more, not {args.report_worst}")
    import report  # matplotlib is loaded only when a report is asked for

    return report.EvalReport(class_names, args.report_worst)


def finish_report(args, accumulator, title):
    if accumulator is not None:
        print("wrote " + accumulator.write(args.report, title))


def oof_checkpoints(pattern):
    """{fold: (path, checkpoint)} of the --oof runs, checked before any prediction: each trained with --fold,
    all on one k-fold split, each fold once."""
    runs, split, first = {}, None, None
    for path in ensembles.expand_checkpoints([pattern]):
        checkpoint = utils.load_checkpoint(path, required_keys=utils.MODEL_KEYS + ("args",))
        run = checkpoint["args"]
        if run.get("fold") is None:
            raise utils.UserError(f"--oof {pattern}: {path} was not trained with --fold: pass the runs of train.py "
                                  f"--fold K (e.g. --oof 'runs/*-fold*'), or score this one with --eval")
        run_split = (os.path.realpath(os.path.join(run["data_root"], run["all_json"])), run["n_folds"], run["fold_seed"])
        if split is None:
            split, first = run_split, path
        elif run_split != split:
            raise utils.UserError(f"--oof {pattern}: {path} splits {split_text(run_split)}, {first} splits "
                                  f"{split_text(split)}: pass the runs of one split (same --all-json, --n-folds and "
                                  f"--fold-seed)")
        if run["fold"] in runs:
            raise utils.UserError(f"--oof {pattern}: fold {run['fold']} appears twice, in {runs[run['fold']][0]} and "
                                  f"{path}: pass one run per fold")
        runs[run["fold"]] = path, checkpoint
    return runs


def split_text(split):
    json_path, n_folds, fold_seed = split
    return f"{json_path} into {n_folds} folds (seed {fold_seed})"


def run_oof(args):
    """Each fold's checkpoint predicts its own val images; one confusion matrix over all folds."""
    transforms = ensembles.build_tta(args)
    confusion, first_order, accumulator = None, None, None
    runs = oof_checkpoints(args.oof)
    for path, checkpoint in runs.values():
        run = checkpoint["args"]
        ensemble, class_names = ensembles.build_ensemble([path], [checkpoint], args.device, transforms,
                                                         tiling=ensembles.build_tiling(args))
        coco = coco_utils.Coco(os.path.join(run["data_root"], run["all_json"]), run["data_root"])
        _, val_ids = data.fold_image_ids(coco, run["fold"], run["n_folds"], run["fold_seed"])
        paint_order = eval_paint_order(ensemble, [path], args.paint_order)
        first_order = first_order or paint_order
        if paint_order != first_order:
            print(f"warning: fold {run['fold']} paints the ground truth with {paint_order}, an earlier fold "
                  f"with {first_order}: the folds were trained differently; choose one with --paint-order")
        dataset = data.SegmentationDataset(run["data_root"], run["all_json"], "val", ensembles.image_tensor_transform(),
                                           paint_order=paint_order, image_ids=val_ids,
                                           max_pixels=args.max_image_pixels)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                             collate_fn=data.collate_mixed)
        fold_confusion = utils.ConfusionMatrix(len(class_names), device=args.device)
        accumulator = accumulator or new_report(args, class_names)
        for index, pred in ensembles.predict(ensemble, loader, args.device, args.amp):
            target = dataset.label_mask(index)
            fold_confusion.update(torch.from_numpy(target), pred)
            if accumulator is not None:
                info = dataset.images[index]
                accumulator.add(info, target, pred.cpu().numpy(), dataset.coco.image_path(info))
        print(f"fold {run['fold']}: mIoU {fold_confusion.compute()['miou']:.4f} on {len(dataset)} images")
        confusion = fold_confusion.mat if confusion is None else confusion + fold_confusion.mat
    missing = sorted(set(range(run["n_folds"])) - set(runs))
    scores = utils.scores_from_confusion(confusion.cpu().numpy())
    print(f"out-of-fold over folds {sorted(runs)}" + (f" (missing folds {missing})" if missing else ""))
    print(utils.format_iou_table(class_names, scores))
    finish_report(args, accumulator, f"Out-of-fold evaluation: {args.oof}")
    return scores


def open_images(args, ensemble, class_names):
    """(dataset, its image-path function): the --images files and folders, or the --json's images."""
    if args.images:
        if args.eval:
            raise utils.UserError("--eval needs labels: use --json with a labelled json instead of --images")
        dataset = data.ImageFolderDataset(args.images, ensembles.image_tensor_transform(),
                                          max_pixels=args.max_image_pixels)
        return dataset, dataset.image_path
    args.data_root = ensembles.run_data_root(args.data_root, [member.data_root for member in ensemble.members])
    data.prepare_data_root(args.data_root)
    json_name = args.json or DEFAULT_JSON
    coco_utils.require_json(args.data_root, json_name, "--json")
    mode = "val" if args.eval else "test"
    paint_order = eval_paint_order(ensemble, ensembles.expand_checkpoints(args.checkpoints), args.paint_order) \
        if args.eval else "area"
    dataset = data.SegmentationDataset(args.data_root, json_name, mode, transform=ensembles.image_tensor_transform(),
                                       paint_order=paint_order, max_pixels=args.max_image_pixels)
    dataset.coco.report_notes()
    check_unique_file_names(dataset.coco.path, dataset.images)
    if args.save_masks or args.save_vis:
        data.check_unique_stems(image["file_name"] for image in dataset.images)
    coco_utils.check_same_classes(dataset.coco.path, dataset.class_names, "the checkpoints", class_names,
                            fix="pass the --data-root and --json of images labelled with the checkpoints' classes")
    return dataset, dataset.coco.image_path


# ---------------------------------------------------------------- what to label next (--rank-uncertain)
UNCERTAIN_ABOVE = 0.5  # a pixel whose two most probable classes are less than 0.5 apart is uncertain
HASH_BITS = 64  # of a difference hash: 8 rows of 8 comparisons
SHEET_PHOTOS = 60  # the contact sheet shows the first 60 photos of a longer ranking
THUMBNAIL_SIDE = 256  # the longer side of a contact sheet's photo, in pixels


def hash_distance(text):
    """argparse type: a number of bits, 0 to HASH_BITS."""
    value = utils.non_negative_int(text)
    if value > HASH_BITS:
        raise argparse.ArgumentTypeError(f"must be at most {HASH_BITS} (the bits of a difference hash), got {value}")
    return value


def uncertainty_sums(probs):
    """C x H x W probabilities -> 1 x (1 + 2C) float64 sums over the pixels, on the CPU: of the uncertainty
    1 - (p1 - p2), then per class of the pixels predicted as it, then of those of them that are uncertain.

    A margin rather than entropy: it says how close each pixel's label is to flipping, the decision a
    labeller corrects, and lies in [0, 1] whatever the number of classes (entropy also grows with
    probability spread over classes no one doubts). Sums rather than maps: predict() joins a photo's
    bands of rows row-wise, so a photo gives a bands x (1 + 2C) table whose column sums are its own,
    and no per-pixel map of a photo is ever kept.
    """
    top, labels = probs.topk(2, dim=0)
    uncertainty = (1 - (top[0] - top[1])).flatten()
    labels, num_classes = labels[0].flatten(), probs.shape[0]
    predicted = torch.bincount(labels, minlength=num_classes)
    uncertain = torch.bincount(labels[uncertainty > UNCERTAIN_ABOVE], minlength=num_classes)
    return torch.cat([sums.cpu().double() for sums in (uncertainty.sum()[None], predicted, uncertain)])[None]


def photo_uncertainty(sums, num_classes):
    """A photo's uncertainty_sums (any number of rows) -> (mean uncertainty, per class the share of its pixels
    predicted as that class and uncertain)."""
    totals = sums.sum(0)
    pixels = totals[1:1 + num_classes].sum()
    return (totals[0] / pixels).item(), (totals[1 + num_classes:] / pixels).tolist()


def difference_hash(rgb):
    """64-bit dHash: is each pixel of a 9 x 8 grey thumbnail brighter than its left neighbour. Photos of one
    scene (video frames, resized or recompressed copies) differ in a few bits, other photos in about half."""
    grey = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (9, 8), interpolation=cv2.INTER_AREA)
    return int.from_bytes(np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes(), "big")


def hash_bits_apart(a, b):
    return (a ^ b).bit_count()


def thumbnail(rgb, side=THUMBNAIL_SIDE):
    scale = min(1.0, side / max(rgb.shape[:2]))
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


Candidate = collections.namedtuple("Candidate", "file_name path score shares")
Chosen = collections.namedtuple("Chosen", "candidate height width thumbnail")


def pick_distinct(candidates, count, distance, max_pixels):
    """The `count` most uncertain candidates, skipping each whose dHash is within `distance` bits of a chosen
    one's; (chosen, how many were skipped). Only the photos walked through are read again."""
    chosen, hashes, skipped = [], [], 0
    for candidate in sorted(candidates, key=lambda c: -c.score):  # a stable sort: ties keep the photos' order
        if len(chosen) == count:
            break
        rgb = imaging.read_image(candidate.path, max_pixels=max_pixels)
        code = difference_hash(rgb)
        if any(hash_bits_apart(code, other) <= distance for other in hashes):
            skipped += 1
            continue
        hashes.append(code)
        chosen.append(Chosen(candidate, *rgb.shape[:2], thumbnail(rgb) if len(chosen) < SHEET_PHOTOS else None))
    return chosen, skipped


def ranking_paths(args):
    """(CSV, COCO json, contact sheet) of --rank-uncertain, after refusing what could not work; before any work."""
    if args.eval or args.oof or args.report:
        raise utils.UserError("--rank-uncertain ranks photos by the model's own uncertainty, without labels: "
                              "drop --eval, --oof and --report")
    for flag, folder in (("--save-masks", args.save_masks), ("--save-vis", args.save_vis)):
        if folder:
            raise utils.UserError(f"--rank-uncertain writes the ranking only: drop {flag} (run inference.py "
                                  f"without --rank-uncertain for the masks)")
    if not args.output:
        raise utils.UserError("--rank-uncertain needs --output CSV, e.g. --output to_label.csv (the COCO json and "
                              "contact sheet go beside it: to_label.json, to_label.png)")
    refuse_folder("--output", args.output, "to_label.csv")
    stem, extension = os.path.splitext(args.output)
    if extension.lower() != ".csv":
        raise utils.UserError(f"--output {args.output} must end in .csv with --rank-uncertain (e.g. {stem}.csv): "
                              f"the COCO json and contact sheet go beside it as {stem}.json and {stem}.png")
    paths = (args.output, stem + ".json", stem + ".png")
    for path in paths[1:]:
        if os.path.isdir(path):
            raise utils.UserError(f"{path} is a folder, where --output {args.output} puts its "
                                  f"{os.path.splitext(path)[1]} file: pass another --output")
    return paths


def write_ranking_csv(path, chosen, class_names):
    with utils.atomic_open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["rank", "file_name", "path", "score", *(f"uncertain {name}" for name in class_names)])
        for rank, photo in enumerate(chosen, 1):
            c = photo.candidate
            writer.writerow([rank, c.file_name, c.path, f"{c.score:.6f}", *(f"{share:.6f}" for share in c.shares)])


def labelling_task(chosen, class_names):
    """COCO json of the chosen photos (id = rank) and the classes, without annotations, for a labelling tool.

    File names are relative to the photos' common folder, which `info` names (image_root).
    """
    root = os.path.commonpath([os.path.dirname(photo.candidate.path) for photo in chosen])
    images = [{"id": rank, "file_name": os.path.relpath(photo.candidate.path, root), "width": photo.width,
               "height": photo.height} for rank, photo in enumerate(chosen, 1)]
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names[1:], 1)]  # not Background
    info = {"description": "photos to label next, most uncertain first (inference.py --rank-uncertain)",
            "image_root": root}
    return {"info": info, "images": images, "annotations": [], "categories": categories}


def write_contact_sheet(path, chosen):
    import report  # matplotlib is loaded only when a contact sheet is asked for

    shown = chosen[:SHEET_PHOTOS]
    captions = [f"#{rank}  {photo.candidate.score:.3f}\n{os.path.basename(photo.candidate.file_name)}"
                for rank, photo in enumerate(shown, 1)]
    title = f"The {len(shown)} photos to label first" + (f" of {len(chosen)}" if len(chosen) > len(shown) else "")
    report.save_figure(report.contact_sheet([photo.thumbnail for photo in shown], captions, title), path)


def rank_uncertain(args):
    """Write the --rank-uncertain N least certain distinct photos: CSV, COCO json and contact sheet."""
    csv_path, json_path, sheet_path = ranking_paths(args)
    ensemble, class_names = load_ensemble(args)
    dataset, image_path = open_images(args, ensemble, class_names)
    predictions = ensembles.DatasetPredictions(ensemble, dataset, args, summarise=uncertainty_sums)
    candidates = [Candidate(info["file_name"], os.path.abspath(image_path(info)),
                            *photo_uncertainty(sums, len(class_names))) for _, info, sums in predictions]
    if not candidates:
        raise utils.UserError(f"none of the {predictions.skipped} photos could be read: nothing to rank")
    chosen, duplicates = pick_distinct(candidates, args.rank_uncertain, args.duplicate_distance,
                                       args.max_image_pixels)
    write_ranking_csv(csv_path, chosen, class_names)
    utils.atomic_write_json(json_path, labelling_task(chosen, class_names))
    write_contact_sheet(sheet_path, chosen)
    print(f"ranked {len(candidates)} photos; wrote the {len(chosen)} least certain to {csv_path}, {json_path} "
          f"and {sheet_path}")
    print(f"{duplicates} near-duplicate(s) skipped (dHash within {args.duplicate_distance} bits of a chosen photo)")
    if len(chosen) < args.rank_uncertain:
        print(f"only {len(chosen)} distinct photos: fewer than --rank-uncertain {args.rank_uncertain}")
    if predictions.skipped:
        print(f"{predictions.skipped} unreadable file(s) skipped")
    return [photo.candidate for photo in chosen]


# ---------------------------------------------------------------- a video (--video)
def check_video_flags(args):
    """Refuse, before any work, flags for photos with --video, and a --video run that would write nothing."""
    photo_flags = [flag for flag, value in (
        ("--images", args.images), ("--json", args.json), ("--eval", args.eval), ("--oof", args.oof),
        ("--report", args.report), ("--rank-uncertain", args.rank_uncertain), ("--save-masks", args.save_masks),
        ("--output", args.output), ("--tile", args.tile)) if value]
    if photo_flags:
        raise utils.UserError(f"--video labels a video's frames: drop {', '.join(photo_flags)} (for photos); its "
                              f"outputs are --save-vis VIDEO and --save-shares CSV")
    if not (args.save_vis or args.save_shares):
        raise utils.UserError("--video alone writes nothing: add --save-vis overlay.mp4, --save-shares shares.csv "
                              "or both")
    if args.save_vis:
        video.check_video_output(args.save_vis)
    if args.save_shares:
        refuse_folder("--save-shares", args.save_shares, "shares.csv")


def refuse_video_flags(args):
    """Flags that only --video reads would be ignored without it."""
    given = [flag for flag, value in (("--every", args.every != 1), ("--smooth", args.smooth),
                                      ("--scene-cut", args.scene_cut != video.SCENE_CUT),
                                      ("--save-shares", args.save_shares)) if value]
    if given:
        raise utils.UserError(f"{', '.join(given)} apply to --video only: add --video PATH, or drop them")


def run_video(args):
    """--video: label a video file's (or a camera's) frames; write the overlay video and the shares CSV."""
    check_video_flags(args)
    clip = video.Video(args.video)
    try:
        print(f"--video {clip.describe()}")
        ensemble, class_names = load_ensemble(args)
        labeller = video.FrameLabeller(ensemble, args.device, args.amp, args.smooth)
        progress = video.label_video(clip, labeller, class_names, args.every, args.save_vis, args.save_shares,
                                     args.scene_cut)
    finally:
        clip.close()
    predicted = -(-progress.frames // args.every)
    print(f"labelled {progress.frames} frames ({predicted} predicted) at {progress.rate():.1f} frames/s")
    if args.save_vis:
        print(f"wrote {args.save_vis} ({progress.frames} frames)")
    if args.save_shares:
        print(f"wrote {args.save_shares} ({predicted} rows)")
    return progress


def load_ensemble(args):
    return ensembles.load_ensemble(args.checkpoints, args.device, ensembles.build_tta(args), args.vote,
                                   ensembles.build_tiling(args))


def main(args):
    if args.video is not None:
        return run_video(args)
    refuse_video_flags(args)
    if args.rank_uncertain:
        return rank_uncertain(args)
    if args.oof:
        return run_oof(args)
    output = submission_path(args)
    ensemble, class_names = load_ensemble(args)
    dataset, image_path = open_images(args, ensemble, class_names)
    confusion = utils.ConfusionMatrix(len(class_names), device=args.device)
    accumulator = new_report(args, class_names)
    rows, count = [], 0
    predictions = ensembles.DatasetPredictions(ensemble, dataset, args)
    for index, info, mask in predictions:
        target = dataset.label_mask(index) if args.eval else None
        if args.eval:
            confusion.update(torch.from_numpy(target), mask)
        mask = mask.cpu().numpy()
        count += 1
        if output:  # at the CSV's size: the rows of many large photos stay small
            rows.append((info["file_name"], utils.resize_for_submission(mask)))
        if accumulator is not None:  # only with --eval
            accumulator.add(info, target, mask, image_path(info))
        save_outputs(args, info, image_path(info), mask, class_names)
    if output:  # a json's images must all be in the CSV; from --images, the files that could be read
        expected = None if args.images else [image["file_name"] for image in dataset.images]
        utils.write_submission(output, rows, len(class_names), expected_ids=expected)
    report_written(args, output, count, predictions.skipped)
    if args.eval:
        scores = confusion.compute()
        print(utils.format_iou_table(class_names, scores))
        title = f"Evaluation of {', '.join(args.checkpoints)} on {args.json or DEFAULT_JSON}"
        finish_report(args, accumulator, title)
        return scores


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())

