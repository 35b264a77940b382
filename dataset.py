"""COCO json -> label masks (cached), the Dataset, augmentation presets and k-fold splits.

Run as a script to build the synthetic demo dataset or to summarise a dataset:

    python dataset.py make-demo --root data/demo
    python dataset.py summary --root data/demo --json train_all.json
    python dataset.py subset --root data/demo --json train.json --n 30   # train_30.json + train_30_rest.json
"""
import argparse
import bisect
import collections
import functools
import hashlib
import itertools
import json
import math
import os

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from pycocotools import mask as mask_utils

from utils import IGNORE_INDEX, atomic_write_json, atomic_write_npy, atomic_write_png

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_ROOT = os.path.join(HERE, "data", "demo")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "recycleseg", "masks")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAINT_ORDERS = ("area", "vertices")
AUGMENTATIONS = ("none", "light", "strong")
CACHE_VERSION = 1  # bump when the way masks are painted changes
# An explicit level swaps OpenCV's default PNG settings (SUB row filter, RLE strategy)
# for libpng's adaptive filters: the same pixels, and label maps decode about twice as fast.
MASK_PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1)


# ---------------------------------------------------------------- COCO json
class Coco:
    """A checked COCO json: images, annotations per image, and the class list.

    Class list = "Background" + category names in id order; a label is the index
    in that list. Problems that would silently corrupt masks are errors; problems
    that can be repaired without guessing are counted in `notes`.
    """

    def __init__(self, json_path, root, expect_annotations=True):
        self.path = os.fspath(json_path)
        self.root = os.fspath(root)
        with open(self.path, "rb") as f:
            raw = f.read()
        self.content_hash = hashlib.sha1(raw).hexdigest()[:16]
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path} is not valid json: {err}") from None
        self.notes = collections.Counter()
        self.categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        if not self.categories:
            raise ValueError(f"{self.path} has no categories")
        self.class_names = ["Background"] + [c["name"] for c in self.categories]
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.images = self._check_images(data.get("images", []))
        annotations = data.get("annotations", [])
        if annotations and not expect_annotations:
            self.notes[f"annotations ignored ({len(annotations)}): this json is read as unlabelled"] += 1
            annotations = []
        self.anns_by_image = self._group_annotations(annotations)

    @property
    def num_classes(self):
        return len(self.class_names)

    def image_path(self, image):
        return os.path.join(self.root, image["file_name"])

    def _check_images(self, images):
        if not images:
            raise ValueError(f"{self.path} lists no images")
        seen = set()
        root = os.path.abspath(self.root)
        for image in images:
            if image["id"] in seen:
                raise ValueError(f"{self.path}: image id {image['id']} appears twice")
            seen.add(image["id"])
            name = image["file_name"]
            resolved = os.path.normpath(os.path.join(root, name))  # symlinked folders inside the root are fine
            if os.path.isabs(name) or not resolved.startswith(root + os.sep):
                raise ValueError(f"{self.path}: image {image['id']} file_name {name!r} "
                                 f"resolves outside the data root {self.root}")
        return images

    def _group_annotations(self, annotations):
        by_image = {image["id"]: [] for image in self.images}
        sizes = {image["id"]: (image["height"], image["width"]) for image in self.images}
        for ann in annotations:
            where = f"{self.path}: annotation {ann.get('id')}"
            if ann["category_id"] not in self.cat_to_label:
                raise ValueError(f"{where} has unknown category id {ann['category_id']} "
                                 f"(known: {sorted(self.cat_to_label)})")
            if ann["image_id"] not in by_image:
                raise ValueError(f"{where} refers to image id {ann['image_id']}, which is not in the json")
            rle_size = ann["segmentation"]["size"] if isinstance(ann["segmentation"], dict) else None
            if rle_size is not None and list(rle_size) != list(sizes[ann["image_id"]]):
                # an RLE cannot be clipped: its runs would wrap onto the wrong rows
                raise ValueError(f"{where} has an RLE of size {list(rle_size)} (HxW), "
                                 f"but image {ann['image_id']} is {list(sizes[ann['image_id']])}")
            segmentation = _usable_segmentation(ann["segmentation"], *sizes[ann["image_id"]], self.notes)
            if segmentation is None:
                self.notes["annotations skipped: degenerate polygon (under 3 points or zero area)"] += 1
                continue
            area = ann.get("area") or float(mask_utils.area(segmentation_rle(segmentation, *sizes[ann["image_id"]])))
            by_image[ann["image_id"]].append(dict(ann, segmentation=segmentation, area=area))
        return by_image

    def report_notes(self):
        for note, count in sorted(self.notes.items()):
            print(f"{self.path}: {note}: {count}")


