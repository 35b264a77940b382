"""Pseudo-label unlabelled images with an ensemble of checkpoints, for retraining.

    python pseudo_label.py --checkpoints "runs/*-fold*" --tta --threshold 0.9 --out pseudo
    python pseudo_label.py --image-dir photos/ --out pseudo_photos
    python train.py --pseudo pseudo --pseudo-ratio 0.5 ...

Each pixel gets the ensemble's most likely class when that class's averaged
probability is at least --threshold, and the ignore label 255 otherwise, so
retraining learns only from confident pixels. A member trained with class weights has them
taken out of its probabilities first (loss.undo_class_weights): with them in, the common
classes, Background above all, seldom reach a high threshold. Writes OUT/masks/<file stem>.png
(paletted PNGs holding the raw labels) and OUT/manifest.json, which train.py
reads through dataset.PseudoLabelDataset; validation images of the run being trained
are dropped there, so pseudo-labels never leak into its validation.

OUT must be new, empty, or a pseudo-label folder: nothing else in a folder is ever
replaced. Replacing an earlier run's pseudo-labels takes --overwrite, which removes only
the masks and manifest that runs of this script wrote (OUT/unfinished.json lists them
while a run has not finished, so a stopped run's folder stays recognisable).
"""
import argparse
import contextlib
import json
import os

import numpy as np
import torch

import coco_utils
import dataset as data
import ensemble as ensembles
import utils

MIN_KEPT_SHARE = 0.3  # below this share of pixels kept, retraining learns from too little
CONFIDENCE_BINS = 1000  # histogram of top-class probabilities, to suggest a threshold
UNFINISHED = "unfinished.json"  # the masks a run may have written, until it writes its manifest


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    ensembles.add_ensemble_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--json", default="test.json",
                        help="images to label, relative to --data-root; annotations in it are not read")
    source.add_argument("--image-dir", default=None,
                        help="label every image under this folder (recursively) instead of a json; "
                             "unreadable files are skipped and counted")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="keep a pixel when its top class probability is at least this; others become 255")
    p.add_argument("--out", default="pseudo", help="output folder for masks/ and manifest.json: new, empty, or "
                                                   "one this script wrote (with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the pseudo-labels an earlier run wrote into --out (only its masks and manifest)")
    p.add_argument("--allow-low-keep", action="store_true",
                   help=f"write the manifest even when less than {100 * MIN_KEPT_SHARE:.0f}%% of the pixels are kept")
    return p


# ---------------------------------------------------------------- labels
def confidence_and_labels(probs):
    """C x H x W class probabilities -> (top-class probability, uint8 labels), each H x W."""
    top, labels = probs.max(0)
    return top, labels.byte()


def pseudo_mask(confidence, labels, threshold):
    """H x W top-class probabilities and labels -> H x W uint8 labels, 255 where the probability < threshold."""
    check_threshold(threshold)
    labels = torch.as_tensor(labels, dtype=torch.uint8).clone()
    labels[torch.as_tensor(confidence) < threshold] = utils.IGNORE_INDEX
    return labels.cpu().numpy()


def check_threshold(threshold):
    if not 0.0 <= threshold <= 1.0:
        raise utils.UserError(f"--threshold must be in [0, 1], not {threshold}")


def confidence_histogram(confidence):
    """Pixels per bin of the top-class probability ([0, 1] in CONFIDENCE_BINS equal bins)."""
    top = torch.as_tensor(confidence).float()
    return torch.histc(top, bins=CONFIDENCE_BINS, min=0.0, max=1.0).cpu().numpy().astype(np.int64)


def threshold_keeping(histogram, share):
    """The highest bin edge t such that pixels with top probability >= t make at least `share` of all."""
    kept_from = np.cumsum(histogram[::-1])[::-1]  # pixels in bin i and above
    enough = np.nonzero(kept_from >= share * histogram.sum())[0]
    return enough[-1] / CONFIDENCE_BINS if len(enough) else 0.0


def check_kept_share(kept_share, histogram, threshold, allow):
    """Stop (or, when allowed, warn) when too few pixels pass the threshold to teach anything."""
    if kept_share >= MIN_KEPT_SHARE:
        return
    message = (f"only {kept_share:.1%} of the pixels reach --threshold {threshold} (floor {MIN_KEPT_SHARE:.0%}); "
               f"--threshold {threshold_keeping(histogram, 0.5):.3f} would keep half of them")
    if not allow:
        raise utils.UserError(message + "; no manifest was written (the masks are there to inspect). Lower "
                                        "--threshold, train the model longer, or pass --allow-low-keep, with "
                                        "--overwrite to replace these masks")
    print(f"warning: {message}")


# ---------------------------------------------------------------- the output folder
def check_out(args):
    """The masks earlier runs wrote into --out, which this run may replace; refuses an --out that is not ours.

    Checked before anything is predicted, written or removed.
    """
    if args.image_dir and is_within(args.image_dir, args.out):
        raise utils.UserError(f"--image-dir {args.image_dir} is --out {args.out} or inside it: the masks would land "
                              f"among the photos (and be read as photos next time); pass an --out outside it")
    if not os.path.isdir(args.out) or not os.listdir(args.out):
        return set()
    masks = earlier_masks(args.out)
    if masks is None:
        raise utils.UserError(f"--out {args.out} is not empty and holds no pseudo-label {data.PSEUDO_MANIFEST}, so "
                              f"its files are not this script's to replace: pass a new or empty folder")
    if not args.overwrite:
        raise utils.UserError(f"--out {args.out} already holds the pseudo-labels of an earlier run ({len(masks)} "
                              f"masks): replace them with --overwrite, or pass another --out")
    return masks


def is_within(inner, outer):
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return os.path.commonpath([inner, outer]) == outer


