"""Copy-paste augmentation of rare classes: an object bank, an online transform, an offline generator.

Objects are cut out with their exact visible masks (never their boxes) and pasted
so that the label map always equals what the image shows: pasted pixels take the
pasted class, whatever they cover loses its label.

Offline: write N new images and a COCO json of their visible instances,

    python copy_paste.py --data-root data/demo --json train.json --out data/demo_cp --n 1500

then train with `--extra-json data/demo_cp/train_copy_paste.json`.
"""
import argparse
import collections
import hashlib
import json
import os

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets
from pycocotools import mask as mask_utils
from scipy import ndimage

import coco_utils
import dataset as data
import images as imaging
import utils

BANK_VERSION = 1  # bump when the way objects are cut out changes
DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(imaging.DEFAULT_CACHE_DIR), "copy_paste")
MIN_OBJECT_AREA = 32  # pixels; smaller cut-outs and pastes teach nothing but noise
PLACEMENT_TRIES = 10
JPEG_QUALITY = 95

BankObject = collections.namedtuple("BankObject", "rgba label image_id")  # alpha: 255 on the object, else 0
# a placed piece; alpha None: hard edge; image_id: the source image it was cut from
Paste = collections.namedtuple("Paste", "y x rgb alpha mask label image_id")


# ---------------------------------------------------------------- visible instances
def instance_map(coco, image, paint_order):
    """Which annotation is visible at each pixel (0: none, k: k-th in paint order), and those annotations.

    Painted exactly as `coco_utils.build_mask` paints labels, so mapping each index to
    its label gives the dataset's label map; unlike the label map it also separates
    overlapping instances of one class.
    """
    height, width = image["height"], image["width"]
    anns = coco_utils.paint_sorted(coco.anns_by_image[image["id"]], paint_order)
    indices = np.zeros((height, width), dtype=np.int32)
    for k, ann in enumerate(anns, start=1):
        indices[coco_utils.decode_annotation(ann, height, width) > 0] = k
    return indices, anns


