import json
import math
import os
import re

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import coco_utils
import dataset
from coco_utils import Coco, MaskCache, build_mask, decode_annotation
from dataset import SegmentationDataset, fold_image_ids, kfold_splits
from presets import LutNormalize, build_transform
from utils import IMAGENET_MEAN, IMAGENET_STD, UserError

H, W = 32, 32
CATEGORIES = [{"id": 1, "name": "paper"}, {"id": 2, "name": "plastic"}]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRASHBAGS = os.path.join(REPO, "..", "shared", "data", "trashbags")
# pycocotools' decode predates numpy 2's copy keyword; the warning says nothing about this code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- builders
def rect(x0, y0, x1, y1):
    """Polygon of the box; pycocotools fills rows y0..y1-1 and columns x0..x1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def sample_rgb(height=H, width=W):
    """Distinct channels (R constant, G ramp, B constant) so a BGR/RGB swap shows."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = (np.arange(width) * 7 % 256)[None, :]
    rgb[..., 2] = 30
    return rgb


def write_image(path, height=H, width=W):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), sample_rgb(height, width)[..., ::-1])


def annotation(ann_id, image_id, category_id, segmentation, iscrowd=0, height=H, width=W):
    """A COCO annotation with the area pycocotools computes, as real jsons carry."""
    rle = coco_utils.segmentation_rle(segmentation, height, width)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(mask_utils.area(rle)), "iscrowd": iscrowd}


def image_entry(image_id, file_name=None, height=H, width=W):
    return {"id": image_id, "file_name": file_name or f"images/{image_id:04d}.png", "height": height, "width": width}


def write_coco(root, annotations=(), images=None, categories=CATEGORIES, name="train.json", write_images=True):
    """Write a COCO json (and, by default, its image files) under `root`; returns the json path."""
    images = images if images is not None else [image_entry(1)]
    if write_images:
        for image in images:
            path = os.path.join(root, image["file_name"])
            if not os.path.exists(path):
                write_image(path, image["height"], image["width"])
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": list(annotations), "categories": categories}, f)
    return path


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask):
    """Run lengths of the column-major pixels, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def reference_mask(json_path, image_id, paint_order):
    """Label map painted with pycocotools' own annToMask, in the same order."""
    coco = COCO(json_path)
    labels = {cat_id: i + 1 for i, cat_id in enumerate(sorted(coco.getCatIds()))}
    info = coco.loadImgs(image_id)[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    if paint_order == "area":
        anns = sorted(anns, key=lambda a: -a["area"])
    else:
        anns = sorted(anns, key=lambda a: len(a["segmentation"][0]) if isinstance(a["segmentation"], list) else 0)
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for ann in anns:
        mask[coco.annToMask(ann) == 1] = labels[ann["category_id"]]
    return mask


def random_polygon(rng, n_points):
    """Star-shaped polygon with float coordinates, sometimes crossing the border."""
    centre = rng.uniform(4, 28, 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_points))
    radii = rng.uniform(3, 14, n_points)
    points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    return np.round(points, 2).ravel().tolist()


def open_dataset(tmp_path, json_path, mode="val", **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return SegmentationDataset(str(tmp_path), json_path, mode=mode, **kwargs)


# ---------------------------------------------------------------- COCO -> mask
# Big square (16 coordinates: corners and edge midpoints) around a small one (8 coordinates).
BIG = [2, 2, 16, 2, 30, 2, 30, 16, 30, 30, 16, 30, 2, 30, 2, 16]
SMALL = rect(10, 10, 20, 20)


def overlapping_coco(tmp_path):
    """Image 1 lists the small square first, image 2 the big one first."""
    anns = [annotation(1, 1, 2, [SMALL]), annotation(2, 1, 1, [BIG]),
            annotation(3, 2, 1, [BIG]), annotation(4, 2, 2, [SMALL])]
    return write_coco(str(tmp_path), anns, images=[image_entry(1), image_entry(2)])


def test_area_order_paints_small_objects_on_top(tmp_path):
    coco = Coco(overlapping_coco(tmp_path), str(tmp_path))
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[2:30, 2:30] = 1
    expected[10:20, 10:20] = 2
    for image in coco.images:
        np.testing.assert_array_equal(build_mask(coco, image, "area"), expected)


def test_vertices_order_paints_more_coordinates_on_top(tmp_path):
    coco = Coco(overlapping_coco(tmp_path), str(tmp_path))
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[2:30, 2:30] = 1  # the big square has more coordinates: painted last, hides the small one
    for image in coco.images:
        np.testing.assert_array_equal(build_mask(coco, image, "vertices"), expected)


def test_multi_part_polygon(tmp_path):
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 2, [rect(1, 1, 5, 5), rect(20, 22, 26, 28)])])
    coco = Coco(json_path, str(tmp_path))
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[1:5, 1:5] = 2
    expected[22:28, 20:26] = 2
    np.testing.assert_array_equal(build_mask(coco, coco.images[0]), expected)


