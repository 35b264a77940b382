"""Predict with one checkpoint or an ensemble; write a competition submission.

    python inference.py                                   # runs/*/best.pt on the demo test set
    python inference.py --checkpoints "runs/*-fold*" --tta --tta-vflip --tta-scales 0.75 1.0 1.25
    python inference.py --json val.json --eval            # score a labelled json

Each checkpoint describes itself (model, encoder, classes, image size,
normalisation), so nothing else is needed. Softmax probabilities are averaged
over test-time augmentations and over checkpoints.
"""
import argparse
import glob
import os

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
import ttach as tta
from albumentations.pytorch import ToTensorV2
from tqdm import tqdm

import dataset as data
import model as models
import utils


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=["runs/*/best.pt"],
                   help="checkpoint files, run folders (their best.pt) or globs; probabilities are averaged")
    p.add_argument("--data-root", default=data.DEFAULT_DATA_ROOT, help="dataset folder (default: the demo set)")
    p.add_argument("--json", default="test.json", help="images to predict, relative to --data-root")
    p.add_argument("--output", default="submission.csv", help="submission CSV path (written atomically)")
    p.add_argument("--eval", action="store_true", help="the json is labelled: print mIoU and per-class IoU")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: horizontal flip")
    p.add_argument("--tta-vflip", action="store_true", help="with --tta, also vertical flip")
    p.add_argument("--tta-scales", type=float, nargs="+", default=[1.0], help="with --tta, also these scales")
    p.add_argument("--save-masks", default=None, help="folder for paletted PNG label maps")
    p.add_argument("--save-vis", default=None, help="folder for image | prediction overlay panels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision")
    return p


# ---------------------------------------------------------------- models
class Member(torch.nn.Module):
    """One checkpoint: resizes and normalises [0, 1] images itself, returns probabilities."""

    def __init__(self, checkpoint):
        super().__init__()
        self.net = models.create_model(checkpoint["model"], checkpoint["encoder"], checkpoint["num_classes"],
                                       **checkpoint["model_kwargs"])
        self.net.load_state_dict(checkpoint["state_dict"])
        self.size = checkpoint["image_size"]
        self.register_buffer("mean", torch.tensor(checkpoint["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(checkpoint["std"]).view(1, -1, 1, 1))

    def forward(self, images):
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        logits = self.net((x - self.mean) / self.std)
        return logits.float().softmax(1)


def expand_checkpoints(patterns):
    """Files, run folders (-> best.pt) and globs -> sorted checkpoint paths."""
    paths = []
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)) or [pattern]:
            paths.append(os.path.join(match, "best.pt") if os.path.isdir(match) else match)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {', '.join(missing)}")
    return paths


def load_ensemble(patterns, device, tta_transforms=None):
    """(model averaging all members' probabilities, class names)."""
    paths = expand_checkpoints(patterns)
    checkpoints = [utils.load_checkpoint(p) for p in paths]
    class_names = checkpoints[0]["class_names"]
    for path, checkpoint in zip(paths, checkpoints):
        if checkpoint["class_names"] != class_names:
            raise ValueError(f"{path} predicts {checkpoint['class_names']}, {paths[0]} predicts {class_names}")
    members = [Member(c) for c in checkpoints]
    if tta_transforms is not None:
        members = [tta.SegmentationTTAWrapper(m, tta_transforms, merge_mode="mean") for m in members]
    ensemble = Ensemble(members).to(device).eval()
    print(f"ensemble of {len(paths)} checkpoint(s): {', '.join(paths)}")
    return models.prepare_for_inference(ensemble), class_names


class Ensemble(torch.nn.Module):
    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, images):
        return torch.stack([m(images) for m in self.members]).mean(0)


def build_tta(hflip=True, vflip=False, scales=(1.0,)):
    steps = [tta.HorizontalFlip()] if hflip else []
    if vflip:
        steps.append(tta.VerticalFlip())
    if list(scales) != [1.0]:
        steps.append(tta.Scale(scales=list(scales), interpolation="bilinear", align_corners=False))
    return tta.Compose(steps)


# ---------------------------------------------------------------- prediction
def unit_range_transform():
    """Images as [0, 1] float tensors at their own size; each member resizes and normalises."""
    return A.Compose([A.Normalize(mean=0.0, std=1.0), ToTensorV2()])


@torch.inference_mode()
def predict(ensemble, loader, device, amp="off"):
    """Yield (index, probabilities C x H x W on the device) at each image's json size."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    index = 0
    for images, _ in tqdm(loader, desc="predict", dynamic_ncols=True):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            probs = ensemble(images.to(device, non_blocking=True))
        for prob in probs.float():
            info = loader.dataset.images[index]
            yield index, F.interpolate(prob[None], size=(info["height"], info["width"]),
                                       mode="bilinear", align_corners=False)[0]
            index += 1


def save_outputs(args, info, image_path, mask, num_classes):
    stem = os.path.splitext(info["file_name"])[0] + ".png"
    if args.save_masks:
        utils.atomic_write_png(os.path.join(args.save_masks, stem), mask, palette=utils.class_palette(num_classes))
    if args.save_vis:
        rgb = data.read_image(image_path)
        panel = np.concatenate([rgb, utils.overlay(rgb, mask, num_classes)], axis=1)
        utils.atomic_write_png(os.path.join(args.save_vis, stem), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))


def main(args):
    if args.data_root == data.DEFAULT_DATA_ROOT:
        data.ensure_demo(args.data_root)
    transforms = build_tta(True, args.tta_vflip, args.tta_scales) if args.tta else None
    ensemble, class_names = load_ensemble(args.checkpoints, args.device, transforms)
    mode = "val" if args.eval else "test"
    dataset = data.SegmentationDataset(args.data_root, args.json, mode, transform=unit_range_transform())
    dataset.coco.report_notes()
    if dataset.class_names != class_names:
        raise ValueError(f"{args.json} has classes {dataset.class_names}, the checkpoints {class_names}")
    # sequential order: predict() maps batch positions back to dataset.images
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    confusion = utils.ConfusionMatrix(len(class_names), device=args.device)
    rows = []
    for index, prob in predict(ensemble, loader, args.device, args.amp):
        info = dataset.images[index]
        mask = prob.argmax(0).byte()
        if args.eval:
            confusion.update(torch.from_numpy(dataset.label_mask(index)), mask)
        mask = mask.cpu().numpy()
        rows.append((info["file_name"], mask))
        save_outputs(args, info, dataset.coco.image_path(info), mask, len(class_names))
    utils.write_submission(args.output, rows, len(class_names), expected_ids=[i["file_name"] for i in dataset.images])
    print(f"wrote {args.output} ({len(rows)} images)")
    if args.eval:
        scores = confusion.compute()
        print(utils.format_iou_table(class_names, scores))
        return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