def _usable_segmentation(segmentation, height, width, notes):
    """Drop polygon parts with fewer than 3 points or zero area; None when nothing is left."""
    if isinstance(segmentation, dict):
        return segmentation
    parts = []
    for part in segmentation:
        if len(part) < 6 or len(part) % 2:
            notes["polygon parts skipped: under 3 points"] += 1
            continue
        coords = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        if _polygon_area(coords) == 0:
            notes["polygon parts skipped: zero area"] += 1
            continue
        if coords.min() < 0 or (coords[:, 0] > width).any() or (coords[:, 1] > height).any():
            notes["polygons clipped to the image border"] += 1
        parts.append(part)
    return parts or None


def _polygon_area(coords):
    x, y = coords[:, 0], coords[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def segmentation_rle(segmentation, height, width):
    """Polygons, compressed or uncompressed RLE -> one compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_annotation(ann, height, width):
    """One annotation -> HxW uint8 0/1 mask."""
    return mask_utils.decode(segmentation_rle(ann["segmentation"], height, width))


def paint_sorted(anns, paint_order):
    """Annotations in the order they are painted; later ones end up on top.

    `area`: larger first so small objects stay visible. `vertices`: ascending
    coordinate count of the first polygon part, as the competition's baseline.
    """
    if paint_order == "area":
        return sorted(anns, key=lambda a: -a["area"])
    if paint_order == "vertices":
        return sorted(anns, key=lambda a: len(a["segmentation"][0]) if isinstance(a["segmentation"], list) else 0)
    raise ValueError(f"unknown paint order {paint_order!r}; choose from {PAINT_ORDERS}")


def build_mask(coco, image, paint_order="area"):
    height, width = image["height"], image["width"]
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in paint_sorted(coco.anns_by_image[image["id"]], paint_order):
        mask[decode_annotation(ann, height, width) > 0] = coco.cat_to_label[ann["category_id"]]
    return mask


class MaskCache:
    """Masks decoded once into files keyed by the json's content hash and paint order.

    PNG by default (a few KB each, viewable); `raw=True` stores .npy instead
    (H*W bytes each), which reads several times faster than PNG decodes.
    """

    def __init__(self, coco, paint_order="area", cache_dir=DEFAULT_CACHE_DIR, raw=False):
        paint_sorted([], paint_order)  # rejects an unknown order now, not mid-epoch
        self.coco, self.paint_order, self.raw = coco, paint_order, raw
        self.folder = os.path.join(cache_dir, f"v{CACHE_VERSION}-{coco.content_hash}-{paint_order}")

    def get(self, image):
        path = os.path.join(self.folder, f"{image['id']}.{'npy' if self.raw else 'png'}")
        if os.path.isfile(path):
            return np.load(path) if self.raw else cv2.imread(path, cv2.IMREAD_UNCHANGED)
        mask = build_mask(self.coco, image, self.paint_order)
        if self.raw:
            atomic_write_npy(path, mask)
        else:
            atomic_write_png(path, mask, params=MASK_PNG_PARAMS)
        return mask


# ---------------------------------------------------------------- images
def read_image(path, expected_hw=None):
    """RGB uint8 image; a missing, corrupt, truncated or mis-sized file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    data = np.fromfile(path, dtype=np.uint8)
    # coded JPEG data never holds the end marker FF D9, so none near the end means the file was cut
    if path.lower().endswith((".jpg", ".jpeg")) and b"\xff\xd9" not in data[-4096:].tobytes():
        raise ValueError(f"image file {path} is truncated (no JPEG end marker)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image file {path} cannot be decoded (corrupt or not an image)")
    if expected_hw is not None and image.shape[:2] != tuple(expected_hw):
        raise ValueError(f"image file {path} is {image.shape[1]}x{image.shape[0]} (WxH) but the json "
                         f"says {expected_hw[1]}x{expected_hw[0]}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class DecodedImageCache:
    """Decoded RGB pixels stored raw (.npy), so later epochs skip JPEG decoding.

    Costs H*W*3 bytes of disk per image (768 KB at 512x512); keyed by the image
    file's path, size and modification time, so a changed file is decoded again.
    """

    def __init__(self, cache_dir=DEFAULT_CACHE_DIR):
        self.folder = os.path.join(cache_dir, "decoded")

    def read(self, path, expected_hw=None):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return read_image(path, expected_hw)  # raises the missing-file error
        key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        cached = os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest()[:20] + ".npy")
        if os.path.isfile(cached):
            return np.load(cached)
        image = read_image(path, expected_hw)
        atomic_write_npy(cached, image)
        return image


# ---------------------------------------------------------------- Dataset
class SegmentationDataset(torch.utils.data.Dataset):
    """Images of a COCO json with their label masks.

    mode "train": transform applies to image and mask together.
    mode "val":   transform applies to the image only; the mask stays at the
                  json's resolution, where the metric is computed.
    mode "test":  returns (image, file_name); annotations are not read.
    """

    def __init__(self, root, json_path, mode="train", transform=None, paint_order="area",
                 image_ids=None, cache_dir=DEFAULT_CACHE_DIR, cache_images=False):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be train, val or test, not {mode!r}")
        json_path = os.path.join(root, json_path) if not os.path.isabs(json_path) else json_path
        self.coco = Coco(json_path, root, expect_annotations=mode != "test")
        self.mode = mode
        self.transform = transform or build_transform("eval", size=None)
        self.images = self.coco.images
        if image_ids is not None:
            wanted = set(image_ids)
            self.images = [image for image in self.images if image["id"] in wanted]
        if not self.images:
            raise ValueError(f"{json_path}: no images selected for {mode}")
        self.masks = None if mode == "test" else MaskCache(self.coco, paint_order, cache_dir, raw=cache_images)
        self.read_image = DecodedImageCache(cache_dir).read if cache_images else read_image

    @property
    def class_names(self):
        return self.coco.class_names

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index = seeded_index(key, self.transform)
        info = self.images[index]
        image = self.read_image(self.coco.image_path(info), (info["height"], info["width"]))
        if self.mode == "test":
            return self.transform(image=image)["image"], info["file_name"]
        mask = self.masks.get(info)
        if self.mode == "val":
            return self.transform(image=image)["image"], torch.from_numpy(mask).long()
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()

    def label_mask(self, index):
        """The full-resolution label mask of one image (no transform)."""
        return self.masks.get(self.images[index])


def seeded_index(key, transform):
    """Training datasets are read with `(index, augmentation seed)` keys: seed the transform, return the index."""
    index, seed = key if isinstance(key, tuple) else (key, None)
    if seed is not None:
        transform.set_random_seed(seed)
    return index


def pixel_counts(dataset):
    """Pixels per class over a dataset's masks (cached), for `--class-weights auto`."""
    counts = np.zeros(dataset.coco.num_classes, dtype=np.int64)
    for index in range(len(dataset)):
        counts += np.bincount(dataset.label_mask(index).ravel(), minlength=256)[:len(counts)]
    return counts


class SeededConcatDataset(torch.utils.data.ConcatDataset):
    """Training datasets in a row, indexed by `(index, augmentation seed)` pairs."""

    def __getitem__(self, key):
        index, seed = key
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part][(index - offset, seed)]


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields `(index, augmentation seed)` and can start mid-epoch.

    The seed depends only on (run seed, epoch, index), so the augmented stream
    is the same for any number of workers and a resumed run sees exactly the
    batches an uninterrupted one would have.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield index, augmentation_seed(self.seed, self.epoch, index)

    def __len__(self):
        return self.num_samples - self.skip


