"""Datasets and what feeds them to a model: the labelled, pseudo-labelled and photo-folder Datasets,
batching of mixed sizes, overlap checks between splits, samplers, rare classes and k-fold splits.

Holds: SegmentationDataset (a COCO json's images and masks), ImageFolderDataset (photos without labels)
and their output names (output_name, check_unique_stems); collate_mixed; FileIndex and image_overlap
(a val image is never trained on); pseudo-label folders (read_manifest, read_label_png,
PseudoLabelDataset, RatioMix); item keys and samplers (SeededConcatDataset, ResumableSampler,
RepeatFactorSampler); rare classes (rarest_classes, image_labels, repeat_factors); k-fold splits and
subsets (kfold_splits, fold_image_ids, write_subset); the data root (prepare_data_root, ensure_demo).
The json checks and masks are in coco_utils.py, image reading in images.py, augmentation in presets.py,
and the command line (summary, subset) in dataset_tool.py.
"""
import bisect
import collections
import functools
import hashlib
import itertools
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

import coco_utils
import demo
import images as imaging
import presets
from utils import UserError, atomic_write_json

DEFAULT_DATA_ROOT = demo.DEFAULT_ROOT  # the synthetic demo set, built there on first use


class SegmentationDataset(torch.utils.data.Dataset):
    """Images of a COCO json with their label masks.

    mode "train": transform applies to image and mask together.
    mode "val":   transform applies to the image only; the mask stays at the
                  json's resolution, where the metric is computed.
    mode "test":  returns (image, file_name); annotations are not read.
    """

    def __init__(self, root, json_path, mode="train", transform=None, paint_order="area",
                 image_ids=None, cache_dir=imaging.DEFAULT_CACHE_DIR, cache_images=False,
                 max_pixels=imaging.MAX_IMAGE_PIXELS):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be train, val or test, not {mode!r}")
        json_path = os.path.join(root, json_path) if not os.path.isabs(json_path) else json_path
        self.coco = coco_utils.Coco(json_path, root, expect_annotations=mode != "test")
        self.mode = mode
        self.transform = transform or presets.build_transform("eval", size=None)
        self.images = self.coco.images
        if image_ids is not None:
            wanted = set(image_ids)
            self.images = [image for image in self.images if image["id"] in wanted]
        if not self.images:
            raise ValueError(f"{json_path}: no images selected for {mode}")
        self.masks = (None if mode == "test"
                      else coco_utils.MaskCache(self.coco, paint_order, cache_dir, raw=cache_images))
        self.read_image = (imaging.DecodedImageCache(cache_dir, max_pixels).read if cache_images
                           else functools.partial(imaging.read_image, max_pixels=max_pixels))

    @property
    def class_names(self):
        return self.coco.class_names

    @property
    def paint_order(self):
        """The overlap rule the label masks are painted with (None in test mode: no masks)."""
        return self.masks.paint_order if self.masks is not None else None

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