def l_shape():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[3:25, 4:9] = 1
    mask[20:25, 4:30] = 1
    mask[0, 31] = 1  # a corner pixel: the column-major runs must end right
    return mask


@pytest.mark.parametrize("encode, iscrowd", [(compressed_rle, 0), (compressed_rle, 1), (uncompressed_rle, 1)])
def test_rle_annotations(tmp_path, encode, iscrowd):
    shape = l_shape()
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 1, encode(shape), iscrowd=iscrowd)])
    coco = Coco(json_path, str(tmp_path))
    np.testing.assert_array_equal(build_mask(coco, coco.images[0]), shape)


def mixed_coco(tmp_path):
    """Three images with overlapping float polygons, multi-part ones, both RLE kinds and border crossings."""
    rng = np.random.default_rng(0)
    images = [image_entry(i) for i in (1, 2, 3)]
    anns, ann_id = [], 0
    for image in images:
        for _ in range(6):
            ann_id += 1
            parts = [random_polygon(rng, int(rng.integers(3, 9))) for _ in range(int(rng.integers(1, 3)))]
            anns.append(annotation(ann_id, image["id"], int(rng.integers(1, 3)), parts))
    anns.append(annotation(100, 2, 1, compressed_rle(l_shape()), iscrowd=1))
    anns.append(annotation(101, 3, 2, uncompressed_rle(l_shape()[::-1]), iscrowd=1))
    return write_coco(str(tmp_path), anns, images=images)


def test_each_annotation_decodes_like_pycocotools(tmp_path):
    json_path = mixed_coco(tmp_path)
    coco, reference = Coco(json_path, str(tmp_path)), COCO(json_path)
    decoded = 0
    for image in coco.images:
        for ann in coco.anns_by_image[image["id"]]:
            ours = decode_annotation(ann, image["height"], image["width"])
            np.testing.assert_array_equal(ours, reference.annToMask(reference.anns[ann["id"]]))
            decoded += 1
    assert decoded == len(reference.anns) == 20


@pytest.mark.parametrize("paint_order", ["area", "vertices"])
def test_full_mask_matches_a_pycocotools_painter(tmp_path, paint_order):
    json_path = mixed_coco(tmp_path)
    ds = open_dataset(tmp_path, json_path, paint_order=paint_order)
    assert ds.paint_order == paint_order  # what copy-paste cuts objects out by
    for index, image in enumerate(ds.images):
        expected = reference_mask(json_path, image["id"], paint_order)
        assert len(np.unique(expected)) == 3  # every image shows both classes and background
        np.testing.assert_array_equal(ds.label_mask(index), expected)  # read back from the cache PNG
        np.testing.assert_array_equal(ds[index][1].numpy(), expected)


def test_paint_orders_differ_on_the_mixed_data(tmp_path):
    json_path = mixed_coco(tmp_path)
    coco = Coco(json_path, str(tmp_path))
    assert any(not np.array_equal(build_mask(coco, image, "area"), build_mask(coco, image, "vertices"))
               for image in coco.images)


# ---------------------------------------------------------------- json checks
def test_unknown_category_names_the_annotation_and_the_json(tmp_path):
    json_path = write_coco(str(tmp_path), [annotation(41, 1, 1, [SMALL]), annotation(42, 1, 9, [SMALL])])
    with pytest.raises(ValueError, match=re.escape(f"{json_path}: annotation 42 has unknown category id 9")):
        Coco(json_path, str(tmp_path))


