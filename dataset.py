"""COCO json -> label masks (cached), the Dataset, augmentation presets and k-fold splits.

Run as a script to summarise a dataset or split off a subset (`make-demo` is an alias of demo.py):

    python dataset.py summary --root data/demo --json train_all.json
    python dataset.py summary --root data/demo --json train_all.json --report reports/demo --fold 0   # charts
    python dataset.py subset --root data/demo --json train.json --n 30   # train_30.json + train_30_rest.json
"""
import argparse
import bisect
import collections
import functools
import hashlib
import io
import itertools
import glob
import json
import math
import os
import stat
import struct

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import default_collate

import demo
from utils import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, HelpFormatter, UserError, atomic_write_json,
                   atomic_write_npy, atomic_write_png, format_class_table, run_main)

DEFAULT_DATA_ROOT = demo.DEFAULT_ROOT  # the synthetic demo set, built there on first use
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "recycleseg", "masks")
PAINT_ORDERS = ("area", "vertices")
AUGMENTATIONS = ("none", "light", "strong")
CACHE_VERSION = 1  # bump when the way masks are painted changes
# An explicit level swaps OpenCV's default PNG settings (SUB row filter, RLE strategy)
# for libpng's adaptive filters: the same pixels, and label maps decode about twice as fast.
MASK_PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1)
BACKGROUND = "Background"  # label 0, added before the json's categories
MAX_CATEGORIES = IGNORE_INDEX - 1  # labels 1..254 fit the uint8 masks; 255 stays "ignore"
MAX_IMAGE_PIXELS = 50_000_000  # about four 12-megapixel phone photos; scripts raise it with --max-image-pixels
OPENCV_MAX_SIDE, OPENCV_MAX_PIXELS = 1 << 20, 1 << 30  # OpenCV's own limits on images it reads


# ---------------------------------------------------------------- COCO json
def require_json(root, json_name, flag):
    """Stop with the fix when `root/json_name` (or an absolute json_name) is missing; `flag` names the json's option."""
    path = os.path.join(root, json_name)
    if os.path.isfile(path):
        return path
    if not os.path.isabs(json_name) and not os.path.isdir(root):
        raise UserError(f"data root {root} does not exist: pass --data-root with the folder that holds the COCO "
                        f"jsons and images, or leave it out for the demo set")
    folder = os.path.dirname(os.path.abspath(path))
    jsons = sorted(name for name in os.listdir(folder) if name.endswith(".json")) if os.path.isdir(folder) else []
    raise UserError(f"{path} does not exist: pass {flag} with one of {jsons or 'the jsons in ' + folder}")