def augmentation_seed(seed, epoch, index, *more):
    return int(np.random.SeedSequence([seed, epoch, index, *more]).generate_state(1)[0])


# ---------------------------------------------------------------- rare classes
def image_labels(dataset):
    """Per image of a SegmentationDataset: the set of labels its annotations hold (background not counted)."""
    to_label = dataset.coco.cat_to_label
    return [{to_label[ann["category_id"]] for ann in dataset.coco.anns_by_image[image["id"]]}
            for image in dataset.images]


def repeat_factors(label_sets, thresh):
    """LVIS repeat factor of each image (Gupta et al. 2019): r_i = max over its classes c of max(1, sqrt(t / f_c)).

    f_c is the fraction of images holding class c; an image without classes, or given as None
    (an image whose classes are unknown, e.g. pseudo-labelled), gets 1.
    """
    if not thresh > 0:
        raise ValueError(f"the repeat threshold must be > 0, got {thresh}")
    known = [labels for labels in label_sets if labels is not None]
    images_holding = collections.Counter(label for labels in known for label in labels)
    class_factor = {label: max(1.0, math.sqrt(thresh * len(known) / count)) for label, count in images_holding.items()}
    return np.array([max((class_factor[label] for label in labels or ()), default=1.0) for labels in label_sets])