def test_duplicate_image_ids(tmp_path):
    json_path = write_coco(str(tmp_path), images=[image_entry(5, "images/a.png"), image_entry(5, "images/b.png")])
    with pytest.raises(ValueError, match=re.escape(f"{json_path}: image id 5 appears twice")):
        Coco(json_path, str(tmp_path))


@pytest.mark.parametrize("file_name", ["../outside.png", "images/../../outside.png", "/etc/passwd"])
def test_file_names_outside_the_root_are_refused(tmp_path, file_name):
    root = tmp_path / "data"
    json_path = write_coco(str(root), images=[image_entry(1, file_name)], write_images=False)
    with pytest.raises(ValueError, match="resolves outside the data root") as err:
        Coco(json_path, str(root))
    assert json_path in str(err.value) and file_name in str(err.value)


def test_missing_image_file(tmp_path):
    json_path = write_coco(str(tmp_path), images=[image_entry(1, "images/missing.jpg")], write_images=False)
    ds = open_dataset(tmp_path, json_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "missing.jpg"))):
        ds[0]


def jpeg_bytes():
    ok, buf = cv2.imencode(".jpg", sample_rgb())
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("content, message", [
    (lambda: np.random.default_rng(0).bytes(2000), "is not an image"),
    (lambda: np.random.default_rng(1).bytes(2000) + b"\xff\xd9", "is not an image"),
    (lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated"),
    (lambda: b"", "is empty"),
])
def test_broken_jpeg_names_the_file(tmp_path, content, message):
    path = tmp_path / "images" / "0001.jpg"
    path.parent.mkdir()
    path.write_bytes(content())
    json_path = write_coco(str(tmp_path), images=[image_entry(1, "images/0001.jpg")], write_images=False)
    with pytest.raises(ValueError, match=re.escape(f"image file {path} ")) as err:
        open_dataset(tmp_path, json_path)[0]
    assert message in str(err.value)


def test_image_size_different_from_the_json(tmp_path):
    write_image(str(tmp_path / "images" / "0001.png"), height=32, width=40)
    json_path = write_coco(str(tmp_path), images=[image_entry(1)], write_images=False)
    message = f"{tmp_path / 'images' / '0001.png'} is 40x32 (WxH) but the json says 32x32"
    with pytest.raises(ValueError, match=re.escape(message)):
        open_dataset(tmp_path, json_path)[0]


def test_degenerate_polygons_are_skipped_and_counted(tmp_path):
    raw = {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 20, 20]], "iscrowd": 0}  # 2 points
    flat = {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, 10, 10, 20, 20]], "iscrowd": 0}
    partly = {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [rect(20, 20, 24, 24), [5, 5, 6, 6]],
              "iscrowd": 0}
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 1, [rect(2, 2, 6, 6)]), raw, flat, partly])
    coco = Coco(json_path, str(tmp_path))
    skipped = {note: count for note, count in coco.notes.items() if note.startswith("annotations skipped")}
    assert list(skipped.values()) == [2] and "degenerate" in next(iter(skipped))
    assert sum(count for note, count in coco.notes.items() if note.startswith("polygon parts skipped")) == 3
    assert [ann["id"] for ann in coco.anns_by_image[1]] == [1, 4]
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[2:6, 2:6] = 1
    expected[20:24, 20:24] = 1  # the 2-point part of annotation 4 is not read as a box
    np.testing.assert_array_equal(build_mask(coco, coco.images[0]), expected)


def test_test_mode_ignores_annotations_with_a_note(tmp_path):
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 1, [SMALL])], name="test.json")
    ds = open_dataset(tmp_path, json_path, mode="test")
    assert ds.coco.anns_by_image == {1: []}
    assert any("annotations ignored" in note for note in ds.coco.notes)
    image, file_name = ds[0]
    assert file_name == "images/0001.png" and image.shape == (3, H, W)


def test_class_list_follows_category_ids(tmp_path):
    categories = [{"id": 7, "name": "paper"}, {"id": 3, "name": "metal"}]
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 7, [SMALL]), annotation(2, 1, 3, [rect(0, 0, 4, 4)])],
                           categories=categories)
    ds = open_dataset(tmp_path, json_path)
    assert ds.class_names == ["Background", "metal", "paper"]
    mask = ds.label_mask(0)
    assert mask[15, 15] == 2 and mask[1, 1] == 1 and mask[31, 31] == 0


