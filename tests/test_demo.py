import argparse
import collections
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

import demo
import utils

SEED = 3
SMALL = dict(size=128, n_train=6, n_val=3, n_test=3)
JSON_NAMES = ("train", "val", "train_all", "test")
# pycocotools' decode trips a NumPy 2 deprecation notice on every call; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("demo"), seed=SEED, **SMALL)


@pytest.fixture(scope="module")
def full_count_root(tmp_path_factory):
    """Default image counts at a small size: enough objects for frequency checks, still fast."""
    return demo.make_demo(tmp_path_factory.mktemp("demo_full"), seed=0, size=128)


def _load(root, name):
    with open(os.path.join(root, f"{name}.json")) as f:
        return json.load(f)


def _file_bytes(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def _decode(annotation, height, width):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], height, width)))


def _paint_labels(annotations, height, width):
    """Label map the way the loader builds it: larger annotations first, smaller on top."""
    labels = np.zeros((height, width), np.uint8)
    for annotation in sorted(annotations, key=lambda a: -a["area"]):
        labels[_decode(annotation, height, width).astype(bool)] = annotation["category_id"]
    return labels


def test_same_seed_gives_identical_bytes(small_root, tmp_path):
    again = demo.make_demo(tmp_path, seed=SEED, **SMALL)
    assert _file_bytes(again) == _file_bytes(small_root)


def test_different_seed_gives_different_images(small_root, tmp_path):
    base, other = _file_bytes(small_root), _file_bytes(demo.make_demo(tmp_path, seed=SEED + 1, **SMALL))
    assert base.keys() == other.keys()
    images = [name for name in base if name.endswith(".jpg")]
    assert len(images) == 12 and all(base[name] != other[name] for name in images)


def test_layout_and_schema(small_root):
    sets = {name: _load(small_root, name) for name in JSON_NAMES}
    expected_categories = [(i, name) for i, name in enumerate(demo.CATEGORY_NAMES, 1)]
    assert len(demo.CATEGORY_NAMES) == 10 and demo.CATEGORY_NAMES[8:] == ["Battery", "Clothing"]
    for data in sets.values():
        assert [(c["id"], c["name"]) for c in data["categories"]] == expected_categories
        assert data["info"]["synthetic"] is True and (data["info"]["seed"], data["info"]["size"]) == (SEED, 128)
        for image in data["images"]:
            assert image["file_name"].split("/")[0].startswith("batch_")
            decoded = cv2.imread(os.path.join(small_root, image["file_name"]))
            assert decoded is not None and decoded.shape == (image["height"], image["width"], 3) == (128, 128, 3)
        image_ids = {image["id"] for image in data["images"]}
        assert all(a["image_id"] in image_ids and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
                   for a in data["annotations"])

    train, val, train_all, test = (sets[name] for name in JSON_NAMES)
    assert [len(s["images"]) for s in (train, val, test)] == [6, 3, 3]
    assert train_all["images"] == train["images"] + val["images"]
    assert train_all["annotations"] == train["annotations"] + val["annotations"]
    all_images = train["images"] + val["images"] + test["images"]
    assert len({image["id"] for image in all_images}) == len(all_images)
    assert len({image["file_name"] for image in all_images}) == len(all_images)
    assert len({a["id"] for a in train_all["annotations"]}) == len(train_all["annotations"]) > 0
    assert test["annotations"] == []
    assert {image["file_name"].split("/")[0] for image in test["images"]} == {demo.TEST_BATCH}


def test_polygons_decode_inside_image_with_positive_area(small_root):
    data = _load(small_root, "train_all")
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    for annotation in data["annotations"]:
        height, width = sizes[annotation["image_id"]]
        for polygon in annotation["segmentation"]:
            assert len(polygon) >= 6 and len(polygon) % 2 == 0
            xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
            assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= width and ys.max() <= height
        rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], height, width))
        assert annotation["area"] == int(mask_utils.area(rle)) == int(mask_utils.decode(rle).sum()) > 0
        assert annotation["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())


def test_visible_regions_match_masks_decoded_in_descending_area_order(small_root):
    data = _load(small_root, "train_all")
    split_of = {image["id"]: split for split in ("train", "val") for image in _load(small_root, split)["images"]}
    object_pixels = mismatched = 0
    for image in data["images"]:
        split = split_of[image["id"]]
        index = [im["id"] for im in _load(small_root, split)["images"]].index(image["id"])
        scene = demo.render_scene(SEED, split, index, image["height"])
        # The scene re-rendered here is the photo on disk, up to JPEG loss on the sensor noise
        # (about 5 grey levels; another photo differs by tens).
        photo = cv2.imread(os.path.join(small_root, image["file_name"])).astype(int)
        assert np.abs(photo - scene.image).mean() < 8
        annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        decoded = _paint_labels(annotations, image["height"], image["width"])
        wrong = decoded != scene.labels
        # Only a one-pixel rim around a drawn boundary may disagree.
        kernel = np.ones((3, 3), np.uint8)
        rim = cv2.dilate(scene.labels, kernel) != cv2.erode(scene.labels, kernel)
        assert not (wrong & ~rim).any()
        object_pixels += int(((decoded > 0) | (scene.labels > 0)).sum())
        mismatched += int(wrong.sum())
    fraction = mismatched / object_pixels
    print(f"visible-region mismatch: {fraction:.4%} of {object_pixels} object pixels")
    assert fraction < 0.01


def test_multi_part_polygons_present(full_count_root):
    annotations = _load(full_count_root, "train_all")["annotations"]
    multi = [a for a in annotations if len(a["segmentation"]) > 1]
    assert len(multi) >= 10
    assert {a["category_id"] for a in multi} >= {demo.PLASTIC_BAG, demo.CLOTHING}


def test_class_frequencies_follow_the_real_imbalance(full_count_root):
    counts = collections.Counter(a["category_id"] for a in _load(full_count_root, "train_all")["annotations"])
    assert set(counts) == set(range(1, 11))
    ranked = [category for category, _ in counts.most_common()]
    assert set(ranked[-2:]) == {demo.BATTERY, demo.CLOTHING}
    assert set(ranked[:2]) == {demo.PAPER, demo.PLASTIC_BAG}
    val = _load(full_count_root, "val")["annotations"]
    for rare in (demo.BATTERY, demo.CLOTHING):
        assert len({a["image_id"] for a in val if a["category_id"] == rare}) >= 4
        assert any(a["category_id"] == rare for a in _load(full_count_root, "train")["annotations"])


def test_command_line_writes_the_set_that_make_demo_writes(tmp_path, capsys):
    flags = ["--seed", str(SEED), "--size", "48", "--sizes", "48x48,64x40", "--n-train", "2", "--n-val", "1",
             "--n-test", "1"]
    utils.run_main(demo.main, demo.get_args_parser(), ["--root", str(tmp_path / "cli"), *flags])
    written = _file_bytes(tmp_path / "cli")
    assert written == _file_bytes(demo.make_demo(tmp_path / "api", seed=SEED, size=48, sizes=[(48, 48), (64, 40)],
                                                 n_train=2, n_val=1, n_test=1))
    assert {(im["width"], im["height"]) for im in _load(tmp_path / "cli", "train_all")["images"]} == {(48, 48), (64, 40)}
    assert "demo dataset written to" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "48", "48x", "0x10", "axb", "48x48,"])
def test_sizes_flag_refuses_malformed_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        demo.parse_sizes(text)