def concat_repeat_factors(parts, thresh):
    """repeat_factors over the images of a SeededConcatDataset's parts; parts without a COCO json get 1."""
    label_sets = []
    for part in parts:
        label_sets += image_labels(part) if isinstance(part, SegmentationDataset) else [None] * len(part)
    return repeat_factors(label_sets, thresh)


class RepeatFactorSampler(ResumableSampler):
    """ResumableSampler whose epoch holds image i floor(r_i) or ceil(r_i) times (stochastic rounding).

    The epoch list depends on (run seed, epoch) alone: the same for any number of workers and
    after a resume. It is cut or wrapped to round(sum r_i) draws so every epoch has the same
    length (the schedule counts steps), then padded and dealt to the processes as
    DistributedSampler does. Each draw's augmentation seed also depends on its place in the
    epoch, so two copies of one image are augmented differently.
    """

    def __init__(self, dataset, factors, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.factors = np.asarray(factors, dtype=np.float64)
        if len(self.factors) != len(dataset) or not (self.factors >= 1).all():
            raise ValueError(f"need one repeat factor >= 1 per image ({len(dataset)}), got {len(self.factors)}")
        self.epoch_length = round(self.factors.sum())
        self.num_samples = math.ceil(self.epoch_length / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def epoch_indices(self):
        """The image indices of the whole epoch, every process's share included."""
        rng = np.random.default_rng([self.seed, self.epoch])
        whole = np.floor(self.factors)
        copies = whole + (rng.random(len(self.factors)) < self.factors - whole)
        drawn = rng.permutation(np.repeat(np.arange(len(self.factors)), copies.astype(np.int64)))
        return np.resize(drawn, self.total_size)

    def __iter__(self):
        indices = self.epoch_indices()
        places = range(self.rank, self.total_size, self.num_replicas)
        for place in itertools.islice(places, self.skip, None):
            yield int(indices[place]), augmentation_seed(self.seed, self.epoch, int(indices[place]), place)


class RareClassCrop(A.RandomResizedCrop):
    """RandomResizedCrop that retries so that the crop is not one class and keeps a rare class.

    Up to `tries` candidate crops are drawn; the first is taken in which no class covers more
    than `max_ratio` of the labelled pixels (MMSegmentation's cat_max_ratio; 255 not counted)
    and which holds a pixel of `rare_labels` whenever the image does. If none qualifies, the
    candidate holding a rare class with the smallest largest-class share is taken. All draws
    come from the transform's own generators, so `Compose.set_random_seed` makes it repeatable.
    """

    def __init__(self, size, scale=(0.35, 1.0), rare_labels=(), max_ratio=0.75, tries=10, p=1.0):
        super().__init__(size=size, scale=scale, p=p)
        if not 0 < max_ratio <= 1 or tries < 1:
            raise ValueError(f"RareClassCrop needs 0 < max_ratio <= 1 and tries >= 1, got {max_ratio}, {tries}")
        self.rare_labels, self.max_ratio, self.tries = np.array(sorted(rare_labels), dtype=np.int64), max_ratio, tries

    def get_params_dependent_on_data(self, params, data):
        mask = data.get("mask")
        if mask is None:
            return super().get_params_dependent_on_data(params, data)
        has_rare = self._holds_rare(np.bincount(mask.ravel(), minlength=256))
        best = None
        for _ in range(self.tries):
            crop = super().get_params_dependent_on_data(params, data)
            x_min, y_min, x_max, y_max = crop["crop_coords"]
            counts = np.bincount(mask[y_min:y_max, x_min:x_max].ravel(), minlength=256)
            score = (self._holds_rare(counts) or not has_rare, -self._largest_share(counts))
            if score[0] and -score[1] <= self.max_ratio:
                return crop
            if best is None or score > best[0]:
                best = score, crop
        return best[1]

    def _holds_rare(self, counts):
        return bool(counts[self.rare_labels].any())

    @staticmethod
    def _largest_share(counts):
        labelled = counts[:IGNORE_INDEX]
        return labelled.max() / max(labelled.sum(), 1)


# ---------------------------------------------------------------- augmentation
def build_transform(preset, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, extra=(), crop_rare=None):
    """An albumentations pipeline: `extra` transforms first, then the preset, resize, normalise.

    preset "eval" is the deterministic resize used for validation and inference;
    `size=None` keeps the image size (no resize, no crop). `crop_rare`: RareClassCrop
    options (rare_labels, max_ratio); the presets light and strong then crop with it
    (light instead of its plain resize).
    """
    if preset not in AUGMENTATIONS + ("eval",):
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {AUGMENTATIONS}")
    if crop_rare is not None and preset not in ("light", "strong"):
        raise ValueError(f"rare-class crops need the light or strong augmentation preset, not {preset!r}")
    steps = list(extra)
    crop = A.RandomResizedCrop if crop_rare is None else functools.partial(RareClassCrop, **crop_rare)
    if preset == "strong":
        steps += [
            crop(size=(size, size), scale=(0.35, 1.0)),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.RandomRotate90(),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        ]
    elif crop_rare is not None:
        steps.append(crop(size=(size, size), scale=(0.35, 1.0)))
    elif size is not None:
        steps.append(A.Resize(size, size))
    if preset == "light":
        steps += [
            A.HorizontalFlip(),
            A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-15, 15),
                     fill_mask=IGNORE_INDEX, p=0.5),
            A.RandomBrightnessContrast(p=0.5),
        ]
    steps += [LutNormalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps)