class ImageFolderDataset(torch.utils.data.Dataset):
    """Photos without labels: image files, folders (searched recursively) and globs, as (image, file name).

    `file_name` is the path relative to the folder given (a file's own name when given alone), so
    outputs keep a folder's layout. Files that cannot be read are skipped and counted, never fatal:
    those found unreadable from their header now (`skipped`), those that fail to decode later
    in __getitem__, which then returns the UserError in place of the image (predict passes it on).
    """

    def __init__(self, paths, transform, skip_dir=None, max_pixels=imaging.MAX_IMAGE_PIXELS):
        self.transform, self.max_pixels = transform, max_pixels
        self.images, self.skipped = imaging.readable_images(imaging.find_images(paths, skip_dir), max_pixels, paths)
        check_unique_stems(info["file_name"] for info in self.images)

    @staticmethod
    def image_path(info):
        return info["path"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        try:
            image = imaging.read_image(info["path"], max_pixels=self.max_pixels)
        except UserError as err:
            return err, info["file_name"]
        return self.transform(image=image)["image"], info["file_name"]


def output_name(file_name, suffix=".png"):
    """The output file of an input image: its file name with the extension replaced."""
    return os.path.splitext(file_name)[0] + suffix


def check_unique_stems(file_names):
    """Two images with one stem (a.jpg, a.png) would write the same output file."""
    seen = {}
    for file_name in file_names:
        name = output_name(file_name)
        if name in seen:
            raise UserError(f"{seen[name]} and {file_name} would both write {name}: rename one of them")
        seen[name] = file_name


# ---------------------------------------------------------------- batching
def collate_mixed(batch):
    """Batches of images that may differ in size: each field is stacked as default_collate does when
    its tensors share one shape (same-size data is batched as before), and kept as a list of
    per-image tensors otherwise (and for a skipped file's UserError)."""
    return tuple(default_collate(list(field)) if _stackable(field) else list(field) for field in zip(*batch))


def _stackable(field):
    if not all(torch.is_tensor(x) for x in field):
        return all(isinstance(x, str) for x in field)  # file names: default_collate lists them
    return len({x.shape for x in field}) == 1


class FileIndex:
    """Files to compare others with: by resolved path, and by content through their byte sizes, so
    that a file is hashed only when its size equals one of theirs (cheap: sizes rarely agree by chance).
    Missing files match by path alone; reading them is left to the image reader."""

    def __init__(self, paths):
        self.paths = {os.path.realpath(path) for path in paths}
        self.by_size = collections.defaultdict(list)
        for path in self.paths:
            if os.path.isfile(path):
                self.by_size[os.path.getsize(path)].append(path)
        self._digests = {}

    def holds_path(self, path):
        return os.path.realpath(path) in self.paths

    def holds_bytes(self, path):
        if not os.path.isfile(path):
            return False
        return any(self._digest(path) == self._digest(other) for other in self.by_size.get(os.path.getsize(path), []))

    def _digest(self, path):
        path = os.path.realpath(path)
        if path not in self._digests:
            with open(path, "rb") as f:
                self._digests[path] = hashlib.file_digest(f, "sha1").hexdigest()
        return self._digests[path]


def image_overlap(train_sets, val_set):
    """How many `val_set` images also appear in `train_sets`, by each kind of match.

    Returns {"file name": n, "resolved path": n, "content": n, "same file": n}; "same
    file" counts images that are one file (resolved path) or identical bytes.
    """
    def files(dataset):
        return [(info["file_name"], dataset.coco.image_path(info)) for info in dataset.images]

    train = [entry for dataset in train_sets for entry in files(dataset)]
    names, index = {name for name, _ in train}, FileIndex(path for _, path in train)
    counts = collections.Counter()
    for name, path in files(val_set):
        same_path, same_bytes = index.holds_path(path), index.holds_bytes(path)
        counts["file name"] += name in names
        counts["resolved path"] += same_path
        counts["content"] += same_bytes
        counts["same file"] += same_path or same_bytes
    return {key: counts[key] for key in ("file name", "resolved path", "content", "same file")}


# ---------------------------------------------------------------- pseudo-label folders
# pseudo_label.py writes OUT/masks/<file stem>.png and OUT/manifest.json; training reads them here.
PSEUDO_MANIFEST = "manifest.json"
PSEUDO_MASK_DIR = "masks"
PSEUDO_MANIFEST_KEYS = ("class_names", "threshold", "checkpoints", "source", "items")


def read_label_png(path):
    """Raw label values of a paletted or greyscale PNG (OpenCV would turn a paletted one into colours)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise UserError(f"{path} is a {image.mode} PNG, not a label map (paletted or greyscale): write it again "
                            f"with pseudo_label.py, or save it as a PNG of class indices")
        return np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def pseudo_mask_name(file_name):
    """A pseudo-label mask's path inside its folder."""
    return os.path.join(PSEUDO_MASK_DIR, output_name(file_name))


def read_manifest(out_dir):
    path = os.path.join(out_dir, PSEUDO_MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: run pseudo_label.py --out {out_dir} first")
    with open(path) as f:
        try:
            manifest = json.load(f)
        except ValueError as err:
            raise UserError(f"{path} is not valid json ({err}): run pseudo_label.py --out {out_dir} again") from None
    missing = [key for key in PSEUDO_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is not a pseudo-label manifest; run pseudo_label.py "
                        f"--out {out_dir} again")
    return manifest


def drop_val_images(items, source, val_dataset):
    """Items that are not validation images of `val_dataset`.

    An item is a val image when its file resolves to a val image's file, or --
    only when it came from the very json the val set reads (same content hash),
    since ids of different jsons are unrelated -- when its image id is a val id.
    """
    val_paths = {os.path.realpath(val_dataset.coco.image_path(image)) for image in val_dataset.images}
    same_json = source.get("json_hash") == val_dataset.coco.content_hash
    val_ids = {image["id"] for image in val_dataset.images} if same_json else set()
    return [item for item in items
            if os.path.realpath(item["image"]) not in val_paths and item["image_id"] not in val_ids]


class PseudoLabelDataset(torch.utils.data.Dataset):
    """The images and masks of a pseudo_label.py output folder, for training.

    Indexed like the training datasets: `(index, augmentation seed)`, or a
    plain index. Returns (image tensor, long mask) with 255 kept as ignore.
    `exclude`: the val SegmentationDataset of this run (or fold); its images
    are dropped. Checking `class_names` against the training set is the caller's.
    """

    def __init__(self, out_dir, transform, exclude=None):
        manifest = read_manifest(out_dir)
        self.out_dir, self.transform = out_dir, transform
        self.class_names = manifest["class_names"]
        self.items = manifest["items"]
        if exclude is not None:
            self.items = drop_val_images(self.items, manifest["source"], exclude)
            print(f"{out_dir}: dropped {len(manifest['items']) - len(self.items)} pseudo-labelled image(s) "
                  f"that are validation images of this run; {len(self.items)} left")
        if not self.items:
            raise UserError(f"--pseudo {out_dir}: none of its {len(manifest['items'])} pseudo-labelled images can be "
                            f"trained on (validation images are left out): pseudo-label other photos, or drop --pseudo")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        item = self.items[seeded_index(key, self.transform)]
        mask_path = os.path.join(self.out_dir, item["mask"])
        mask = read_label_png(mask_path)
        image = imaging.read_image(item["image"], mask.shape)
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class RatioMix(torch.utils.data.Dataset):
    """`length` draws per epoch from `pseudo`, with replacement, fixed by the sampler's seeds.

    Index i with augmentation seed s -> pseudo item s % len(pseudo), augmented
    with seed s. The seed depends on (run seed, epoch, index) only, so each
    epoch draws a different subset, identical on resume and for any number
    of workers. A plain index i (no seed) -> item i % len(pseudo).
    """

    def __init__(self, pseudo, length):
        if len(pseudo) == 0:
            raise ValueError("no pseudo-labelled images to mix in (all were validation images?)")
        self.pseudo, self.length = pseudo, length

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index, seed = item_key(key)
        if seed is None:
            return self.pseudo[index % len(self.pseudo)]
        return self.pseudo[(seed % len(self.pseudo), seed)]


def mix_ratio_dataset(pseudo, n_labelled, ratio):
    """round(ratio * n_labelled) pseudo draws per epoch (see RatioMix); None when that is 0 or ratio <= 0."""
    length = round(ratio * n_labelled) if ratio > 0 else 0
    return RatioMix(pseudo, length) if length > 0 else None


# ---------------------------------------------------------------- item keys
# Training datasets are read with `(index, augmentation seed)` keys (ResumableSampler makes them), so the
# augmented stream depends on (run seed, epoch, index) alone; evaluation reads plain indices.
def item_key(key):
    """(index, augmentation seed or None) of a dataset key."""
    return key if isinstance(key, tuple) else (key, None)


def seeded_index(key, transform):
    """Seed the transform with the key's augmentation seed (if any); return the index."""
    index, seed = item_key(key)
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
        index, seed = item_key(key)
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
RARE_CLASS_COUNT = 2  # classes copy-paste and rare-class crops favour when none are named: the rarest ones



def by_rarity(counts):
    """Sort key over the keys of `counts` (category ids or labels): fewest annotations first, then the lower key."""
    return lambda key: (counts[key], key)


def rarest_classes(dataset, count=RARE_CLASS_COUNT):
    """Names of the `count` categories with the fewest annotations in the dataset's images (at least one)."""
    counts = coco_utils.annotation_counts(dataset.coco, dataset.images)
    rarest = sorted(counts, key=by_rarity(counts))[:count]
    return [dataset.class_names[dataset.coco.cat_to_label[cat_id]] for cat_id in rarest]


def parse_classes(classes):
    """None, a comma-separated string or a list of class names -> list of names (None stays None)."""
    if classes is None or isinstance(classes, (list, tuple)):
        return classes
    return [name.strip() for name in classes.split(",") if name.strip()] or None


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
        raise UserError(f"--repeat-thresh must be above 0, not {thresh}: images holding a class found in fewer "
                        f"than that share of the images are repeated (e.g. 0.5)")
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


# ---------------------------------------------------------------- k-fold
def rarest_class_per_image(coco):
    """For each image: its rarest category id by the json's annotation counts (0 when none)."""
    counts = coco_utils.annotation_counts(coco)
    return {image_id: min((a["category_id"] for a in anns), key=by_rarity(counts), default=0)
            for image_id, anns in coco.anns_by_image.items()}


def kfold_splits(coco, n_splits=5, seed=0):
    """Val image ids of each fold: every image in exactly one fold, stratified by rarest class.

    Within each stratum images are shuffled (seeded) and dealt to the folds in
    turn; the turn carries over between strata so fold sizes stay within one.
    """
    if n_splits < 2 or n_splits > len(coco.images):
        raise UserError(f"--n-folds {n_splits} does not fit {coco.path}: it has {len(coco.images)} images, so "
                        f"pass --n-folds from 2 to {len(coco.images)}")
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


def check_fold(fold, n_splits):
    """A UserError unless --fold names one of --n-folds folds (2 or more)."""
    if n_splits < 2:
        raise UserError(f"--n-folds must be 2 or more (one fold validates, the others train), not {n_splits}")
    if not 0 <= fold < n_splits:
        raise UserError(f"--fold must be in 0..{n_splits - 1} (--n-folds {n_splits}), not {fold}")


def fold_image_ids(coco, fold, n_splits=5, seed=0):
    """(train ids, val ids) of one fold."""
    check_fold(fold, n_splits)
    val_ids = kfold_splits(coco, n_splits, seed)[fold]
    val = set(val_ids)
    return [image["id"] for image in coco.images if image["id"] not in val], val_ids


def write_subset(root, json_name, n, seed=0, unlabeled_rest=False, overwrite=False):
    """Split a json's images into `n` drawn at random (seeded) and the rest.

    Writes STEM_N.json and STEM_N_rest.json next to it, each with its images'
    annotations (e.g. few-label experiments: train on one, pseudo-label the other);
    with `unlabeled_rest`, STEM_N_unlabeled.json instead, the rest without annotations
    (an unlabelled pool for train.py --unlabeled). A file of those names that holds something
    else is kept, and nothing is written, unless `overwrite`.
    """
    path = os.path.join(root, json_name)
    coco_utils.Coco(path, root)  # refuses a json the training would refuse, before anything is written
    with open(path) as f:
        coco = json.load(f)
    image_ids = [image["id"] for image in coco["images"]]
    if not 0 < n < len(image_ids):
        raise UserError(f"{path} has {len(image_ids)} images; the subset size must be 1..{len(image_ids) - 1}, not {n}: "
                        f"pass another --n")
    chosen = set(np.random.default_rng(seed).choice(image_ids, n, replace=False).tolist())
    stem = os.path.splitext(json_name)[0]
    rest = f"_{n}_unlabeled" if unlabeled_rest else f"_{n}_rest"
    parts = {}
    for suffix, inside in ((f"_{n}", True), (rest, False)):
        parts[os.path.join(root, stem + suffix + ".json")] = dict(
            coco, images=[im for im in coco["images"] if (im["id"] in chosen) == inside],
            annotations=[a for a in coco.get("annotations", [])
                         if (a["image_id"] in chosen) == inside and (inside or not unlabeled_rest)])
    different = [path for path, part in parts.items() if os.path.exists(path) and read_json(path) != part]
    if different and not overwrite:
        raise UserError(f"{different[0]} exists and holds another subset: pass --overwrite to replace it, or "
                        f"another --seed or --n")
    for path, part in parts.items():
        atomic_write_json(path, part)
    return list(parts)


def read_json(path):
    """The json at `path`, or None where it is not valid json (so that it compares unequal to any subset)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- demo data
def prepare_data_root(root):
    """A script's --data-root, ready to read: the default one is the demo set, built on first use."""
    if root == DEFAULT_DATA_ROOT:
        ensure_demo(root)
    return root


def ensure_demo(root=DEFAULT_DATA_ROOT, **kwargs):
    """Build the synthetic demo dataset when `root` holds none yet."""
    if not os.path.isfile(os.path.join(root, "train_all.json")):
        print(f"building the synthetic demo dataset in {root} (first use)")
        demo.make_demo(root, **kwargs)
    return root