class Coco:
    """A checked COCO json: images, annotations per image, and the class list.

    Class list = "Background" + category names in id order; a label is the index
    in that list. The whole json is checked once, before any work: problems that
    would corrupt masks or crash later stop with a UserError naming the json and
    the image, annotation or category id; problems that can be repaired without
    guessing (one unusable polygon part) are counted in `notes`.
    """

    def __init__(self, json_path, root, expect_annotations=True):
        self.path = os.fspath(json_path)
        self.root = os.fspath(root)
        data, self.content_hash = self._load(expect_annotations)
        self.notes = collections.Counter()
        self.categories = self._check_categories(data["categories"])
        self.class_names = [BACKGROUND] + [c["name"] for c in self.categories]
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.images = self._check_images(data["images"])
        annotations = data.get("annotations", [])
        if annotations and not expect_annotations:
            self.notes[f"annotations ignored ({len(annotations)}): this json is read as unlabelled"] += 1
            annotations = []
        self.anns_by_image = self._group_annotations(annotations)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def classes(self):
        """(category id, name) in label order: what two jsons must share for their labels to mean the same."""
        return [(c["id"], c["name"]) for c in self.categories]

    def image_path(self, image):
        return os.path.join(self.root, image["file_name"])

    def _error(self, what):
        return UserError(f"{self.path}: {what}")

    def _load(self, expect_annotations):
        """(parsed json, hash of its bytes) once its top level has the keys this split needs."""
        if not os.path.isfile(self.path):
            raise UserError(f"json file {self.path} does not exist")
        with open(self.path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw)
        except ValueError as err:  # JSONDecodeError or UnicodeDecodeError
            raise UserError(f"{self.path} is not valid json: {err}") from None
        if not isinstance(data, dict):
            raise self._error(f"the top level is a {type(data).__name__}, not an object with "
                              "'images', 'categories' and 'annotations'")
        for key in ("images", "categories", "annotations"):
            if key not in data:
                if key == "annotations" and not expect_annotations:
                    continue
                hint = (": it looks like an unlabelled (test) json; give a labelled json here"
                        if key == "annotations" else "")
                raise UserError(f"{self.path} has no '{key}' key{hint}")
            if not isinstance(data[key], list):
                raise self._error(f"'{key}' is a {type(data[key]).__name__}, not a list")
        return data, hashlib.sha1(raw).hexdigest()[:16]

    def _integer(self, record, key, where, positive=False):
        """record[key] as an int: json numbers with an integer value (512 or 512.0); strings are refused."""
        kind = "a positive integer" if positive else "an integer"
        if key not in record:
            raise self._error(f"{where} has no {key} ({kind})")
        value = record[key]
        number = _as_integer(value)
        if number is None or (positive and number < 1):
            quoted = " (a string: write the number without quotes)" if isinstance(value, str) else ""
            raise self._error(f"{where}: {key} must be {kind}, not {value!r}{quoted}")
        return number

    def _check_categories(self, categories):
        if not categories:
            raise UserError(f"{self.path} has no categories")
        if len(categories) > MAX_CATEGORIES:
            raise self._error(f"{len(categories)} categories, but at most {MAX_CATEGORIES} fit the uint8 label masks "
                              f"(label 0 is {BACKGROUND}, {IGNORE_INDEX} means ignore); merge or drop categories")
        checked, names = {}, {}
        for index, category in enumerate(categories):
            if not isinstance(category, dict):
                raise self._error(f"categories[{index}] is a {type(category).__name__}, not an object")
            cat_id = self._integer(category, "id", f"categories[{index}]")
            name = category.get("name")
            if not isinstance(name, str) or not name.strip():
                raise self._error(f"category {cat_id} needs a name (a non-empty string), not {name!r}")
            if cat_id in checked:
                raise self._error(f"category id {cat_id} appears twice ({checked[cat_id]['name']!r} and {name!r}); "
                                  "give each category its own id")
            key = name.strip().casefold()
            if key == BACKGROUND.casefold():
                raise self._error(f"category {cat_id} is named {name!r}, like the {BACKGROUND} class the toolkit adds "
                                  "as label 0 for unannotated pixels; remove this category or rename it")
            if key in names:
                raise self._error(f"categories {names[key]} and {cat_id} are both named {name!r}; "
                                  "give each category its own name")
            checked[cat_id], names[key] = dict(category, id=cat_id), cat_id
        return [checked[cat_id] for cat_id in sorted(checked)]

    def _check_images(self, images):
        if not images:
            raise UserError(f"{self.path} lists no images")
        checked, seen = [], set()
        root = os.path.abspath(self.root)
        for index, image in enumerate(images):
            if not isinstance(image, dict):
                raise self._error(f"images[{index}] is a {type(image).__name__}, not an object")
            image_id = self._integer(image, "id", f"images[{index}]")
            if image_id in seen:
                raise self._error(f"image id {image_id} appears twice")
            seen.add(image_id)
            where = f"image {image_id}"
            height = self._integer(image, "height", where, positive=True)
            width = self._integer(image, "width", where, positive=True)
            if max(height, width) > OPENCV_MAX_SIDE or height * width > OPENCV_MAX_PIXELS:
                raise self._error(f"{where} is {width}x{height} (WxH), larger than OpenCV reads "
                                  f"({OPENCV_MAX_SIDE} pixels a side, {OPENCV_MAX_PIXELS} in all)")
            name = image.get("file_name")
            if not isinstance(name, str) or not name:
                raise self._error(f"{where} needs a file_name (a non-empty string), not {name!r}")
            resolved = os.path.normpath(os.path.join(root, name))  # symlinked folders inside the root are fine
            if os.path.isabs(name) or not resolved.startswith(root + os.sep):
                raise self._error(f"image {image_id} file_name {name!r} resolves outside the data root {self.root}")
            checked.append(dict(image, id=image_id, height=height, width=width))
        return checked

    def _group_annotations(self, annotations):
        by_image = {image["id"]: [] for image in self.images}
        sizes = {image["id"]: (image["height"], image["width"]) for image in self.images}
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise self._error(f"annotations[{index}] is a {type(ann).__name__}, not an object")
            where = f"annotation {ann['id']}" if "id" in ann else f"annotations[{index}] (no id)"
            image_id = self._integer(ann, "image_id", where)
            category_id = self._integer(ann, "category_id", where)
            if category_id not in self.cat_to_label:
                raise self._error(f"{where} has unknown category id {category_id} (known: {sorted(self.cat_to_label)})")
            if image_id not in by_image:
                raise self._error(f"{where} refers to image id {image_id}, which is not in the json")
            height, width = sizes[image_id]
            segmentation = _usable_segmentation(self._segmentation(ann, where, image_id, height, width), height, width,
                                                self.notes)
            if segmentation is None:
                self.notes["annotations skipped: degenerate polygon (under 3 points, odd coordinate count "
                           "or zero area)"] += 1
                continue
            area = ann.get("area")
            if _as_number(area) is None or not area > 0:  # missing, zero or not a finite number: measure it
                area = float(mask_utils.area(segmentation_rle(segmentation, height, width)))
            by_image[image_id].append(dict(ann, image_id=image_id, category_id=category_id,
                                           segmentation=segmentation, area=area))
        return by_image

    def _segmentation(self, ann, where, image_id, height, width):
        """The annotation's polygons (each a flat list of finite numbers) or RLE; a bbox-only one becomes its box."""
        segmentation = ann.get("segmentation")
        if segmentation is None:
            if "bbox" not in ann:
                raise self._error(f"{where} has neither a segmentation nor a bbox")
            x, y, w, h = self._coordinates(ann["bbox"], where, "bbox", count=4)
            self.notes["annotations without a segmentation painted as their bbox"] += 1
            return [[x, y, x + w, y, x + w, y + h, x, y + h]]
        if isinstance(segmentation, dict):
            return self._checked_rle(segmentation, where, image_id, height, width)
        if not isinstance(segmentation, list):
            raise self._error(f"{where}: segmentation must be a list of polygons or an RLE object, "
                              f"not {type(segmentation).__name__}")
        if segmentation and all(_as_number(v) is not None for v in segmentation):
            self.notes["flat polygons (coordinates not nested in a list) read as one polygon"] += 1
            segmentation = [segmentation]
        return [self._coordinates(part, where, "polygon") for part in segmentation]

    def _coordinates(self, values, where, what, count=None):
        """A list of finite numbers, or a UserError naming the first bad value (NaN, inf, a string...)."""
        array = np.array(values) if isinstance(values, list) else None
        if array is not None and array.ndim == 1 and array.dtype.kind in "iuf" and np.isfinite(array).all() \
                and count in (None, len(values)):
            return values
        if not isinstance(values, list) or count not in (None, len(values)):
            shape = f"{count} numbers" if count else "a list of numbers"
            raise self._error(f"{where}: {what} must be {shape}, not {values!r:.80}")
        bad = next(v for v in values if _as_number(v) is None)
        raise self._error(f"{where}: {what} coordinate {bad!r:.40} is not a finite number; fix or remove this annotation")

    def _checked_rle(self, rle, where, image_id, height, width):
        size, counts = rle.get("size"), rle.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_as_integer(s) is not None for s in size)):
            raise self._error(f"{where}: RLE size must be [height, width], not {size!r:.40}")
        if [_as_integer(s) for s in size] != [height, width]:
            # an RLE cannot be clipped: its runs would wrap onto the wrong rows
            raise self._error(f"{where} has an RLE of size {list(size)} (HxW), but image {image_id} is "
                              f"{[height, width]}")
        if isinstance(counts, str):
            return rle
        if not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)
                and sum(counts) == height * width):
            raise self._error(f"{where}: RLE counts must be a string or run lengths (non-negative integers) "
                              f"that add up to height x width = {height * width}")
        return rle

    def report_notes(self):
        for note, count in sorted(self.notes.items()):
            print(f"{self.path}: {note}: {count}")