class LutNormalize(A.Normalize):
    """A.Normalize with one multi-channel lookup table for uint8 colour images.

    The table is A.Normalize's own output on the 256 levels, so values are
    identical; one cv2.LUT call replaces a LUT per channel plus a merge (several times faster).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tables = {}  # channel count -> (256, 1, channels) float32 table

    def apply(self, img, **params):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] == 1 or self.normalization != "standard":
            return super().apply(img, **params)
        channels = img.shape[2]
        if channels not in self._tables:
            levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), channels, axis=2)
            self._tables[channels] = super().apply(levels, **params)
        return cv2.LUT(img, self._tables[channels])


# ---------------------------------------------------------------- k-fold
def rarest_class_per_image(coco):
    """For each image: its rarest category id by the json's annotation counts (0 when none)."""
    counts = collections.Counter(a["category_id"] for anns in coco.anns_by_image.values() for a in anns)
    return {image_id: min((a["category_id"] for a in anns), key=lambda c: (counts[c], c), default=0)
            for image_id, anns in coco.anns_by_image.items()}


def kfold_splits(coco, n_splits=5, seed=0):
    """Val image ids of each fold: every image in exactly one fold, stratified by rarest class.

    Within each stratum images are shuffled (seeded) and dealt to the folds in
    turn; the turn carries over between strata so fold sizes stay within one.
    """
    if n_splits < 2 or n_splits > len(coco.images):
        raise ValueError(f"n_splits must be in 2..{len(coco.images)} (number of images), not {n_splits}")
    strata = collections.defaultdict(list)
    for image_id, stratum in sorted(rarest_class_per_image(coco).items()):
        strata[stratum].append(image_id)
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(n_splits)]
    turn = 0
    for stratum in sorted(strata, key=lambda s: (len(strata[s]), s)):
        for image_id in rng.permutation(strata[stratum]).tolist():
            folds[turn % n_splits].append(image_id)
            turn += 1
    return [sorted(fold) for fold in folds]


