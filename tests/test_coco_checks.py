"""Every COCO json a user brings is checked once, before any work: a correct run, or one line naming the json and id.

Refusals are driven through train.py (as `python train.py` runs it: utils.run_main, exit status 2,
one line on stderr) or through coco_utils.Coco where a json meets no script first. docs/data-checks.md
lists each case with its test.
"""
import contextlib
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import time

import numpy as np
import pytest

import coco_utils
import dataset
import demo
import inference
import train
import utils

TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "32", "--batch-size", "2", "--workers", "0",
        "--device", "cpu", "--copy-paste-p", "0", "--epochs", "1"]
NAMES = ["Background"] + demo.CATEGORY_NAMES
# pycocotools' decode predates numpy 2's copy keyword; the warning says nothing about this code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- builders
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """4 train and 2 val images of 64x64."""
    root = tmp_path_factory.mktemp("coco-checks")
    demo.make_demo(str(root), size=64, n_train=4, n_val=2, n_test=0)
    return root


def demo_json(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


def write_json(path, coco):
    with open(path, "w") as f:
        json.dump(coco, f)
    return str(path)


def train_argv(root, tmp_path, *extra):
    return [*TINY, "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "run"), *extra]


def refusal(capsys, main, parser, argv):
    """The one-line message a script ends with (exit status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        utils.run_main(main, parser, argv)
    assert ended.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def train_refusal(capsys, root, tmp_path, *extra):
    return refusal(capsys, train.main, train.get_args_parser(), train_argv(root, tmp_path, *extra))


def refused_train_json(capsys, demo_root, tmp_path, change):
    """train.py's message for the demo train.json changed in place by `change(coco)`; returns (message, path)."""
    coco = demo_json(demo_root, "train.json")
    change(coco)
    path = write_json(tmp_path / "train.json", coco)
    return train_refusal(capsys, demo_root, tmp_path, "--train-json", path), path


H = W = 32


def small_coco(tmp_path, annotations=(), categories=None, images=None):
    """A json of 32x32 images (the files are not needed to read it) -> coco_utils.Coco."""
    coco = {"images": images or [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "categories": categories or [{"id": 1, "name": "paper"}, {"id": 2, "name": "plastic"}],
            "annotations": list(annotations)}
    return coco_utils.Coco(write_json(tmp_path / "small.json", coco), str(tmp_path))


def polygon_annotation(ann_id, segmentation, category_id=1, **extra):
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "segmentation": segmentation, **extra}


def box(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_mask(x0, y0, x1, y1, label=1):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = label
    return mask


def in_forked_child(work):
    """Run `work()` in a forked child capped at 1 GB more address space than it starts with.

    Returns (result or 'raised: ...', peak resident memory added in MB, seconds). The cap
    turns a regression that would take tens of GB into a failure here, not a machine-wide kill.
    """
    def child(queue):
        with open("/proc/self/statm") as f:
            virtual = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (virtual + (1 << 30), resource.RLIM_INFINITY))
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
        try:
            result = work()
        except BaseException as err:  # noqa: BLE001 -- reported to the parent, which asserts on it
            result = f"raised: {type(err).__name__}: {err}"
        added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        queue.put((result, added, time.monotonic() - start))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=120)  # results are small: the child's queue flushes them before it exits
    assert process.exitcode == 0, f"the child ended with status {process.exitcode} (out of memory or killed)"
    return queue.get(timeout=5)


# ---------------------------------------------------------------- bounded memory
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_or_inf_coordinate_is_refused_fast_in_little_memory(demo_root, tmp_path, value):
    coco = demo_json(demo_root, "train.json")
    ann = coco["annotations"][2]
    ann["segmentation"][0][0] = 123456.5  # a marker replaced in the text: json.dump cannot write 1e400
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco).replace("123456.5", value))
    argv = train_argv(demo_root, tmp_path, "--train-json", str(path))

    def run_train():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                utils.run_main(train.main, train.get_args_parser(), argv)
            except SystemExit as ended:
                return ended.code, stderr.getvalue()
        return "trained", stderr.getvalue()

    result, added_mb, seconds = in_forked_child(run_train)
    assert result[0] == 2, result
    assert result[1].strip() == (f"error: {path}: annotation {ann['id']}: polygon coordinate {float(value)!r} "
                                 "is not a finite number; fix or remove this annotation")
    assert added_mb < 300 and seconds < 20, (added_mb, seconds)