def check_image_files(coco, images, max_pixels=MAX_IMAGE_PIXELS, shown=3):
    """Stop before any training when an image of `images` (entries of `coco`) is missing, unreadable, over
    `max_pixels`, or of another size than its json entry says: one error naming the json, the first `shown`
    files and the count, instead of a crash when a loader reaches the image.

    Sizes come from the file headers, EXIF orientation applied as read_image applies it: nothing is decoded.
    """
    problems = []
    for image in images:
        path, expected_hw = coco.image_path(image), (image["height"], image["width"])
        try:
            shown_hw = image_size(path, max_pixels)
        except (FileNotFoundError, UserError) as err:
            problems.append(str(err))
            continue
        if shown_hw != expected_hw:
            problems.append(size_mismatch_message(path, shown_hw, expected_hw))
    if problems:
        more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
        raise UserError(f"{coco.path}: {len(problems)} of the {len(images)} images read from it are missing, "
                        f"unreadable or not the size listed: " + "; ".join(problems[:shown]) + more)


def check_same_classes(source, classes, reference, expected, fix="use the same categories (names and ids)"):
    """Refuse `source` unless its class list equals `reference`'s: its labels would mean other classes.

    Jsons compare `Coco.classes` (ids and names); checkpoints and pseudo-labels, which keep names only, `class_names`.
    `fix` tells the user what to do next.
    """
    classes, expected = list(classes), list(expected)
    if classes != expected:
        first = next((i for i, pair in enumerate(zip(classes, expected)) if pair[0] != pair[1]),
                     min(len(classes), len(expected)))
        ours, theirs = (names[first] if first < len(names) else "nothing" for names in (classes, expected))
        raise UserError(f"the classes of {source}, {classes}, differ from those of {reference}, {expected} "
                        f"(first difference: {ours!r} vs {theirs!r}): labels would mean different classes; {fix}")


def _as_number(value):
    """A json number that is finite (int or float; not bool, not a string); None for anything else."""
    if type(value) not in (int, float):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int too large for a float
        return None


def _as_integer(value):
    """An int from a json number with an integer value (512 or 512.0); None for anything else."""
    number = _as_number(value)
    if number is None or number != int(number):
        return None
    return int(number)