def fold_image_ids(coco, fold, n_splits=5, seed=0):
    """(train ids, val ids) of one fold."""
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold must be in 0..{n_splits - 1}, not {fold}")
    val_ids = kfold_splits(coco, n_splits, seed)[fold]
    val = set(val_ids)
    return [image["id"] for image in coco.images if image["id"] not in val], val_ids


def write_subset(root, json_name, n, seed=0):
    """Split a json's images into `n` drawn at random (seeded) and the rest.

    Writes STEM_N.json and STEM_N_rest.json next to it, each with its images'
    annotations (e.g. few-label experiments: train on one, pseudo-label the other).
    """
    path = os.path.join(root, json_name)
    with open(path) as f:
        coco = json.load(f)
    image_ids = [image["id"] for image in coco["images"]]
    if not 0 < n < len(image_ids):
        raise ValueError(f"{path} has {len(image_ids)} images; the subset size must be 1..{len(image_ids) - 1}, not {n}")
    chosen = set(np.random.default_rng(seed).choice(image_ids, n, replace=False).tolist())
    stem = os.path.splitext(json_name)[0]
    written = []
    for suffix, inside in ((f"_{n}", True), (f"_{n}_rest", False)):
        part = dict(coco, images=[im for im in coco["images"] if (im["id"] in chosen) == inside],
                    annotations=[a for a in coco.get("annotations", []) if (a["image_id"] in chosen) == inside])
        written.append(os.path.join(root, stem + suffix + ".json"))
        atomic_write_json(written[-1], part)
    return written


# ---------------------------------------------------------------- demo data
def ensure_demo(root=DEFAULT_DATA_ROOT, **kwargs):
    """Build the synthetic demo dataset when `root` holds none yet."""
    if not os.path.isfile(os.path.join(root, "train_all.json")):
        from demo import make_demo

        print(f"building the synthetic demo dataset in {root} (first use)")
        make_demo(root, **kwargs)
    return root


def summarise(root, json_name, paint_order="area"):
    dataset = SegmentationDataset(root, json_name, mode="val", paint_order=paint_order)
    dataset.coco.report_notes()
    anns = collections.Counter(a["category_id"] for a in sum(dataset.coco.anns_by_image.values(), []))
    pixels = pixel_counts(dataset)
    print(f"{json_name}: {len(dataset)} images")
    print(f"{'class':<16}{'annotations':>12}{'pixel share':>13}")
    for label, name in enumerate(dataset.class_names):
        cat_id = dataset.coco.categories[label - 1]["id"] if label else None
        print(f"{name:<16}{anns.get(cat_id, 0) if label else '-':>12}{pixels[label] / pixels.sum():>13.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-demo", help="build the synthetic demo dataset")
    make.add_argument("--root", default=DEFAULT_DATA_ROOT, help="output folder")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--size", type=int, default=512, help="image side in pixels")
    make.add_argument("--n-train", type=int, default=120)
    make.add_argument("--n-val", type=int, default=30)
    make.add_argument("--n-test", type=int, default=30)
    summary = commands.add_parser("summary", help="annotation and pixel counts per class")
    summary.add_argument("--root", default=DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    summary.add_argument("--json", default="train_all.json", help="json file, relative to the root")
    summary.add_argument("--paint-order", choices=PAINT_ORDERS, default="area")
    subset = commands.add_parser("subset", help="split a json into N random images and the rest")
    subset.add_argument("--root", default=DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    subset.add_argument("--json", default="train.json", help="json file, relative to the root")
    subset.add_argument("--n", type=int, required=True, help="images in the subset")
    subset.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "make-demo":
        from demo import make_demo

        make_demo(args.root, seed=args.seed, size=args.size, n_train=args.n_train,
                  n_val=args.n_val, n_test=args.n_test)
        print(f"demo dataset written to {args.root}")
        return
    if args.root == DEFAULT_DATA_ROOT:
        ensure_demo(args.root)
    if args.command == "subset":
        print("wrote " + " and ".join(write_subset(args.root, args.json, args.n, args.seed)))
    else:
        summarise(args.root, args.json, args.paint_order)


if __name__ == "__main__":
    main()