def test_huge_finite_coordinates_are_clipped_in_little_memory(tmp_path):
    far = 1e15
    annotations = [polygon_annotation(1, [box(4, 4, far, 20)]),  # boxes reaching far outside the image
                   polygon_annotation(2, [box(-far, 24, 8, far)], category_id=2)]

    def paint():
        coco = small_coco(tmp_path, annotations)
        return coco_utils.build_mask(coco, coco.images[0]), dict(coco.notes)

    (mask, notes), added_mb, seconds = in_forked_child(paint)
    expected = box_mask(4, 4, W, 20)
    expected[24:, :8] = 2
    np.testing.assert_array_equal(mask, expected)
    assert notes == {"polygons clipped to the image border": 2}
    assert added_mb < 300 and seconds < 20, (added_mb, seconds)


def test_clip_polygon_matches_the_exact_intersection():
    triangle = np.array([[0.0, 0.0], [1e12, 0.0], [0.0, 1e12]])
    clipped = coco_utils.clip_polygon(triangle, -32, -32, 64, 64)
    assert coco_utils._polygon_area(clipped) == pytest.approx(64 * 64)


# ---------------------------------------------------------------- train and val agree
@pytest.mark.parametrize("case", ["names swapped", "extra category", "missing category", "other ids"])
def test_val_json_with_other_classes_is_refused_with_both_lists(demo_root, tmp_path, capsys, case):
    coco = demo_json(demo_root, "val.json")
    categories = coco["categories"]
    if case == "names swapped":
        categories[0]["name"], categories[1]["name"] = categories[1]["name"], categories[0]["name"]
    elif case == "extra category":
        categories.append({"id": 11, "name": "Wood"})
    elif case == "missing category":
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 10]
        categories.pop()
    else:
        for category in categories:
            category["id"] += 100
        for ann in coco["annotations"]:
            ann["category_id"] += 100
    path = write_json(tmp_path / "val.json", coco)
    message = train_refusal(capsys, demo_root, tmp_path, "--val-json", path)
    ours = [(c["id"], c["name"]) for c in categories]
    theirs = [(c["id"], c["name"]) for c in demo_json(demo_root, "train.json")["categories"]]
    assert message.startswith(f"error: the classes of {path}, {ours}, differ from those of "
                              f"{demo_root / 'train.json'}, {theirs} (first difference: ")
    assert not (tmp_path / "run").exists()


def test_extra_json_with_other_classes_is_refused_with_both_lists(demo_root, tmp_path, capsys):
    coco = demo_json(demo_root, "train.json")
    coco["categories"][2]["name"] = "Cardboard"
    path = write_json(demo_root / "extra-renamed.json", coco)  # an extra json's images are relative to its folder
    message = train_refusal(capsys, demo_root, tmp_path, "--extra-json", path)
    assert message.startswith(f"error: the classes of {path}, [(1, 'General trash'), (2, 'Paper'), (3, 'Cardboard'),")
    assert f"differ from those of {demo_root / 'train.json'}, [(1, 'General trash'), (2, 'Paper'), (3, 'Paper pack')," \
        in message
    assert message.endswith("(first difference: (3, 'Cardboard') vs (3, 'Paper pack')): labels would mean different "
                            "classes; use the same categories (names and ids)")


