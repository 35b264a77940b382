"""COCO json -> checked annotations -> label masks (cached), in torchvision's name for such helpers.

Holds: require_json (the json exists, or the fix), Coco (a json checked once, before any work), the other
checks (check_image_files: the image files match the json; check_same_classes: two class lists agree),
polygon and RLE decoding (clip_polygon, segmentation_rle, decode_annotation), painting (paint_sorted,
build_mask, PAINT_ORDERS), MaskCache (masks decoded once into files), and the counts of a json's
annotations (annotation_counts by category id, label_counts by label, object_areas per image).
"""
import collections
import hashlib
import json
import math
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

import images as imaging
from utils import IGNORE_INDEX, UserError, atomic_write_npy, atomic_write_png

PAINT_ORDERS = ("area", "vertices")
CACHE_VERSION = 1  # bump when the way masks are painted changes
# An explicit level swaps OpenCV's default PNG settings (SUB row filter, RLE strategy)
# for libpng's adaptive filters: the same pixels, and label maps decode about twice as fast.
MASK_PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1)
BACKGROUND = "Background"  # label 0, added before the json's categories
MAX_CATEGORIES = IGNORE_INDEX - 1  # labels 1..254 fit the uint8 masks; 255 stays "ignore"


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


def find_photos(paths):
    """(absolute path, file name) of the photos that folders (recursively), globs, files and COCO jsons
    name; a json gives its images, relative to its own folder, and its labels, if any, are not read."""
    found = []
    for path in paths:
        if os.fspath(path).lower().endswith(".json") and os.path.isfile(path):
            coco = Coco(path, os.path.dirname(os.path.abspath(path)), expect_annotations=False)
            found += [(os.path.abspath(coco.image_path(info)), info["file_name"]) for info in coco.images]
        else:
            found += imaging.find_images([path])
    return found


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
            if max(height, width) > imaging.OPENCV_MAX_SIDE or height * width > imaging.OPENCV_MAX_PIXELS:
                raise self._error(f"{where} is {width}x{height} (WxH), larger than OpenCV reads "
                                  f"({imaging.OPENCV_MAX_SIDE} pixels a side, {imaging.OPENCV_MAX_PIXELS} in all)")
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


def check_image_files(coco, images, max_pixels=imaging.MAX_IMAGE_PIXELS, shown=3):
    """Stop before any training when an image of `images` (entries of `coco`) is missing, unreadable, over
    `max_pixels`, or of another size than its json entry says: one error naming the json, the first `shown`
    files and the count, instead of a crash when a loader reaches the image.

    Sizes come from the file headers, EXIF orientation applied as read_image applies it: nothing is decoded.
    """
    problems = []
    for image in images:
        path, expected_hw = coco.image_path(image), (image["height"], image["width"])
        try:
            shown_hw = imaging.image_size(path, max_pixels)
        except (FileNotFoundError, UserError) as err:
            problems.append(str(err))
            continue
        if shown_hw != expected_hw:
            problems.append(imaging.size_mismatch_message(path, shown_hw, expected_hw))
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

    def __init__(self, coco, paint_order="area", cache_dir=imaging.DEFAULT_CACHE_DIR, raw=False):
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


# ---------------------------------------------------------------- counts
def annotation_counts(coco, images=None):
    """Annotations per category id in `images` (default: all of the json's)."""
    image_ids = coco.anns_by_image if images is None else [image["id"] for image in images]
    return collections.Counter(ann["category_id"] for image_id in image_ids for ann in coco.anns_by_image[image_id])


def label_counts(coco, images=None):
    """Annotations per label in `images` (default: all): an array indexed by label, 0 for Background."""
    counts = annotation_counts(coco, images)
    return np.array([0] + [counts[category["id"]] for category in coco.categories], dtype=np.int64)


def object_areas(coco, image):
    """(label, percent of the image it covers) of each of the image's annotations."""
    pixels = image["height"] * image["width"]
    return [(coco.cat_to_label[ann["category_id"]], 100.0 * ann["area"] / pixels)
            for ann in coco.anns_by_image[image["id"]]]
