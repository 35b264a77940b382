import json
import os
import runpy
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

import coco_utils
import copy_paste as cp
import dataset as data
import images as imaging
import presets
import utils

PAPER, BATTERY = 1, 2  # labels in the hand-built scene
BATTERY_RGB, PAPER_RGB = (200, 40, 40), (40, 200, 40)
SIDE = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rle(region):
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _square(top, left, side):
    region = np.zeros((SIDE, SIDE), dtype=bool)
    region[top:top + side, left:left + side] = True
    return region


@pytest.fixture
def scene(tmp_path):
    """Two PNG photos: a battery half hidden under a smaller paper, and a paper alone."""
    battery, paper = _square(10, 10, 20), _square(20, 20, 10)  # paper is smaller, so painted on top
    photo = np.full((SIDE, SIDE, 3), 90, dtype=np.uint8)
    photo[battery], photo[paper] = BATTERY_RGB, PAPER_RGB
    cv2.imwrite(str(tmp_path / "a.png"), photo[..., ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), np.where(paper[..., None], PAPER_RGB, 90).astype(np.uint8)[..., ::-1])
    anns = [(1, 1, 2, battery), (2, 1, 1, paper), (3, 2, 1, paper)]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": SIDE, "width": SIDE},
                   {"id": 2, "file_name": "b.png", "height": SIDE, "width": SIDE}],
        "annotations": [{"id": i, "image_id": image_id, "category_id": cat_id, "segmentation": _rle(region),
                         "area": int(region.sum()), "iscrowd": 0} for i, image_id, cat_id, region in anns],
        "categories": [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Battery"}, {"id": 3, "name": "Clothing"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    return data.SegmentationDataset(tmp_path, "train.json", "train", cache_dir=tmp_path / "masks")


@pytest.fixture
def bank(scene, tmp_path):
    return cp.ObjectBank.for_dataset(scene, ["Battery"], cache_dir=tmp_path / "bank")


def _nearest_colour(image, colours):
    """Per pixel, the index of the closest colour: what the pixel shows."""
    distances = np.abs(image[..., None, :].astype(int) - np.array(colours)).sum(-1)
    return distances.argmin(-1)


def _paste(bank, image, mask, seed, **options):
    transform = cp.CopyPaste(bank, p=1.0, **options)
    transform.set_random_seed(seed)
    out = transform(image=image, mask=mask)
    return out["image"], out["mask"]


def test_bank_keeps_only_the_visible_pixels(bank):
    (obj,) = bank.objects
    visible = obj.rgba[..., 3] == 255
    assert obj.label == BATTERY and obj.rgba.shape[:2] == (22, 22)  # with a 1-pixel margin
    assert visible.sum() == 20 * 20 - 10 * 10  # the corner under the paper is not battery
    assert not visible[11:, 11:].any()
    assert (obj.rgba[visible, :3] == BATTERY_RGB).all()


def test_bank_is_cached_and_comes_only_from_its_images(scene, tmp_path):
    subset = data.SegmentationDataset(tmp_path, "train.json", "train", image_ids=[2], cache_dir=tmp_path / "masks")
    first = cp.ObjectBank.for_dataset(subset, ["Paper"], cache_dir=tmp_path / "bank")
    again = cp.ObjectBank.for_dataset(subset, ["Paper"], cache_dir=tmp_path / "bank")
    assert [obj.image_id for obj in first.objects] == [2]
    assert len(os.listdir(tmp_path / "bank")) == 1
    assert all((a.rgba == b.rgba).all() and a.label == b.label for a, b in zip(first.objects, again.objects))


def test_default_classes_are_the_rarest_present(scene):
    assert data.rarest_classes(scene, 1) == ["Battery"]  # Clothing has no annotation at all


def test_bank_of_zero_objects_is_a_clear_error(scene, tmp_path):
    with pytest.raises(utils.UserError) as err:
        cp.ObjectBank.for_dataset(scene, "Clothing", cache_dir=tmp_path / "bank")
    assert str(err.value) == (
        f"no objects of classes ['Clothing'] (of at least {cp.MIN_OBJECT_AREA} visible pixels) in the 2 images used "
        f"from {scene.coco.path}: nothing to paste; choose other copy-paste classes, e.g. of those annotated there "
        f"(annotations): Paper (2), Battery (1)")
    with pytest.raises(utils.UserError, match=r"no objects of classes \['Clothing'\] .* annotated there "
                                              r"\(annotations\): Paper \(2\)$"):  # Battery has objects
        cp.ObjectBank.for_dataset(scene, ["Battery", "Clothing"], cache_dir=tmp_path / "bank")
    with pytest.raises(utils.UserError, match="Cardboard"):
        cp.ObjectBank.for_dataset(scene, ["Cardboard"], cache_dir=tmp_path / "bank")


def test_a_class_without_objects_stops_copy_paste_py_and_train_py_in_one_line(scene, tmp_path, monkeypatch, capsys):
    root, fix = str(tmp_path), "nothing to paste; choose other copy-paste classes, e.g. of those annotated there"
    (tmp_path / "val.json").write_text((tmp_path / "train.json").read_text())
    commands = {"copy_paste.py": ["--out", str(tmp_path / "out"), "--classes", "Clothing"],
                "train.py": ["--val-json", "val.json", "--copy-paste-p", "0.5", "--copy-paste-classes", "Clothing",
                             "--output", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", "--size", "64"]}
    for script, argv in commands.items():
        monkeypatch.setattr(sys, "argv", [script, "--data-root", root, "--cache-dir", str(tmp_path / "cache"), *argv])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
        stderr = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "\n" not in stderr, stderr
        assert stderr.startswith("error: no objects of classes ['Clothing']") and fix in stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("soft_edge", [0, 3])
def test_pasted_pixels_and_mask_agree(bank, soft_edge):
    image, mask = np.zeros((SIDE, SIDE, 3), np.uint8), np.zeros((SIDE, SIDE), np.uint8)
    pasted = 0
    for seed in range(20):
        out_image, out_mask = _paste(bank, image, mask, seed, soft_edge=soft_edge)
        labelled = out_mask == BATTERY
        assert np.array_equal(out_image.any(axis=-1), labelled)
        assert set(np.unique(out_mask)) <= {0, BATTERY}
        assert (out_image[labelled, 0] > BATTERY_RGB[0] / 2).all()  # mostly object, even on a soft edge
        pasted += labelled.sum()
    assert pasted > 0


def test_paste_over_an_object_relabels_what_it_covers(bank):
    image, mask = np.zeros((SIDE, SIDE, 3), np.uint8), np.zeros((SIDE, SIDE), np.uint8)
    image[4:-4, 4:-4], mask[4:-4, 4:-4] = PAPER_RGB, PAPER
    for seed in range(10):
        out_image, out_mask = _paste(bank, image, mask, seed, max_overlap=1.0)
        assert (out_mask == PAPER).sum() < (mask == PAPER).sum()
        assert np.array_equal(_nearest_colour(out_image, [(0, 0, 0), PAPER_RGB, BATTERY_RGB]), out_mask)


def test_overlap_limit_protects_existing_objects(bank):
    image, mask = np.zeros((SIDE, SIDE, 3), np.uint8), np.zeros((SIDE, SIDE), np.uint8)
    mask[24:40, 24:40] = PAPER
    for seed in range(10):
        _, out_mask = _paste(bank, image, mask, seed, max_overlap=0.0)
        assert (out_mask == PAPER).sum() == (mask == PAPER).sum()


def test_ignored_pixels_under_a_paste_take_its_class(bank):
    image, mask = np.zeros((SIDE, SIDE, 3), np.uint8), np.full((SIDE, SIDE), 255, np.uint8)
    out_image, out_mask = _paste(bank, image, mask, 0)
    assert np.array_equal(out_image.any(-1), out_mask == BATTERY)
    assert set(np.unique(out_mask)) == {BATTERY, 255}


def test_image_alone_is_left_unchanged(bank):
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    assert np.array_equal(cp.CopyPaste(bank, p=1.0)(image=image)["image"], image)


def test_composes_with_the_strong_preset_and_is_deterministic(scene, tmp_path):
    extra = cp.copy_paste_transforms(scene, ["Battery"], p=1.0, cache_dir=tmp_path / "bank")
    transform = presets.build_transform("strong", 48, extra=extra)
    image, mask = imaging.read_image(scene.coco.image_path(scene.images[1])), scene.label_mask(1)

    def run(seed):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        return out["image"].numpy(), np.asarray(out["mask"])

    first, again, other = run(3), run(3), run(4)
    assert first[0].shape == (3, 48, 48) and first[1].shape == (48, 48)
    assert set(np.unique(first[1])) <= {0, PAPER, BATTERY}
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_switched_off_gives_no_transform(scene, tmp_path):
    assert cp.copy_paste_transforms(scene, ["Clothing"], p=0, cache_dir=tmp_path / "bank") == []


def test_offline_json_decodes_to_the_masks_it_was_built_with(tiny_demo, tmp_path):
    root, out = tiny_demo, tmp_path / "out"
    path = cp.generate(root, "train.json", out, n=6, classes="Battery,Clothing", seed=1, cache_dir=tmp_path / "bank")
    written = data.SegmentationDataset(out, path, mode="val", cache_dir=tmp_path / "masks")
    source = data.SegmentationDataset(root, "train.json", mode="val", cache_dir=tmp_path / "masks")
    paster = cp.CopyPaste(cp.ObjectBank.for_dataset(source, "Battery,Clothing", tmp_path / "bank"), p=1.0)
    assert os.path.basename(path) == "train_copy_paste.json"
    assert written.coco.categories == source.coco.categories and len(written) == 6
    pasted_classes = set()
    for index, info in enumerate(written.images):
        image, labels, _, _, _ = cp.synthesize(source, paster, index, seed=1)
        assert np.array_equal(written.label_mask(index), labels)
        assert imaging.read_image(written.coco.image_path(info)).shape == image.shape
        regions = [coco_utils.decode_annotation(ann, *labels.shape) for ann in written.coco.anns_by_image[info["id"]]]
        assert np.sum(regions, axis=0).max() == 1  # visible parts never overlap
        pasted_classes |= set(np.unique(labels)) - set(np.unique(source.label_mask(index)))
    assert pasted_classes & {9, 10}