def _usable_segmentation(segmentation, height, width, notes):
    """Polygon parts that can be painted; None when nothing is left.

    Parts with fewer than 3 points, an odd number of coordinates or zero area
    are dropped and counted. Parts reaching more than one image size outside
    the image are cut to that margin first, so rasterising them costs memory in
    proportion to the image, not to the coordinates.
    """
    if isinstance(segmentation, dict):
        return segmentation
    parts = []
    for part in segmentation:
        if len(part) % 2:
            notes["polygon parts skipped: odd number of coordinates"] += 1
            continue
        if len(part) < 6:
            notes["polygon parts skipped: under 3 points"] += 1
            continue
        coords = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        if _polygon_area(coords) == 0:
            notes["polygon parts skipped: zero area"] += 1
            continue
        low, high = coords.min(0), coords.max(0)
        if low.min() < 0 or high[0] > width or high[1] > height:
            notes["polygons clipped to the image border"] += 1
        if low[0] < -width or low[1] < -height or high[0] > 2 * width or high[1] > 2 * height:
            coords = clip_polygon(coords, -width, -height, 2 * width, 2 * height)
            if len(coords) < 3 or _polygon_area(coords) == 0:
                continue  # wholly outside: paints nothing
            part = coords.ravel().tolist()
        parts.append(part)
    return parts or None


def _polygon_area(coords):
    x, y = coords[:, 0], coords[:, 1]  # shoelace formula; the last term closes the polygon
    return 0.5 * abs(np.dot(x[1:], y[:-1]) - np.dot(y[1:], x[:-1]) + x[0] * y[-1] - y[0] * x[-1])