@pytest.fixture(scope="module")
def overlap_run(demo_root, tmp_path_factory):
    """A val json sharing one file with training and holding a byte copy of another; a finished run on it."""
    tmp_path = tmp_path_factory.mktemp("overlap")
    train_coco, val_coco = demo_json(demo_root, "train.json"), demo_json(demo_root, "val.json")
    shared, copied = train_coco["images"][:2]
    copy_name = os.path.join(os.path.dirname(copied["file_name"]), "copy.jpg")
    shutil.copy(demo_root / copied["file_name"], demo_root / copy_name)
    val_coco["images"] = [shared, dict(copied, file_name=copy_name)]
    val_coco["annotations"] = [a for a in train_coco["annotations"] if a["image_id"] in (shared["id"], copied["id"])]
    val_path = write_json(tmp_path / "val.json", val_coco)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(train.get_args_parser().parse_args(train_argv(demo_root, tmp_path, "--val-json", val_path)))
    return tmp_path, val_path, stdout.getvalue()


@pytest.mark.slow
def test_val_images_in_training_warn_with_counts_and_strict_refuses(demo_root, overlap_run, tmp_path, capsys):
    _, val_path, stdout = overlap_run
    found = (f"validation images of {val_path} also in the training data: 2 of 2 are the same file or identical "
             "bytes (1 by resolved path, 2 by content), 1 have a training image's file name")
    assert f"warning: {found}; validation scores will be too high (--strict refuses this)" in stdout
    message = train_refusal(capsys, demo_root, tmp_path, "--val-json", val_path, "--strict")
    assert message == f"error: {found}; remove them from one side (--strict refuses this)"


def test_distinct_train_and_val_give_no_overlap(demo_root):
    train_set = dataset.SegmentationDataset(str(demo_root), "train.json", "val")
    val_set = dataset.SegmentationDataset(str(demo_root), "val.json", "val")
    assert dataset.image_overlap([train_set], val_set) == {
        "file name": 0, "resolved path": 0, "content": 0, "same file": 0}


@pytest.mark.slow
def test_inference_refuses_a_json_with_other_classes_in_the_same_words(demo_root, overlap_run, tmp_path, capsys):
    run_folder, _, _ = overlap_run
    coco = demo_json(demo_root, "val.json")
    coco["categories"][0]["name"] = "Rubbish"
    path = write_json(tmp_path / "val.json", coco)
    argv = ["--checkpoints", str(run_folder / "run" / utils.BEST_CHECKPOINT), "--data-root", str(demo_root), "--json", path,
            "--output", str(tmp_path / "out.csv"), "--workers", "0", "--device", "cpu"]
    message = refusal(capsys, inference.main, inference.get_args_parser(), argv)
    renamed = ["Background", "Rubbish"] + NAMES[2:]
    assert message.startswith(f"error: the classes of {path}, {renamed}, differ from those of the checkpoints, "
                              f"{NAMES} (first difference: 'Rubbish' vs 'General trash')")


# ---------------------------------------------------------------- schema
def test_json_without_annotations_key_is_refused_as_a_test_json(demo_root, tmp_path, capsys):
    message, path = refused_train_json(capsys, demo_root, tmp_path, lambda coco: coco.pop("annotations"))
    assert message == (f"error: {path} has no 'annotations' key: it looks like an unlabelled (test) json; "
                       "give a labelled json here")


def test_top_level_list_is_refused(tmp_path):
    path = write_json(tmp_path / "list.json", [{"id": 1}])
    with pytest.raises(utils.UserError, match=re.escape(f"{path}: the top level is a list, not an object")):
        coco_utils.Coco(path, str(tmp_path))


def test_duplicate_category_ids_are_refused(demo_root, tmp_path, capsys):
    def duplicate(coco):
        coco["categories"][3]["id"] = 3
    message, path = refused_train_json(capsys, demo_root, tmp_path, duplicate)
    assert message == (f"error: {path}: category id 3 appears twice ('Paper pack' and 'Metal'); "
                       "give each category its own id")


def test_duplicate_category_names_are_refused(demo_root, tmp_path, capsys):
    def duplicate(coco):
        coco["categories"][4]["name"] = "paper"  # "Paper" is category 2: names differing in case only are one name
    message, path = refused_train_json(capsys, demo_root, tmp_path, duplicate)
    assert message == f"error: {path}: categories 2 and 5 are both named 'paper'; give each category its own name"