# ---------------------------------------------------------------- object bank
class ObjectBank:
    """Every visible instance of some classes in a dataset's images, cut out with its exact mask."""

    def __init__(self, objects, class_names):
        self.objects = list(objects)
        self.class_names = list(class_names)
        by_label = collections.defaultdict(list)
        for index, obj in enumerate(self.objects):
            by_label[obj.label].append(index)
        self.by_label = {label: np.array(indices) for label, indices in sorted(by_label.items())}

    def __len__(self):
        return len(self.objects)

    def __repr__(self):
        counts = ", ".join(f"{self.class_names[label]} {len(indices)}" for label, indices in self.by_label.items())
        return f"ObjectBank({len(self)} objects: {counts})"

    def sample(self, rng):
        """One object, class-balanced: a class uniformly, then one of its objects uniformly."""
        labels = list(self.by_label)
        indices = self.by_label[labels[rng.integers(len(labels))]]
        return self.objects[indices[rng.integers(len(indices))]]

    @classmethod
    def for_dataset(cls, dataset, classes=None, cache_dir=DEFAULT_CACHE_DIR):
        """The bank of `classes` (names; None: the rarest two) over the dataset's own images, cached.

        Each class named must have objects there; of the rarest two, one is enough.
        """
        named = data.parse_classes(classes)
        names = named or data.rarest_classes(dataset)
        labels = _labels_of(names, dataset)
        paint_order = dataset.paint_order
        image_ids = sorted(image["id"] for image in dataset.images)
        key = json.dumps([BANK_VERSION, MIN_OBJECT_AREA, dataset.coco.content_hash, paint_order, labels, image_ids])
        path = os.path.join(cache_dir, f"bank-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
        if os.path.isfile(path):
            bank = load_bank(path)
        else:
            bank = cls(cut_out_objects(dataset, labels, paint_order), dataset.class_names)
            if len(bank):
                save_bank(path, bank)
        empty = [name for name in names if dataset.class_names.index(name) not in bank.by_label]
        if empty and (named or not len(bank)):
            raise _no_objects_error(empty, names, dataset)
        return bank


def _labels_of(names, dataset):
    unknown = [name for name in names if name not in dataset.class_names[1:]]
    if unknown:
        raise utils.UserError(f"unknown classes {unknown} for copy-paste; {dataset.coco.path} has {dataset.class_names[1:]}")
    return sorted(dataset.class_names.index(name) for name in names)


def _no_objects_error(empty, names, dataset):
    """The error for classes without objects, naming the classes annotated in the dataset's images instead."""
    counts = coco_utils.annotation_counts(dataset.coco, dataset.images)
    class_of = {cat_id: dataset.class_names[label] for cat_id, label in dataset.coco.cat_to_label.items()}
    others = [f"{class_of[cat_id]} ({n})" for cat_id, n in counts.most_common() if class_of[cat_id] not in names]
    return utils.UserError(
        f"no objects of classes {empty} (of at least {MIN_OBJECT_AREA} visible pixels) in the {len(dataset)} images "
        f"used from {dataset.coco.path}: nothing to paste; choose other copy-paste classes"
        + (f", e.g. of those annotated there (annotations): {', '.join(others)}" if others else ""))


def cut_out_objects(dataset, labels, paint_order):
    """Bank objects: each wanted instance's visible pixels, cropped to their bounding box."""
    coco, wanted = dataset.coco, set(labels)
    objects = []
    for image in dataset.images:
        if not any(coco.cat_to_label[ann["category_id"]] in wanted for ann in coco.anns_by_image[image["id"]]):
            continue  # skip reading photos with nothing to cut out
        rgb = imaging.read_image(coco.image_path(image), (image["height"], image["width"]))
        indices, anns = instance_map(coco, image, paint_order)
        for k, ann in enumerate(anns, start=1):
            label = coco.cat_to_label[ann["category_id"]]
            visible = indices == k
            if label in wanted and visible.sum() >= MIN_OBJECT_AREA:
                objects.append(BankObject(_cut_out(rgb, visible), label, image["id"]))
    return objects


def _cut_out(rgb, visible):
    """RGBA crop of the object's bounding box plus a 1-pixel margin.

    Pixels off the object take the colour of the nearest object pixel, so that
    interpolating while warping never mixes the source's background into the object.
    """
    ys, xs = np.nonzero(visible)
    box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    inside = np.pad(visible[box], 1)
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    crop = np.pad(rgb[box], ((1, 1), (1, 1), (0, 0)))[tuple(nearest)]
    return np.dstack([crop, inside.astype(np.uint8) * 255])


def save_bank(path, bank):
    """One npz of plain arrays: objects flattened end to end, with their shapes."""
    arrays = dict(
        pixels=np.concatenate([obj.rgba.reshape(-1, 4) for obj in bank.objects]),
        shapes=np.array([obj.rgba.shape[:2] for obj in bank.objects], dtype=np.int64),
        labels=np.array([obj.label for obj in bank.objects], dtype=np.int64),
        image_ids=np.array([obj.image_id for obj in bank.objects], dtype=np.int64),
        class_names=np.array(bank.class_names),
    )
    with utils.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_bank(path):
    with np.load(path, allow_pickle=False) as stored:
        pixels, shapes = stored["pixels"], stored["shapes"]
        ends = np.cumsum(shapes.prod(axis=1))
        objects = [BankObject(pixels[end - h * w:end].reshape(h, w, 4), int(label), int(image_id))
                   for (h, w), end, label, image_id in zip(shapes, ends, stored["labels"], stored["image_ids"])]
        return ObjectBank(objects, stored["class_names"].tolist())


# ---------------------------------------------------------------- pasting
def _region(array, paste):
    return array[paste.y:paste.y + paste.mask.shape[0], paste.x:paste.x + paste.mask.shape[1]]


def paste_image(image, pastes):
    """The image with each piece pasted (blended by its alpha on a soft edge), later pieces on top."""
    out = image.copy()
    for paste in pastes:
        region = _region(out, paste)
        pixels = paste.rgb
        if paste.alpha is not None:
            pixels = np.rint(paste.alpha * pixels + (1 - paste.alpha) * region)
        np.copyto(region, pixels, casting="unsafe", where=paste.mask[..., None])
    return out


def paint_pastes(target, pastes, values):
    """`target` (a label or instance map) with each piece's pixels set to its value, later pieces on top."""
    out = target.copy()
    for paste, value in zip(pastes, values):
        _region(out, paste)[paste.mask] = value
    return out


def _histogram(labels, mask=None):
    """Pixels per label value 0..255 (of the pixels under `mask` when given)."""
    return cv2.calcHist([labels], [0], mask, [256], [0, 256]).ravel().astype(np.float64)


class CopyPaste(A.DualTransform):
    """Paste bank objects into the image and make the mask follow, pixel for pixel.

    Put it before the preset's crop and resize (`build_transform(..., extra=[...])`).
    Each call pastes 1..max_objects objects drawn class-balanced, each scaled by a
    factor in `scale` (capped to fit the image), rotated by an angle in `rotate`
    (degrees), flipped half the time, and placed where it leaves every class in the
    image at least 1 - max_overlap of its pixels (objects that find no such place in
    a few tries are dropped). `soft_edge` > 0 ramps the blend over that many pixels
    inside the object's edge, from just over half object to all object, so every
    pixel labelled with the pasted class shows mostly the object. Called with an
    image alone (validation), it changes nothing. All randomness comes from the
    transform's own generators, so `Compose.set_random_seed` makes it repeatable.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(self, bank, p=0.5, max_objects=3, scale=(0.3, 2.0), rotate=(-30, 30), max_overlap=0.3,
                 soft_edge=0):
        super().__init__(p=p)
        if max_objects < 1 or not 0 < scale[0] <= scale[1] or not 0 <= max_overlap <= 1 or soft_edge < 0:
            raise ValueError(f"CopyPaste needs max_objects >= 1, 0 < scale[0] <= scale[1], 0 <= max_overlap <= 1 "
                             f"and soft_edge >= 0; got {max_objects}, {scale}, {max_overlap}, {soft_edge}")
        if not len(bank):
            raise ValueError("CopyPaste needs a bank with at least one object")
        self.bank, self.max_objects, self.max_overlap, self.soft_edge = bank, max_objects, max_overlap, soft_edge
        self.scale, self.rotate = tuple(scale), tuple(rotate)

    @property
    def targets(self):
        return {"image": self.apply, "mask": self.apply_to_mask}

    def get_params_dependent_on_data(self, params, data):
        mask = data.get("mask")
        return {"pastes": [] if mask is None else self.plan(mask, self.random_generator)}

    def apply(self, img, pastes=(), **params):
        return paste_image(img, pastes)

    def apply_to_mask(self, mask, pastes=(), **params):
        return paint_pastes(mask, pastes, [paste.label for paste in pastes])

    def plan(self, label_map, rng):
        """The pastes for one image with this label map (the map itself is not changed)."""
        current = np.ascontiguousarray(label_map, dtype=np.uint8)
        room = self.max_overlap * _histogram(current)  # pixels each class may still lose
        pastes = []
        for _ in range(rng.integers(1, self.max_objects + 1)):
            piece = self._piece(self.bank.sample(rng), current.shape, rng)
            placed = None if piece is None else self._place(piece, current, room, rng)
            if placed is None:
                continue
            paste, covered = placed
            current = paint_pastes(current, [paste], [paste.label])
            room -= covered
            room[paste.label] += self.max_overlap * paste.mask.sum()  # pasted objects are protected too
            pastes.append(paste)
        return pastes

    def _piece(self, obj, image_shape, rng):
        """The object scaled, rotated and maybe flipped, cropped to its mask: a Paste at (0, 0), or None."""
        rgba = obj.rgba[:, ::-1] if rng.random() < 0.5 else obj.rgba
        height, width = rgba.shape[:2]
        scale, angle = rng.uniform(*self.scale), rng.uniform(*self.rotate)
        cos, sin = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
        out_w, out_h = width * cos + height * sin, width * sin + height * cos
        scale = min(scale, (image_shape[1] - 2) / out_w, (image_shape[0] - 2) / out_h)  # fit the image
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
        size = int(np.ceil(out_w * scale)) + 2, int(np.ceil(out_h * scale)) + 2
        matrix[:, 2] += (size[0] - width) / 2, (size[1] - height) / 2
        warped = cv2.warpAffine(np.ascontiguousarray(rgba), matrix, size, flags=cv2.INTER_LINEAR)
        x, y, w, h = cv2.boundingRect((warped[..., 3] >= 128).view(np.uint8))
        mask = warped[y:y + h, x:x + w, 3] >= 128
        if mask.sum() < MIN_OBJECT_AREA:
            return None
        return Paste(0, 0, warped[y:y + h, x:x + w, :3], self._alpha(mask), mask, obj.label, obj.image_id)

    def _alpha(self, mask):
        """Blend weight on a soft edge: 1 inside, over the last `soft_edge` pixels down to just over 0.5."""
        if not self.soft_edge:
            return None
        padded = np.pad(mask.astype(np.uint8), 1)  # the edge of the piece is an edge of the object
        depth = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
        return np.minimum(1.0, 0.5 + 0.5 * depth / (self.soft_edge + 1)).astype(np.float32)[..., None]

    def _place(self, piece, current, room, rng):
        """(`piece` moved to a random place where no class loses more than its room, pixels covered per class).

        None when a few tries find no such place.
        """
        height, width = piece.mask.shape
        if height > current.shape[0] or width > current.shape[1]:
            return None
        mask = piece.mask.view(np.uint8)
        for _ in range(PLACEMENT_TRIES):
            y, x = int(rng.integers(current.shape[0] - height + 1)), int(rng.integers(current.shape[1] - width + 1))
            covered = _histogram(np.ascontiguousarray(current[y:y + height, x:x + width]), mask)
            if np.all(covered[1:255] <= room[1:255]):  # background (0) and ignore (255) may be covered freely
                return piece._replace(y=y, x=x), covered
        return None


def copy_paste_transforms(dataset, classes=None, p=0.5, max_objects=3, cache_dir=DEFAULT_CACHE_DIR, **options):
    """The `extra=` transforms for `presets.build_transform`: none when p == 0.

    The bank comes from `dataset`'s own images only (in k-fold mode, never from the
    fold's validation images).
    """
    if p <= 0:
        return []
    return [CopyPaste(ObjectBank.for_dataset(dataset, classes, cache_dir), p=p, max_objects=max_objects, **options)]


# ---------------------------------------------------------------- offline generation
def synthesize(dataset, paster, index, seed):
    """Offline image `index`: (RGB image, label map, instance map, category ids, sources).

    Sources: for each instance, (id of the image it comes from, whether it was pasted).

    The instance map holds 1..K for the visible part of each instance (source
    instances first, then the pasted ones), so the regions are disjoint and the
    label map is their labels.
    """
    coco = dataset.coco
    info = dataset.images[index % len(dataset)]
    rng = np.random.default_rng([seed, index])
    image = imaging.read_image(coco.image_path(info), (info["height"], info["width"]))
    instances, anns = instance_map(coco, info, dataset.paint_order)
    label_cats = [None] + [category["id"] for category in coco.categories]
    categories = [ann["category_id"] for ann in anns]
    labels = np.array([0] + [coco.cat_to_label[c] for c in categories], dtype=np.uint8)[instances]
    pastes = paster.plan(labels, rng)
    new_ids = range(len(categories) + 1, len(categories) + len(pastes) + 1)
    sources = [(info["id"], False)] * len(categories) + [(paste.image_id, True) for paste in pastes]
    categories += [label_cats[paste.label] for paste in pastes]
    return (paste_image(image, pastes), paint_pastes(labels, pastes, [paste.label for paste in pastes]),
            paint_pastes(instances, pastes, new_ids), categories, sources)


def visible_annotations(instances, categories, sources, image_id, first_id):
    """One COCO annotation (compressed RLE, iscrowd 0) per instance with visible pixels.

    Each records the image it was cut from (`source_image_id`) and whether it was pasted.
    """
    anns = []
    for k, (category_id, (source_id, pasted)) in enumerate(zip(categories, sources), start=1):
        region = instances == k
        if not region.any():
            continue  # entirely covered by later pastes
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        anns.append({"id": first_id + len(anns), "image_id": image_id, "category_id": int(category_id),
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                     "area": int(region.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                     "source_image_id": int(source_id), "pasted": pasted})
    return anns


def generate(data_root, json_name, out_dir, n, classes=None, seed=0, max_objects=3, cache_dir=DEFAULT_CACHE_DIR):
    """Write `n` pasted images under `out_dir` and their COCO json; returns the json's path."""
    dataset = data.SegmentationDataset(data_root, json_name, mode="val")
    bank = ObjectBank.for_dataset(dataset, classes, cache_dir)
    paster = CopyPaste(bank, p=1.0, max_objects=max_objects)
    images, annotations, used = [], [], set()
    for index in range(n):
        image, _, instances, categories, sources = synthesize(dataset, paster, index, seed)
        file_name = f"images/{index + 1:05d}.jpg"
        _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        utils.atomic_write_bytes(os.path.join(out_dir, file_name), jpeg.tobytes())
        photo_id = dataset.images[index % len(dataset)]["id"]
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1],
                       "source_image_id": photo_id})
        annotations += visible_annotations(instances, categories, sources, index + 1, len(annotations) + 1)
        used.update([photo_id] + [source_id for source_id, _ in sources])
    stem = os.path.splitext(os.path.basename(json_name))[0]
    path = os.path.join(out_dir, f"{stem}_copy_paste.json")
    # the sources, so that training can drop what was cut from its own validation images
    info = {"description": f"copy-paste of {bank!r} into the images of {dataset.coco.path}",
            "source_json": os.path.abspath(dataset.coco.path), "source_root": os.path.abspath(data_root),
            "source_hash": dataset.coco.content_hash, "seed": seed,
            "source_files": {str(image["id"]): image["file_name"] for image in dataset.images if image["id"] in used}}
    utils.atomic_write_json(path, {"info": info, "images": images, "annotations": annotations,
                                   "categories": dataset.coco.categories})
    return path