def clip_polygon(coords, x_min, y_min, x_max, y_max):
    """Sutherland-Hodgman: an N x 2 polygon cut to an axis-aligned box (exact, the box being convex)."""
    for axis, bound, keep in ((0, x_min, np.greater_equal), (0, x_max, np.less_equal),
                              (1, y_min, np.greater_equal), (1, y_max, np.less_equal)):
        inside = keep(coords[:, axis], bound)
        cut = []
        for p, q, p_in, q_in in zip(coords, np.roll(coords, -1, 0), inside, np.roll(inside, -1)):
            if p_in:
                cut.append(p)
            if p_in != q_in:  # the edge crosses the bound: interpolate from its inside end, where it is exact
                a, b = (p, q) if p_in else (q, p)
                cut.append(a + (bound - a[axis]) / (b[axis] - a[axis]) * (b - a))
        coords = np.array(cut).reshape(-1, 2)
    return coords


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
# One reader for every script. Colour and greyscale JPEGs, nearly every photo, take a fast path:
# a walk over the JPEG's markers gives the size (checked against the pixel limit before anything is
# decoded) and shows whether the image data is complete (bytes after its end marker are fine:
# phones append videos and metadata), then OpenCV decodes it, applying the EXIF orientation.
# Everything else goes to Pillow, which recognises a file by its bytes (a PNG named .jpg is read as
# the PNG it is), reads the size from the header, applies EXIF orientation (ImageOps.exif_transpose)
# and converts each mode (16-bit, palette or alpha transparency, CMYK) explicitly. Pillow for every
# file would cost about 0.5 ms more per image (its header parsing in Python), which small images feel.
Image.MAX_IMAGE_PIXELS = None  # read_image's own limit replaces Pillow's global one, so a flag can raise it
READER_VERSION = 3  # part of DecodedImageCache's keys: bump when the decoded pixels of a file change
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ORIENTATION_TAG = 0x0112
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# formats people save photos in that Pillow cannot read: (offset, magic bytes, name)
UNREADABLE_FORMATS = ((4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"),
                      (4, b"ftypavif", "AVIF"), (0, b"%PDF", "PDF"), (0, b"PK\x03\x04", "ZIP"))
WHITE = (255, 255, 255, 255)
# a one-channel image's levels that map to 0..255: floats 0..1, integers (16-bit and 32-bit modes) 0..65535
LEVEL_RANGES = {"F": ("floating-point", 1.0), "I": ("32-bit integer", 65535), "I;16": ("16-bit", 65535)}
NOT_REGULAR_FILES = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
                     stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JpegLayout = collections.namedtuple("JpegLayout", "width height components complete")


def read_image(path, expected_hw=None, max_pixels=MAX_IMAGE_PIXELS):
    """RGB uint8 H x W x 3 pixels as a person sees the photo: EXIF orientation applied, any mode converted.

    Problems are errors naming the file: missing, not a regular file (or a link to none), empty, not an
    image, over `max_pixels`, truncated or corrupt, levels outside their range (see `to_rgb`), or another
    size than `expected_hw` (the json's), saying whether EXIF rotation explains it.
    """
    path = os.fspath(path)
    check_regular_file(path)
    with open(path, "rb") as f:
        rgb = decode_image(f.read(), path, max_pixels)
    if expected_hw is not None and rgb.shape[:2] != tuple(expected_hw):
        raise UserError(size_mismatch_message(path, rgb.shape[:2], expected_hw))
    return rgb


def decode_image(contents, path, max_pixels=MAX_IMAGE_PIXELS):
    """An image file's bytes -> RGB pixels, as read_image reads the file (`path` names it in messages).

    Colour and greyscale JPEGs take OpenCV's fast path; everything else goes through Pillow.
    """
    layout = jpeg_layout(contents)
    if layout is not None and layout.components in (1, 3):
        check_pixel_limit(path, layout.width, layout.height, max_pixels)
        return decode_jpeg(contents, path, layout.complete)
    return decode_with_pillow(contents, path, max_pixels)


def decode_jpeg(contents, path, complete):
    """A colour or greyscale JPEG -> RGB pixels, EXIF orientation applied (by OpenCV)."""
    if not complete:
        raise UserError(f"image file {path} is truncated (its JPEG image data has no end): copy it again or remove it")
    rgb = cv2.imdecode(np.frombuffer(contents, np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise UserError(f"image file {path} is a corrupt JPEG that cannot be decoded: copy it again or remove it")
    return rgb


def decode_with_pillow(contents, path, max_pixels):
    """Any image Pillow reads -> RGB pixels, EXIF orientation applied."""
    with open_image(path, max_pixels, contents) as image:
        try:
            image.load()  # decodes; a cut file fails here
            ImageOps.exif_transpose(image, in_place=True)
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"image file {path} is truncated or corrupt ({err}): copy it again or remove it") from None
        return to_rgb(image, path)


def jpeg_layout(contents):
    """(width, height, colour components, whether the image data runs to its end marker) of a JPEG;
    None when the bytes are not a JPEG or its header cannot be walked (Pillow then reports why).

    The header segments are skipped by their lengths (an embedded thumbnail's own end marker lies
    inside one); after the first scan, the markers outside entropy-coded data (FF followed by
    anything but 00, fill FF or a restart marker D0-D7) are walked in turn up to EOI.
    """
    if contents[:3] != b"\xff\xd8\xff":
        return None
    data = np.frombuffer(contents, np.uint8)
    pos, frame = 2, None
    while True:  # header segments, up to and including the first start-of-scan
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = int(data[pos + 1])
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_FRAME_MARKERS and pos + 10 <= len(data):
            height, width = int(data[pos + 5]) << 8 | int(data[pos + 6]), int(data[pos + 7]) << 8 | int(data[pos + 8])
            frame = (width, height, int(data[pos + 9]))
        pos += 2 + (int(data[pos + 2]) << 8 | int(data[pos + 3]))
        if marker == 0xDA:
            break
    if frame is None:
        return None
    ff = np.flatnonzero(data[pos:-1] == 0xFF) + pos
    following = data[ff + 1]
    is_marker = (following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))
    for at, marker in zip(ff[is_marker].tolist(), following[is_marker].tolist()):
        if at < pos:
            continue  # inside a segment already skipped (progressive JPEGs have several scans and tables)
        if marker == 0xD9:
            return JpegLayout(*frame, complete=True)
        if at + 4 > len(data):
            break
        pos = at + 2 + (int(data[at + 2]) << 8 | int(data[at + 3]))
    return JpegLayout(*frame, complete=False)


def open_image(path, max_pixels=MAX_IMAGE_PIXELS, contents=None):
    """The Pillow image of a file (header read, pixels not decoded), from `contents` when given; a
    UserError naming the file when it is not a regular file, empty, not an image Pillow reads, or over
    `max_pixels` (FileNotFoundError when it is missing)."""
    path = os.fspath(path)
    if contents is None:
        check_regular_file(path)
    if (len(contents) if contents is not None else os.path.getsize(path)) == 0:
        raise UserError(f"image file {path} is empty (0 bytes): copy it again or remove it")
    try:
        image = Image.open(io.BytesIO(contents) if contents is not None else path)
    except UnidentifiedImageError:
        raise UserError(f"image file {path} {_unreadable_reason(path, contents)}") from None
    except (OSError, SyntaxError, ValueError) as err:  # recognised, but its header is cut or damaged
        raise UserError(f"image file {path} is truncated or corrupt ({err}): copy it again or remove it") from None
    try:
        check_pixel_limit(path, *image.size, max_pixels)
    except UserError:
        image.close()
        raise
    return image


def check_regular_file(path):
    """FileNotFoundError when `path` is missing; a UserError naming it when it is not a regular file, so
    that nothing else is ever opened (a named pipe would block forever) or is a link that leads nowhere."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"image file {path} is a broken symbolic link (its target {os.path.realpath(path)} "
                            f"does not exist): fix or remove the link") from None
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except OSError as err:  # a symbolic link loop, a folder on the way that cannot be searched
        raise UserError(f"image file {path} cannot be opened ({err.strerror}): fix or remove it") from None
    if not stat.S_ISREG(mode):
        kind = NOT_REGULAR_FILES.get(stat.S_IFMT(mode), "a special file")
        raise UserError(f"image file {path} is {kind}, not a regular file: remove it or name an image file")


class ImageTooLarge(UserError):
    """An image over the pixel limit; `width` and `height` say its size."""

    def __init__(self, message, width, height):
        super().__init__(message)
        self.width, self.height = width, height


def check_pixel_limit(path, width, height, max_pixels):
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"image file {path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                        f"limit of {max_pixels / 1e6:g} (a guard against decompression bombs); if the photo is "
                        f"genuine, raise the limit with --max-image-pixels", width, height)


def _unreadable_reason(path, contents=None):
    if contents is None:
        with open(path, "rb") as f:
            contents = f.read(16)
    head = contents[:16]
    for offset, magic, name in UNREADABLE_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            return f"is a {name} file, which this toolkit does not read: convert it to JPEG or PNG"
    for magic, name in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG")):
        if head.startswith(magic):
            return f"is a {name} whose header is truncated or corrupt: copy it again or remove it"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ("is a TIFF that Pillow cannot read (e.g. floating-point colour, or a damaged header): "
                "convert it to 8- or 16-bit RGB, or remove it")
    return "is not an image this toolkit can read (its bytes match no known format): convert it to JPEG or PNG, or remove it"


def exif_orientation(image):
    """The EXIF orientation tag of a Pillow image, 1 (as stored) when absent or not one of the 8 values.

    Read without decoding pixels: Pillow's PNG reader decodes a whole PNG to look for an eXIf chunk
    after the pixel data, so here the chunk list is walked instead.
    """
    if image.format == "PNG" and "exif" not in image.info and image.fp is not None:
        body = png_chunk(image.fp, b"eXIf")
        if body is not None:
            image.info["exif"] = b"Exif\x00\x00" + body  # what Pillow's reader stores there after decoding
        exif = Image.Image.getexif(image)  # the base class's: reads `info`, never the pixels
    else:
        exif = image.getexif()
    value = exif.get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def png_chunk(f, kind):
    """The body of a PNG file's first `kind` chunk, None when absent or cut off: the chunks are walked by
    their lengths (pixel data skipped, not read), and `f` is left where it was."""
    start = f.tell()
    try:
        f.seek(8)  # the PNG signature
        while len(head := f.read(8)) == 8:
            length, name = struct.unpack(">I4s", head)
            if name == kind:
                body = f.read(length)
                return body if len(body) == length else None
            if name == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the body and its CRC
        return None
    finally:
        f.seek(start)


def to_rgb(image, path):
    """A decoded Pillow image in any mode -> H x W x 3 uint8 (`path` names it in messages).

    Transparency is laid over white, palettes and CMYK go through Pillow's conversion, greyscale is
    repeated in the three channels. Levels are scaled to 8 bits from their range, not clipped:
    16-bit (and 32-bit integer) levels from 0..65535, floating-point ones (e.g. a float TIFF) from
    0..1; levels outside that range are refused (a UserError), not guessed at.
    """
    if image.mode[:4] in LEVEL_RANGES:  # "I;16B" and the other byte orders of "I;16" included
        return np.repeat(scaled_levels(image, path)[..., None], 3, axis=2)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy, as the transforms and torch.from_numpy want


def scaled_levels(image, path):
    """A one-channel image of 16-bit, 32-bit integer or floating-point levels -> uint8, scaled from its range."""
    kind, top = LEVEL_RANGES[image.mode[:4]]
    levels = np.asarray(image, dtype=np.float32)
    low, high = levels.min(), levels.max()
    if not (low >= 0 and high <= top):  # also false for NaN
        raise UserError(f"image file {path} is a {kind} image with levels from {low:g} to {high:g}, outside "
                        f"0..{top:g}: save it as 8- or 16-bit (its levels scaled as they should be shown), or remove it")
    return np.round(levels * np.float32(255 / top)).astype(np.uint8)


def size_mismatch_message(path, shown_hw, expected_hw):
    """Why an image's size differs from its json entry, and what to do (EXIF rotation or not)."""
    with open_image(path, max_pixels=None) as image:
        stored_size, orientation = image.size, exif_orientation(image)
    shown = f"{shown_hw[1]}x{shown_hw[0]}"
    expected = f"{expected_hw[1]}x{expected_hw[0]}"
    if orientation in ROTATING_ORIENTATIONS and tuple(stored_size) == (expected_hw[1], expected_hw[0]):
        return (f"image file {path} is {shown} (WxH) as displayed, after its EXIF orientation {orientation} "
                f"(a quarter turn), but the json says {expected}, the size of the stored pixels before that "
                f"rotation: if the annotations were drawn on the unrotated pixels, strip the orientation tag "
                f"(e.g. exiftool -Orientation= FILE); if they were drawn on the photo as displayed, fix the json's "
                f"width and height")
    rotation = f"its EXIF orientation {orientation} does not explain it" if orientation != 1 else "it has no EXIF rotation"
    return (f"image file {path} is {shown} (WxH) but the json says {expected} ({rotation}): "
            f"fix the json's width and height, or use the file the json was made for")


def image_size(path, max_pixels=MAX_IMAGE_PIXELS):
    """(height, width) as displayed (EXIF orientation applied), from the header alone: no decoding."""
    with open_image(path, max_pixels) as image:
        width, height = image.size
        if exif_orientation(image) in ROTATING_ORIENTATIONS:
            width, height = height, width
    return height, width


class DecodedImageCache:
    """Decoded RGB pixels stored raw (.npy), so later epochs skip JPEG decoding.

    Costs H*W*3 bytes of disk per image (768 KB at 512x512); keyed by the image
    file's path, size and modification time, so a changed file is decoded again.
    """

    def __init__(self, cache_dir=DEFAULT_CACHE_DIR, max_pixels=MAX_IMAGE_PIXELS):
        self.folder = os.path.join(cache_dir, "decoded")
        self.max_pixels = max_pixels

    def read(self, path, expected_hw=None):
        try:
            info = os.stat(path)
        except OSError:
            return read_image(path, expected_hw)  # raises the error that names the problem
        key = f"{os.path.abspath(path)}|{info.st_size}|{info.st_mtime_ns}|{READER_VERSION}"
        cached = os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest()[:20] + ".npy")
        if os.path.isfile(cached):
            return np.load(cached)
        image = read_image(path, expected_hw, self.max_pixels)
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
                 image_ids=None, cache_dir=DEFAULT_CACHE_DIR, cache_images=False, max_pixels=MAX_IMAGE_PIXELS):
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
        self.read_image = (DecodedImageCache(cache_dir, max_pixels).read if cache_images
                           else functools.partial(read_image, max_pixels=max_pixels))

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

    def __init__(self, paths, transform, skip_dir=None, max_pixels=MAX_IMAGE_PIXELS):
        self.transform, self.max_pixels = transform, max_pixels
        self.images, self.skipped = readable_images(find_images(paths, skip_dir), max_pixels, paths)
        check_unique_stems(info["file_name"] for info in self.images)

    @staticmethod
    def image_path(info):
        return info["path"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        try:
            image = read_image(info["path"], max_pixels=self.max_pixels)
        except UserError as err:
            return err, info["file_name"]
        return self.transform(image=image)["image"], info["file_name"]


def readable_images(found, max_pixels, paths):
    """(image records, reasons skipped) of the (path, file name) pairs whose headers read within the limit.

    Each skipped file is printed; none readable is an error naming `paths`, what the user gave.
    """
    images, skipped = [], []
    for path, file_name in found:
        try:
            image_size(path, max_pixels)
        except UserError as err:
            skipped.append(str(err))
            continue
        images.append({"id": None, "file_name": file_name, "path": path})
    for reason in skipped:
        print(f"skipped: {reason}")
    if not images:
        raise UserError(f"no readable {'/'.join(IMAGE_EXTENSIONS)} image in {' '.join(map(str, paths))}")
    return images, skipped


def find_images(paths, skip_dir=None):
    """(absolute path, file name) of the images that files, folders (recursively) and globs name, sorted.

    A file is taken whatever its extension (its bytes decide); in folders, files with an image
    extension. `skip_dir` (an output folder) is left out, so outputs never become inputs. Entries
    that are not regular files (named pipes, links that lead nowhere) are listed too: the reader
    refuses them without opening them, so they are skipped and counted like any unreadable file.
    """
    skip = os.path.realpath(skip_dir) if skip_dir else None
    found = {}
    for pattern in paths:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.lexists(m) for m in matches):
            raise UserError(f"{pattern} matches no file or folder")
        for match in matches:
            if not os.path.isdir(match):
                found.setdefault(os.path.abspath(match), os.path.basename(match))
                continue
            for folder, subfolders, files in os.walk(match):
                subfolders[:] = sorted(d for d in subfolders if os.path.realpath(os.path.join(folder, d)) != skip)
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        path = os.path.join(folder, name)
                        found.setdefault(os.path.abspath(path), os.path.relpath(path, match))
    return sorted(found.items(), key=lambda item: item[1])


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
        image = read_image(item["image"], mask.shape)
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