# ---------------------------------------------------------------- mask cache
def test_second_access_reads_the_cached_png(tmp_path, monkeypatch):
    json_path = overlapping_coco(tmp_path)
    first = open_dataset(tmp_path, json_path)
    masks = [first.label_mask(i) for i in range(len(first))]
    assert sorted(os.listdir(first.masks.folder)) == ["1.png", "2.png"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("mask rebuilt although it is cached")

    monkeypatch.setattr(coco_utils, "build_mask", no_rebuild)
    again = open_dataset(tmp_path, json_path)
    assert again.masks.folder == first.masks.folder
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(again.label_mask(index), mask)
        assert again.label_mask(index).dtype == np.uint8


def test_changed_json_uses_a_new_cache_folder(tmp_path):
    json_path = write_coco(str(tmp_path), [annotation(1, 1, 1, [rect(0, 0, 8, 8)])])
    before = open_dataset(tmp_path, json_path)
    assert before.label_mask(0)[4, 4] == 1
    write_coco(str(tmp_path), [annotation(1, 1, 1, [rect(16, 16, 24, 24)])])  # same path, new content
    after = open_dataset(tmp_path, json_path)
    assert after.masks.folder != before.masks.folder
    assert after.label_mask(0)[4, 4] == 0 and after.label_mask(0)[20, 20] == 1


def test_paint_order_uses_its_own_cache_folder(tmp_path):
    coco = Coco(overlapping_coco(tmp_path), str(tmp_path))
    by_area = MaskCache(coco, "area", str(tmp_path / "cache"))
    by_vertices = MaskCache(coco, "vertices", str(tmp_path / "cache"))
    assert by_area.folder != by_vertices.folder
    assert by_area.get(coco.images[0])[15, 15] == 2 and by_vertices.get(coco.images[0])[15, 15] == 1
    with pytest.raises(ValueError, match="unknown paint order"):
        MaskCache(coco, "json", str(tmp_path / "cache"))


def test_cache_images_gives_the_same_items_and_redecodes_a_changed_file(tmp_path):
    json_path = overlapping_coco(tmp_path)
    plain = open_dataset(tmp_path, json_path, mode="train")
    cached = open_dataset(tmp_path, json_path, mode="train", cache_images=True)
    for _ in range(2):  # first read fills the cache, second reads it
        for index in range(len(plain)):
            for got, want in zip(cached[index], plain[index]):
                assert torch.equal(got, want)
    cache = tmp_path / "cache"
    assert len(list(cache.glob("decoded/*.npy"))) == 2 and len(list(cache.glob("v*-area/*.npy"))) == 2
    path = os.path.join(str(tmp_path), plain.images[0]["file_name"])
    cv2.imwrite(path, np.full((H, W, 3), 200, np.uint8))
    os.utime(path, ns=(1, 1))  # a new modification time makes a new key even within one clock tick
    assert torch.equal(cached[0][0], plain[0][0])


# ---------------------------------------------------------------- dataset outputs
def two_class_dataset(tmp_path, mode, transform, height=H, width=W):
    anns = [annotation(1, 1, 1, [rect(0, 0, 12, 12)], height=height, width=width),
            annotation(2, 1, 2, [rect(14, 10, 30, 28)], height=height, width=width)]
    json_path = write_coco(str(tmp_path), anns, images=[image_entry(1, height=height, width=width)])
    return open_dataset(tmp_path, json_path, mode=mode, transform=transform)


def normalised(rgb):
    return (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_eval_transform_normalises_rgb_without_resizing(tmp_path):
    ds = two_class_dataset(tmp_path, "val", None)  # the default transform: normalise + tensor
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), normalised(sample_rgb()), atol=1e-5)
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), ds.label_mask(0))


