"""Loader throughput: our Dataset (cached masks) against the competition's baseline Dataset.

Both datasets are timed item by item in one process at the json resolution (no
resize), each with its own normalisation: a warm-up pass first (builds our mask
cache, warms the OS file cache), then passes alternating between the two; the
median pass gives images/s.

    python benchmarks/bench_loader.py                      # ../shared/data/trashbags
    python benchmarks/bench_loader.py --root data/demo --json train_all.json
"""
import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from pycocotools.coco import COCO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset import SegmentationDataset  # noqa: E402
from images import read_image  # noqa: E402
from presets import build_transform  # noqa: E402
from utils import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

DEFAULT_ROOT = os.path.join(REPO, "..", "shared", "data", "trashbags")
OURS, BASELINE = "ours (cached masks)", "baseline (annToMask per item)"
OURS_DECODED = "ours (+ --cache-images)"


# ---------------------------------------------------------------- the competition's baseline
def get_classname(class_id, cats):
    for cat in cats:
        if cat["id"] == class_id:
            return cat["name"]
    return "None"


class BaselineDataset(torch.utils.data.Dataset):
    """The competition's baseline Dataset in train mode: every mask is painted from the json per item."""

    def __init__(self, root, json_name):
        self.dataset_path = root
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines would clutter the table
            self.coco = COCO(os.path.join(root, json_name))
        self.image_ids = self.coco.getImgIds()
        self.category_names = ["Background"] + [c["name"] for c in self.coco.loadCats(self.coco.getCatIds())]
        self.transform = A.Compose([ToTensorV2()])

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image_id = self.coco.getImgIds(imgIds=self.image_ids[index])
        image_infos = self.coco.loadImgs(image_id)[0]
        images = cv2.imread(os.path.join(self.dataset_path, image_infos["file_name"]))
        images = cv2.cvtColor(images, cv2.COLOR_BGR2RGB).astype(np.float32)
        images /= 255.0
        ann_ids = self.coco.getAnnIds(imgIds=image_infos["id"])
        anns = self.coco.loadAnns(ann_ids)
        cat_ids = self.coco.getCatIds()
        cats = self.coco.loadCats(cat_ids)
        masks = np.zeros((image_infos["height"], image_infos["width"]))
        anns = sorted(anns, key=lambda idx: len(idx["segmentation"][0]), reverse=False)
        for ann in anns:
            class_name = get_classname(ann["category_id"], cats)
            pixel_value = self.category_names.index(class_name)
            masks[self.coco.annToMask(ann) == 1] = pixel_value
        masks = masks.astype(np.int8)
        transformed = self.transform(image=images, mask=masks)
        return transformed["image"], transformed["mask"], image_infos


# ---------------------------------------------------------------- timing
def seconds_per_pass(step, n_items):
    start = time.perf_counter()
    for index in range(n_items):
        step(index)
    return time.perf_counter() - start


def timed_passes(loaders, n_items, passes):
    """Seconds of each pass per loader, the loaders' order alternating from pass to pass."""
    times = {name: [] for name in loaders}
    names = list(loaders)
    for p in range(passes):
        for name in names if p % 2 == 0 else names[::-1]:
            times[name].append(seconds_per_pass(loaders[name], n_items))
    return times


STAGES = ("JPEG decode", "mask read", "transform")


def stage_seconds(ours):
    """One pass over our dataset: seconds spent in each stage of its train-mode __getitem__."""
    totals = dict.fromkeys(STAGES, 0.0)
    for info in ours.images:
        start = time.perf_counter()
        image = read_image(ours.coco.image_path(info), (info["height"], info["width"]))
        decoded = time.perf_counter()
        mask = ours.masks.get(info)
        read = time.perf_counter()
        out = ours.transform(image=image, mask=mask)
        torch.as_tensor(out["mask"]).long()
        done = time.perf_counter()
        for stage, seconds in zip(STAGES, (decoded - start, read - decoded, done - read)):
            totals[stage] += seconds
    return totals


def check_same_outputs(ours, baseline):
    """Same label maps (ours painted in the baseline's order) and the same pixels up to normalisation."""
    mean, std = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)
    for index in range(len(ours)):
        (image, mask), (base_image, base_mask, _) = ours[index], baseline[index]
        name = ours.images[index]["file_name"]
        if not np.array_equal(mask.numpy(), base_mask.numpy().astype(np.int64)):
            raise AssertionError(f"masks differ at {name}")
        if not np.allclose(image.numpy() * std + mean, base_image.numpy(), atol=1e-5):
            raise AssertionError(f"images differ at {name}")


def print_table(times, n_items, reference):
    """images/s and ms/item of the median pass; ratio = images/s over the reference's images/s."""
    reference_seconds = statistics.median(times[reference])
    print(f"{'loader':<32}{'images/s':>10}{'ms/item':>10}{'ratio':>8}")
    for name, seconds in times.items():
        med = statistics.median(seconds)
        print(f"{name:<32}{n_items / med:>10.1f}{1000 * med / n_items:>10.2f}{reference_seconds / med:>8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="data root holding the json and the images")
    parser.add_argument("--json", default="train_all.json", help="json file, relative to the root")
    parser.add_argument("--passes", type=int, default=7, help="timed passes per loader")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and OpenCV threads; 1 is what a DataLoader worker gets")
    parser.add_argument("--cache-dir", help="mask cache folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-masks-")
    try:
        run(args, cache_dir)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def run(args, cache_dir):
    ours = SegmentationDataset(args.root, args.json, mode="train", transform=build_transform("eval", size=None),
                               paint_order="vertices", cache_dir=cache_dir)  # the baseline's order: comparable masks
    ours_decoded = SegmentationDataset(args.root, args.json, mode="train", transform=build_transform("eval", size=None),
                                       paint_order="vertices", cache_dir=cache_dir, cache_images=True)
    baseline = BaselineDataset(args.root, args.json)
    n = len(ours)
    for candidate in (ours, ours_decoded):  # also the warm-up: fills our caches, warms the file cache
        check_same_outputs(candidate, baseline)
    times = timed_passes({OURS: ours.__getitem__, OURS_DECODED: ours_decoded.__getitem__,
                          BASELINE: baseline.__getitem__}, n, args.passes)
    stages = [stage_seconds(ours) for _ in range(args.passes)]
    first = ours.images[0]
    print(f"\n{n} images of {os.path.normpath(os.path.join(args.root, args.json))} (first {first['width']}x"
          f"{first['height']}), no resize; median of {args.passes} alternating passes; threads {args.threads}")
    print_table(times, n, reference=BASELINE)
    print("ours per stage, ms/item: " + ", ".join(
        f"{stage} {1000 * statistics.median(s[stage] for s in stages) / n:.2f}" for stage in STAGES))


if __name__ == "__main__":
    main()