@pytest.mark.parametrize("name", ["Background", "background", " BACKGROUND"])
def test_category_named_background_is_refused(demo_root, tmp_path, capsys, name):
    message, path = refused_train_json(capsys, demo_root, tmp_path,
                                       lambda coco: coco["categories"].append({"id": 0, "name": name}))
    assert message == (f"error: {path}: category 0 is named {name!r}, like the Background class the toolkit adds "
                       "as label 0 for unannotated pixels; remove this category or rename it")


def test_more_than_254_categories_are_refused_and_254_fit(demo_root, tmp_path, capsys):
    many = [{"id": i, "name": f"class {i}"} for i in range(1, 256)]
    message, path = refused_train_json(capsys, demo_root, tmp_path, lambda coco: coco.update(categories=many))
    assert message == (f"error: {path}: 255 categories, but at most 254 fit the uint8 label masks "
                       "(label 0 is Background, 255 means ignore); merge or drop categories")
    coco = small_coco(tmp_path, [polygon_annotation(1, [box(2, 2, 6, 6)], category_id=254)], categories=many[:254])
    np.testing.assert_array_equal(coco_utils.build_mask(coco, coco.images[0]), box_mask(2, 2, 6, 6, label=254))


def test_missing_category_id_names_the_annotation(demo_root, tmp_path, capsys):
    message, path = refused_train_json(capsys, demo_root, tmp_path,
                                       lambda coco: coco["annotations"][1].pop("category_id"))
    assert message == f"error: {path}: annotation 2 has no category_id (an integer)"


@pytest.mark.parametrize("value, accepted", [("64", False), (64.0, True), (64.5, False), (0, False), (None, False)])
def test_width_and_height_must_be_positive_integers(demo_root, tmp_path, capsys, value, accepted):
    coco = demo_json(demo_root, "train.json")
    image = coco["images"][1]
    image["width"] = image["height"] = value
    path = write_json(tmp_path / "train.json", coco)
    if accepted:
        ds = dataset.SegmentationDataset(str(demo_root), path, "val", cache_dir=str(tmp_path / "cache"))
        assert ds.images[1]["width"] == 64 and type(ds.images[1]["width"]) is int
        assert ds[1][1].shape == (64, 64)
        return
    message = train_refusal(capsys, demo_root, tmp_path, "--train-json", path)
    hint = " (a string: write the number without quotes)" if isinstance(value, str) else ""
    assert message == f"error: {path}: image {image['id']}: height must be a positive integer, not {value!r}{hint}"


# ---------------------------------------------------------------- empty and unlabelled jsons
def test_empty_train_set(demo_root, tmp_path, capsys):
    path = write_json(tmp_path / "empty.json", {"images": [], "annotations": [], "categories": [{"id": 1, "name": "paper"}]})
    assert train_refusal(capsys, demo_root, tmp_path, "--train-json", path) == f"error: {path} lists no images"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_empty_test_set(tiny_demo_copy, tiny_run, tmp_path, capsys):
    path = write_json(tiny_demo_copy / "test.json", {"images": [], "annotations": [],
                                                     "categories": [{"id": 1, "name": "paper"}]})
    argv = ["--checkpoints", str(tiny_run), "--data-root", str(tiny_demo_copy), "--output", str(tmp_path / "out.csv"),
            "--workers", "0", "--device", "cpu"]
    assert refusal(capsys, inference.main, inference.get_args_parser(), argv) == f"error: {path} lists no images"
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_inference_ignores_the_annotations_of_a_test_json_with_a_note(tiny_demo, tiny_run, run_inference, tmp_path,
                                                                      capsys):
    val = demo_json(tiny_demo, "val.json")
    csv = tmp_path / "submission.csv"
    run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo, "--json", "val.json", "--output", csv)
    note = f"annotations ignored ({len(val['annotations'])}): this json is read as unlabelled: 1"
    assert f"{tiny_demo / 'val.json'}: {note}" in capsys.readouterr().out
    file_names = [image["file_name"] for image in val["images"]]
    assert list(utils.read_submission(csv, 11, expected_ids=file_names)) == file_names