def earlier_masks(out):
    """The masks listed by `out`'s manifest and unfinished-run record (paths inside masks/, relative to `out`);
    None when it holds neither, or only files of those names that this script did not write."""
    masks, ours = set(), False
    with contextlib.suppress(ValueError):  # absent, or someone else's manifest.json
        masks.update(item["mask"] for item in data.read_manifest(out)["items"])
        ours = True
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        with open(os.path.join(out, UNFINISHED)) as f:
            masks.update(json.load(f)["masks"])
        ours = True
    return {m for m in masks if os.path.normpath(m).split(os.sep)[0] == data.PSEUDO_MASK_DIR} if ours else None


def check_mask_paths(out, masks, earlier):
    """Refuse to replace a file at one of this run's mask paths that no run of this script wrote."""
    foreign = sorted(m for m in masks - earlier if os.path.lexists(os.path.join(out, m)))
    if foreign:
        raise utils.UserError(f"{os.path.join(out, foreign[0])} is in the way of a mask and was not written by "
                              f"pseudo_label.py ({len(foreign)} such files): move them, or pass another --out")


def clear_earlier_run(out, masks, earlier):
    """Record the masks this run may write, then remove the earlier manifest and masks.

    The record keeps the folder recognisably ours if this run stops midway, and no older
    manifest survives to point at masks this run replaces.
    """
    utils.atomic_write_json(os.path.join(out, UNFINISHED), {"masks": sorted(earlier | masks)})
    for name in [data.PSEUDO_MANIFEST, *sorted(earlier)]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


# ---------------------------------------------------------------- unlabelled sources
def open_source(args, ensemble, class_names):
    """(dataset of unlabelled images, its image-path function, the manifest's `source` record)."""
    transform = ensembles.image_tensor_transform()
    if args.image_dir:
        dataset = data.ImageFolderDataset([args.image_dir], transform, skip_dir=args.out,
                                          max_pixels=args.max_image_pixels)
        return dataset, dataset.image_path, {"image_dir": os.path.abspath(args.image_dir)}
    args.data_root = ensembles.run_data_root(args.data_root, [member.data_root for member in ensemble.members])
    data.prepare_data_root(args.data_root)
    coco_utils.require_json(args.data_root, args.json, "--json")
    dataset = data.SegmentationDataset(args.data_root, args.json, "test", transform=transform,
                                       max_pixels=args.max_image_pixels)
    dataset.coco.report_notes()
    coco_utils.check_same_classes(dataset.coco.path, dataset.class_names, "the checkpoints", class_names,
                            fix="pass the --data-root and --json of images labelled with the checkpoints' classes")
    source = {"data_root": os.path.abspath(args.data_root), "json": os.path.abspath(dataset.coco.path),
              "json_hash": dataset.coco.content_hash}
    return dataset, dataset.coco.image_path, source


# ---------------------------------------------------------------- main
def print_summary(class_names, counts):
    """Pixels per pseudo-label class and the share of all pixels kept."""
    kept = counts[:len(class_names)].sum()
    total = kept + counts[utils.IGNORE_INDEX]
    pixels = counts[:len(class_names)]
    print(utils.format_class_table(class_names, [("pixels", pixels), ("share of kept", pixels / max(kept, 1))]))
    print(f"kept {kept} of {total} pixels ({kept / max(total, 1):.1%}); the rest are 255 (ignored)")


def main(args):
    check_threshold(args.threshold)
    earlier = check_out(args)
    ensemble, class_names = ensembles.load_ensemble(args.checkpoints, args.device, ensembles.build_tta(args),
                                                    tiling=ensembles.build_tiling(args), undo_class_weights=True)
    dataset, image_path, source = open_source(args, ensemble, class_names)
    data.check_unique_stems(info["file_name"] for info in dataset.images)
    masks = {data.pseudo_mask_name(info["file_name"]) for info in dataset.images}
    check_mask_paths(args.out, masks, earlier)
    clear_earlier_run(args.out, masks, earlier)
    palette = utils.label_palette(len(class_names))
    counts = np.zeros(256, dtype=np.int64)
    confidences = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    items = []
    predictions = ensembles.DatasetPredictions(ensemble, dataset, args, summarise=confidence_and_labels)
    for _, info, (confidence, labels) in predictions:
        mask = pseudo_mask(confidence, labels, args.threshold)
        utils.atomic_write_png(os.path.join(args.out, data.pseudo_mask_name(info["file_name"])), mask, palette)
        image_counts = np.bincount(mask.ravel(), minlength=256)
        counts += image_counts
        confidences += confidence_histogram(confidence)
        items.append({"file_name": info["file_name"], "image_id": info["id"],
                      "image": os.path.abspath(image_path(info)), "mask": data.pseudo_mask_name(info["file_name"]),
                      "kept": float(1 - image_counts[utils.IGNORE_INDEX] / mask.size)})
    print_summary(class_names, counts)
    check_kept_share(1 - counts[utils.IGNORE_INDEX] / max(counts.sum(), 1), confidences, args.threshold,
                     args.allow_low_keep)
    manifest = {"class_names": list(class_names), "threshold": args.threshold,
                "checkpoints": [os.path.abspath(p) for p in ensembles.expand_checkpoints(args.checkpoints)],
                "source": source, "items": items}
    utils.atomic_write_json(os.path.join(args.out, data.PSEUDO_MANIFEST), manifest)
    os.remove(os.path.join(args.out, UNFINISHED))
    print(f"wrote {len(items)} masks and {os.path.join(args.out, data.PSEUDO_MANIFEST)}"
          + (f"; {predictions.skipped} unreadable file(s) skipped" if predictions.skipped else ""))
    return manifest


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