def annotation_counts(coco, images=None):
    """Annotations per category id in `images` (default: all of the json's)."""
    image_ids = coco.anns_by_image if images is None else [image["id"] for image in images]
    return collections.Counter(ann["category_id"] for image_id in image_ids for ann in coco.anns_by_image[image_id])


def by_rarity(counts):
    """Sort key over the keys of `counts` (category ids or labels): fewest annotations first, then the lower key."""
    return lambda key: (counts[key], key)


def rarest_classes(dataset, count=RARE_CLASS_COUNT):
    """Names of the `count` categories with the fewest annotations in the dataset's images (at least one)."""
    counts = annotation_counts(dataset.coco, dataset.images)
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
        if not 0 < max_ratio <= 1:
            raise UserError(f"--crop-max-ratio must be above 0 and at most 1, not {max_ratio}: it is the largest "
                            f"share of a crop's labelled pixels one class may cover (e.g. 0.75)")
        if tries < 1:
            raise ValueError(f"RareClassCrop needs tries >= 1, got {tries}")
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
        raise UserError(f"--crop-rare crops with the light or strong augmentation, not --aug {preset}: pass --aug "
                        f"light or --aug strong, or drop --crop-rare")
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
    counts = annotation_counts(coco)
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


def write_subset(root, json_name, n, seed=0, unlabeled_rest=False):
    """Split a json's images into `n` drawn at random (seeded) and the rest.

    Writes STEM_N.json and STEM_N_rest.json next to it, each with its images'
    annotations (e.g. few-label experiments: train on one, pseudo-label the other);
    with `unlabeled_rest`, STEM_N_unlabeled.json instead, the rest without annotations
    (an unlabelled pool for train.py --unlabeled).
    """
    path = os.path.join(root, json_name)
    Coco(path, root)  # refuses a json the training would refuse, before anything is written
    with open(path) as f:
        coco = json.load(f)
    image_ids = [image["id"] for image in coco["images"]]
    if not 0 < n < len(image_ids):
        raise UserError(f"{path} has {len(image_ids)} images; the subset size must be 1..{len(image_ids) - 1}, not {n}: "
                        f"pass another --n")
    chosen = set(np.random.default_rng(seed).choice(image_ids, n, replace=False).tolist())
    stem = os.path.splitext(json_name)[0]
    written = []
    rest = f"_{n}_unlabeled" if unlabeled_rest else f"_{n}_rest"
    for suffix, inside in ((f"_{n}", True), (rest, False)):
        part = dict(coco, images=[im for im in coco["images"] if (im["id"] in chosen) == inside],
                    annotations=[a for a in coco.get("annotations", [])
                                 if (a["image_id"] in chosen) == inside and (inside or not unlabeled_rest)])
        written.append(os.path.join(root, stem + suffix + ".json"))
        atomic_write_json(written[-1], part)
    return written


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