# ---------------------------------------------------------------- shapes
def test_bbox_only_annotation_is_painted_as_its_box_with_a_note(tmp_path):
    coco = small_coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 6, 10, 8]}])
    assert coco.notes == {"annotations without a segmentation painted as their bbox": 1}
    np.testing.assert_array_equal(coco_utils.build_mask(coco, coco.images[0]), box_mask(4, 6, 14, 14, label=2))


@pytest.mark.parametrize("ann, message", [
    ({"id": 5, "image_id": 1, "category_id": 1}, "annotation 5 has neither a segmentation nor a bbox"),
    ({"id": 6, "image_id": 1, "category_id": 1, "bbox": [4, 6, float("nan"), 8]},
     "annotation 6: bbox coordinate nan is not a finite number"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [4, 6, 8]}, "annotation 7: bbox must be 4 numbers"),
])
def test_annotation_without_a_usable_shape_is_refused(tmp_path, ann, message):
    with pytest.raises(utils.UserError, match=re.escape(f"{tmp_path / 'small.json'}: {message}")):
        small_coco(tmp_path, [ann])


def test_flat_polygon_reads_as_one_polygon(tmp_path):
    coco = small_coco(tmp_path, [polygon_annotation(1, box(4, 4, 12, 20))])
    assert coco.notes == {"flat polygons (coordinates not nested in a list) read as one polygon": 1}
    np.testing.assert_array_equal(coco_utils.build_mask(coco, coco.images[0]), box_mask(4, 4, 12, 20))


def test_polygon_with_a_string_coordinate_is_refused(tmp_path):
    with pytest.raises(utils.UserError, match=re.escape("annotation 3: polygon coordinate '4' is not a finite")):
        small_coco(tmp_path, [polygon_annotation(3, [[2, 2, "4", 2, 4, 4]])])


def test_odd_coordinate_count_is_skipped_with_its_own_note(tmp_path):
    coco = small_coco(tmp_path, [polygon_annotation(1, [box(2, 2, 6, 6) + [9], box(8, 8, 12, 12)]),
                                 polygon_annotation(2, [[1, 1, 5, 1, 5]])])
    assert coco.notes == {"polygon parts skipped: odd number of coordinates": 2,
                          "annotations skipped: degenerate polygon (under 3 points, odd coordinate count "
                          "or zero area)": 1}
    np.testing.assert_array_equal(coco_utils.build_mask(coco, coco.images[0]), box_mask(8, 8, 12, 12))


def test_rle_counts_that_do_not_cover_the_image_are_refused(tmp_path):
    rle = {"size": [H, W], "counts": [10, 5, H * W]}  # decoding would write past the mask
    with pytest.raises(utils.UserError, match=re.escape("annotation 4: RLE counts must be a string or run lengths "
                                                        f"(non-negative integers) that add up to height x width = {H * W}")):
        small_coco(tmp_path, [polygon_annotation(4, rle, iscrowd=1)])


def test_an_rle_of_another_size_than_its_image_names_both(tmp_path):
    rle = {"size": [40, 40], "counts": [100, 20, 1480]}
    message = f"{tmp_path / 'small.json'}: annotation 7 has an RLE of size [40, 40] (HxW), but image 1 is [{H}, {W}]"
    with pytest.raises(utils.UserError, match=re.escape(message)):
        small_coco(tmp_path, [polygon_annotation(7, rle)])


def test_polygons_and_bboxes_outside_the_image_are_clipped_and_counted(tmp_path):
    coco = small_coco(tmp_path, [polygon_annotation(1, [box(-8, -8, 8, 8)], bbox=[-8, -8, 16, 16]),
                                 polygon_annotation(2, [box(24, 28, 40, 36)], bbox=[24, 28, 16, 8]),
                                 polygon_annotation(3, [box(50, 50, 60, 60)], bbox=[50, 50, 10, 10])])
    assert coco.notes == {"polygons clipped to the image border": 3}
    expected = box_mask(0, 0, 8, 8)
    expected[28:, 24:] = 1  # the polygon wholly outside paints nothing
    np.testing.assert_array_equal(coco_utils.build_mask(coco, coco.images[0]), expected)