@pytest.mark.parametrize("shape", [(37, 41, 3), (9, 8, 4), (9, 8, 1), (9, 8)])
@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), (0.0, 1.0)])
def test_lut_normalise_equals_albumentations_normalize(shape, mean, std):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = A.Normalize(mean=mean, std=std)(image=image)["image"]
    ours = LutNormalize(mean=mean, std=std)(image=image)["image"]
    assert ours.dtype == expected.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    floats = image.astype(np.float32) / 255  # not uint8: albumentations' own path
    np.testing.assert_array_equal(LutNormalize(mean=mean, std=std, max_pixel_value=1.0)(image=floats)["image"],
                                  A.Normalize(mean=mean, std=std, max_pixel_value=1.0)(image=floats)["image"])


def test_train_mode_transforms_image_and_mask(tmp_path):
    ds = two_class_dataset(tmp_path, "train", build_transform("none", 16), height=32, width=40)
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert mask.dtype == torch.int64 and mask.shape == (16, 16)
    resized = A.Resize(16, 16)(image=sample_rgb(32, 40), mask=ds.label_mask(0))
    np.testing.assert_array_equal(mask.numpy(), resized["mask"])
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), normalised(resized["image"]), atol=1e-5)


def test_val_mode_keeps_the_mask_at_json_resolution(tmp_path):
    ds = two_class_dataset(tmp_path, "val", build_transform("eval", 16), height=32, width=40)
    image, mask = ds[0]
    assert image.shape == (3, 16, 16)
    assert mask.dtype == torch.int64 and mask.shape == (32, 40)
    np.testing.assert_array_equal(mask.numpy(), ds.label_mask(0))


def test_test_mode_returns_image_and_file_name(tmp_path):
    ds = two_class_dataset(tmp_path, "test", build_transform("eval", 16))
    image, file_name = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert file_name == "images/0001.png" and ds.masks is None


@pytest.mark.parametrize("preset", ["none", "light", "strong"])
def test_augmentation_presets(tmp_path, preset):
    ds = two_class_dataset(tmp_path, "train", build_transform(preset, 24), height=32, width=40)
    for seed in range(8):
        image, mask = ds[(0, seed)]
        assert image.dtype == torch.float32 and image.shape == (3, 24, 24)
        assert mask.dtype == torch.int64 and mask.shape == (24, 24)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
        again_image, again_mask = ds[(0, seed)]  # the seed fixes the augmentation
        assert torch.equal(again_image, image) and torch.equal(again_mask, mask)


# ---------------------------------------------------------------- k-fold
def kfold_coco(tmp_path, n_images=23, n_rare=7, n_empty=3):
    """Every annotated image has class 1; the first `n_rare` also have the rare class 2."""
    images = [image_entry(100 + 3 * i) for i in range(n_images)]
    anns = []
    for i, image in enumerate(images[: n_images - n_empty]):
        anns.append(annotation(len(anns) + 1, image["id"], 1, [rect(0, 0, 8, 8)]))
        if i < n_rare:
            anns.append(annotation(len(anns) + 1, image["id"], 2, [SMALL]))
    json_path = write_coco(str(tmp_path), anns, images=images, write_images=False)
    return Coco(json_path, str(tmp_path)), [image["id"] for image in images[:n_rare]]


def test_every_image_is_in_exactly_one_val_fold(tmp_path):
    coco, _ = kfold_coco(tmp_path)
    all_ids = sorted(image["id"] for image in coco.images)
    folds = kfold_splits(coco, n_splits=5, seed=0)
    assert sorted(sum(folds, [])) == all_ids
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for fold in range(5):
        train, val = fold_image_ids(coco, fold, n_splits=5, seed=0)
        assert val == folds[fold]
        assert not set(train) & set(val)
        assert sorted(train + val) == all_ids


def test_folds_are_seeded(tmp_path):
    coco, _ = kfold_coco(tmp_path)
    assert kfold_splits(coco, 5, seed=0) == kfold_splits(coco, 5, seed=0)
    assert kfold_splits(coco, 5, seed=0) != kfold_splits(coco, 5, seed=1)


@pytest.mark.parametrize("n_rare, n_splits", [(7, 5), (5, 5), (11, 4)])
def test_rare_class_images_are_spread_over_the_folds(tmp_path, n_rare, n_splits):
    coco, rare_ids = kfold_coco(tmp_path, n_rare=n_rare)
    for seed in range(5):
        folds = kfold_splits(coco, n_splits, seed)
        per_fold = [len(set(fold) & set(rare_ids)) for fold in folds]
        assert sum(per_fold) == n_rare
        assert max(per_fold) <= math.ceil(n_rare / n_splits)
        assert min(per_fold) >= n_rare // n_splits