def summarise(root, json_name, paint_order="area"):
    dataset = SegmentationDataset(root, json_name, mode="val", paint_order=paint_order)
    dataset.coco.report_notes()
    anns = annotation_counts(dataset.coco)
    pixels = pixel_counts(dataset)
    print(f"{json_name}: {len(dataset)} images")
    annotations = ["-"] + [anns.get(category["id"], 0) for category in dataset.coco.categories]
    shares = pixels / pixels.sum()
    print(format_class_table(dataset.class_names, [("annotations", annotations), ("pixel share", shares)]))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_demo_args(commands.add_parser("make-demo", help="build the synthetic demo dataset (as python demo.py)",
                                          formatter_class=HelpFormatter))
    summary = commands.add_parser("summary", help="annotation and pixel counts per class",
                                  formatter_class=HelpFormatter)
    summary.add_argument("--root", default=DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    summary.add_argument("--json", default="train_all.json", help="json file, relative to the root")
    summary.add_argument("--paint-order", choices=PAINT_ORDERS, default="area",
                         help="overlap rule when painting annotations (as train.py's)")
    summary.add_argument("--report", default=None, metavar="DIR",
                         help="also write charts, report.json and index.html to this folder (see docs/reports.md)")
    summary.add_argument("--fold", type=int, default=None,
                         help="with --report: chart the per-fold class balance of train.py's k-fold split")
    summary.add_argument("--n-folds", type=int, default=5, help="with --fold: number of folds (as train.py's)")
    summary.add_argument("--fold-seed", type=int, default=0, help="with --fold: seed of the split (as train.py's)")
    subset = commands.add_parser("subset", help="split a json into N random images and the rest",
                                 formatter_class=HelpFormatter)
    subset.add_argument("--root", default=DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    subset.add_argument("--json", default="train.json", help="json file, relative to the root")
    subset.add_argument("--n", type=int, required=True, help="images in the subset")
    subset.add_argument("--seed", type=int, default=0, help="seed of the random choice of images")
    subset.add_argument("--unlabeled-rest", action="store_true",
                        help="write the rest without annotations, as STEM_N_unlabeled.json (for train.py --unlabeled)")
    return parser


def main(args):
    if args.command == "make-demo":
        return demo.main(args)
    if args.command == "summary" and args.fold is not None:
        check_summary_fold(args)
    prepare_data_root(args.root)
    require_json(args.root, args.json, "--json")
    if args.command == "subset":
        print("wrote " + " and ".join(write_subset(args.root, args.json, args.n, args.seed, args.unlabeled_rest)))
    else:
        summarise(args.root, args.json, args.paint_order)
        if args.report:
            write_summary_report(args)


def check_summary_fold(args):
    """summary --fold charts a fold of the split in the --report: nothing else shows it."""
    if not args.report:
        raise UserError("summary --fold charts that fold's class balance in the report: add --report DIR, or drop "
                        "--fold")
    check_fold(args.fold, args.n_folds)


def write_summary_report(args):
    import report  # matplotlib is loaded only when a report is asked for

    dataset = SegmentationDataset(args.root, args.json, mode="val", paint_order=args.paint_order)
    print("wrote " + report.write_dataset_report(dataset, args.report, args.fold, args.n_folds, args.fold_seed))


if __name__ == "__main__":
    run_main(main, get_args_parser())