def images_not_from(json_path, val_dataset):
    """Ids of the images of a copy_paste.py json that show nothing of `val_dataset`'s images.

    An offline image shows a validation image when its photo is one, or when it holds
    an object cut from one: the whole image is dropped, since its pixels show that
    object even without its annotation. None for a json that copy_paste.py did not
    write (nothing to check); an older copy_paste.py json, which lacks the sources,
    is refused. A source is a validation image when its file is one, or -- only when
    the generator read the very json the validation set reads -- when its id is one.
    """
    with open(json_path) as f:
        coco = json.load(f)
    info = coco.get("info") or {}
    if "source_hash" not in info:
        return None
    if "source_files" not in info:
        raise utils.UserError(f"{json_path} was written by an older copy_paste.py that does not record where each "
                              f"pasted object comes from, so objects of this run's validation images cannot be "
                              f"dropped: write it again with python copy_paste.py --json JSON --out DIR")
    val_paths = {os.path.realpath(val_dataset.coco.image_path(image)) for image in val_dataset.images}
    val_ids = {image["id"] for image in val_dataset.images} if info["source_hash"] == val_dataset.coco.content_hash \
        else set()

    def from_val(source_id):
        file_name = info["source_files"][str(source_id)]
        return source_id in val_ids or os.path.realpath(os.path.join(info["source_root"], file_name)) in val_paths

    dropped = {image["id"] for image in coco["images"] if from_val(image["source_image_id"])}
    photos = len(dropped)
    pasted = [ann for ann in coco["annotations"] if ann["pasted"] and from_val(ann["source_image_id"])]
    dropped.update(ann["image_id"] for ann in pasted)
    kept = [image["id"] for image in coco["images"] if image["id"] not in dropped]
    print(f"{json_path}: dropped {len(dropped)} of {len(coco['images'])} images showing validation images of this "
          f"run: {len(pasted)} pasted objects cut from them, {photos} photos that are one")
    if not kept:
        raise utils.UserError(f"every image of {json_path} shows validation images of this run: write it again from "
                              f"the training images only (python copy_paste.py --json TRAIN_JSON --out DIR)")
    return kept


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data-root", default=data.DEFAULT_DATA_ROOT, help="dataset folder (default: the demo set)")
    parser.add_argument("--json", default="train.json", help="source json, relative to --data-root")
    parser.add_argument("--out", required=True, help="output folder for the images and the json")
    parser.add_argument("--n", type=utils.positive_int, default=1500, help="number of images to write")
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: the rarest two)")
    parser.add_argument("--max-objects", type=utils.positive_int, default=3, help="objects pasted per image, at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice and placement of the objects")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the object bank is cached")
    return parser


def main(args):
    data.prepare_data_root(args.data_root)
    coco_utils.require_json(args.data_root, args.json, "--json")
    path = generate(args.data_root, args.json, args.out, args.n, args.classes, args.seed, args.max_objects,
                    args.cache_dir)
    print(f"wrote {args.n} images and {path}")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