def test_fold_arguments_are_checked(tmp_path):
    coco, _ = kfold_coco(tmp_path)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        fold_image_ids(coco, 5, n_splits=5)
    with pytest.raises(ValueError, match=r"--n-folds 24 does not fit .*: it has 23 images, so pass --n-folds from 2"):
        kfold_splits(coco, n_splits=24)


# ---------------------------------------------------------------- real photos
def test_trashbags_load_with_no_special_code(tmp_path):
    if not os.path.isdir(TRASHBAGS):
        pytest.skip(f"{TRASHBAGS} is absent")
    ds = SegmentationDataset(TRASHBAGS, "val.json", mode="val", cache_dir=str(tmp_path / "cache"))
    assert ds.class_names == ["Background", "general_trashbag", "other_trashbag"]
    image, mask = ds[0]
    info = ds.images[0]
    assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
    assert mask.dtype == torch.int64 and mask.shape == (info["height"], info["width"])
    assert set(mask.unique().tolist()) <= {0, 1, 2} and mask.max() > 0
    json_path = os.path.join(TRASHBAGS, "val.json")
    np.testing.assert_array_equal(mask.numpy(), reference_mask(json_path, info["id"], "area"))
    train = SegmentationDataset(TRASHBAGS, "train.json", mode="train", transform=build_transform("light", 256),
                                cache_dir=str(tmp_path / "cache"))
    image, mask = train[(0, 0)]
    assert image.shape == (3, 256, 256) and mask.shape == (256, 256)


def test_subset_splits_images_with_their_annotations(tmp_path):
    images = [image_entry(i) for i in range(1, 7)]
    anns = [annotation(10 + i, i, 1 + i % 2, [rect(2, 2, 10, 10)]) for i in range(1, 7)]
    write_coco(str(tmp_path), anns, images=images)
    first = dataset.write_subset(str(tmp_path), "train.json", 2, seed=5)
    assert [os.path.basename(p) for p in first] == ["train_2.json", "train_2_rest.json"]
    chosen, rest = (json.load(open(p)) for p in first)
    chosen_ids, rest_ids = ({im["id"] for im in part["images"]} for part in (chosen, rest))
    assert len(chosen_ids) == 2 and chosen_ids | rest_ids == set(range(1, 7)) and not chosen_ids & rest_ids
    for part, ids in ((chosen, chosen_ids), (rest, rest_ids)):
        assert sorted(a["image_id"] for a in part["annotations"]) == sorted(ids)
        assert part["categories"] == CATEGORIES
    again = dataset.write_subset(str(tmp_path), "train.json", 2, seed=5)
    assert {im["id"] for im in json.load(open(again[0]))["images"]} == chosen_ids
    with pytest.raises(ValueError, match="subset size must be 1..5, not 6"):
        dataset.write_subset(str(tmp_path), "train.json", 6)
    labelled, pool = (json.load(open(p)) for p in dataset.write_subset(str(tmp_path), "train.json", 2, seed=5,
                                                                        unlabeled_rest=True))
    assert {im["id"] for im in labelled["images"]} == chosen_ids and len(labelled["annotations"]) == 2
    assert {im["id"] for im in pool["images"]} == rest_ids and pool["annotations"] == []
    assert os.path.isfile(tmp_path / "train_2_unlabeled.json")


def test_subset_keeps_a_file_of_its_name_that_holds_something_else(tmp_path):
    write_coco(str(tmp_path), [annotation(10 + i, i, 1, [rect(2, 2, 10, 10)]) for i in range(1, 7)],
               images=[image_entry(i) for i in range(1, 7)])
    mine = tmp_path / "train_2.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(UserError, match="train_2.json exists and holds another subset: pass --overwrite"):
        dataset.write_subset(str(tmp_path), "train.json", 2, seed=5)
    assert mine.read_text() == '{"mine": true}' and not (tmp_path / "train_2_rest.json").exists()
    written = dataset.write_subset(str(tmp_path), "train.json", 2, seed=5, overwrite=True)
    assert len(json.load(open(written[0]))["images"]) == 2
