"""Nothing trained is lost, and every expected user error says what to do next (docs/reliability.md).

Runs folders never replaced unasked; user errors through the scripts' real entry point
(exit status 2, one line, no traceback); the pseudo-label keep floor; evaluation painted
like training; copy-paste images made from validation images dropped; stale temporaries swept.
"""
import json
import os
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import coco_utils
import copy_paste as cp
import dataset as data
import demo
import inference
import model as models
import pseudo_label as pl
import train
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "32", "--batch-size", "2", "--workers", "0",
        "--device", "cpu", "--copy-paste-p", "0", "--epochs", "1"]
CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """6 train, 3 val and 2 test images of 64x64."""
    return demo.make_demo(str(tmp_path_factory.mktemp("nothing_lost") / "data"), size=64, n_train=6, n_val=3,
                          n_test=2)


def train_args(root, output, *extra):
    return train.get_args_parser().parse_args(
        [*TINY, "--data-root", root, "--cache-dir", os.path.join(root, "cache"), "--output", str(output), *extra])


@pytest.fixture(scope="module")
def run(root):
    """A finished one-epoch run folder."""
    output = os.path.join(root, "run")
    train.main(train_args(root, output))
    return output


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- 1. run folders
@pytest.mark.slow
def test_a_second_run_in_a_trained_folder_stops_and_keeps_best_pt(root, tmp_path):
    output = tmp_path / "run"
    train.main(train_args(root, output))
    best, events = read_bytes(output / utils.BEST_CHECKPOINT), sorted(os.listdir(output / "tb"))
    with pytest.raises(utils.UserError) as refusal:
        train.main(train_args(root, output))
    for words in (str(output), "--resume", "--overwrite", "another --output"):
        assert words in str(refusal.value)
    assert read_bytes(output / utils.BEST_CHECKPOINT) == best and sorted(os.listdir(output / "tb")) == events

    train.main(train_args(root, output, "--epochs", "2", "--resume"))  # continuing is allowed
    assert len(os.listdir(output / "tb")) == 2

    train.main(train_args(root, output, "--overwrite"))  # a fresh run: the old run's files are gone
    assert len(os.listdir(output / "tb")) == 1
    assert torch.load(output / utils.LAST_CHECKPOINT, weights_only=True)["epoch"] == 1
    assert [record["epoch"] for record in json.load(open(output / "metrics.json"))] == [1]


# ---------------------------------------------------------------- 2. user errors at the real entry point
def other_classes_json(root, tmp_path):
    """The demo's test images under a json with one category: a class list no demo checkpoint predicts."""
    with open(os.path.join(root, "test.json")) as f:
        coco = json.load(f)
    coco["categories"] = [{"id": 1, "name": "paper"}]
    path = os.path.join(root, "other_classes.json")
    utils.atomic_write_json(path, coco)
    return os.path.basename(path)


USER_ERRORS = {
    "run folder holds a run": ("train.py", lambda r, run, t: [*TINY, "--data-root", r, "--output", run],
                               "already holds a run"),
    "resume without last.pt": ("train.py", lambda r, run, t: [*TINY, "--data-root", r, "--output", t, "--resume"],
                               "holds no last.pt"),
    "missing data root": ("train.py", lambda r, run, t: [*TINY, "--data-root", t + "/nowhere", "--output", t],
                          "pass --data-root"),
    "missing json": ("train.py", lambda r, run, t: [*TINY, "--data-root", r, "--output", t, "--val-json", "v.json"],
                     "pass --val-json with one of"),
    "bad --class-weights": ("train.py", lambda r, run, t: [*TINY, "--data-root", r, "--output", t,
                                                           "--class-weights", "1,2"], "pass one weight per class"),
    "bad --fold": ("train.py", lambda r, run, t: [*TINY, "--data-root", r, "--output", t, "--fold", "9"],
                   "--fold must be in 0..4"),
    "no checkpoint": ("inference.py", lambda r, run, t: ["--data-root", r, "--checkpoints", t + "/runs/*/best.pt"],
                      "train first"),
    "class mismatch": ("inference.py", lambda r, run, t: ["--data-root", r, "--checkpoints", run,
                                                          "--json", other_classes_json(r, t)],
                       "pass the --data-root and --json"),
    "pseudo-label without checkpoint": ("pseudo_label.py", lambda r, run, t: ["--data-root", r, "--checkpoints", t],
                                        "train first"),
    "bad --threshold": ("pseudo_label.py", lambda r, run, t: ["--data-root", r, "--checkpoints", run,
                                                              "--threshold", "1.5"], "--threshold must be in"),
    "copy-paste json missing": ("copy_paste.py", lambda r, run, t: ["--data-root", r, "--json", "x.json", "--out", t],
                                "pass --json"),
    "copy-paste unknown class": ("copy_paste.py", lambda r, run, t: ["--data-root", r, "--out", t, "--classes", "Gold",
                                                                     "--cache-dir", t], "unknown classes ['Gold']"),
    "subset too large": ("dataset_tool.py", lambda r, run, t: ["subset", "--root", r, "--n", "99"], "pass another --n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", USER_ERRORS)
def test_expected_user_errors_end_in_one_line_and_status_2(case, root, run, tmp_path, script_error):
    """Each script's own `__main__` line (see conftest.script_error)."""
    script, argv, words = USER_ERRORS[case]
    argv = argv(root, run, str(tmp_path))
    assert words in script_error(script, *argv, *([] if script in ("dataset_tool.py", "copy_paste.py") else CPU))


@pytest.mark.slow
def test_no_checkpoint_in_a_fresh_interpreter_prints_no_traceback(root, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "inference.py"), "--data-root", root,
                             "--checkpoints", str(tmp_path / "runs" / "*" / utils.BEST_CHECKPOINT), *CPU],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path}/runs/*/best.pt: train first (python train.py --output runs/NAME), "
        f"or pass --checkpoints with checkpoint files, run folders or globs"]


# ---------------------------------------------------------------- 3. pseudo-label keep floor
def test_threshold_keeping_reads_the_histogram():
    probs = torch.tensor([0.15, 0.25, 0.45, 0.55, 0.65, 0.85]).view(1, 2, 3)
    probs = torch.cat([probs, 1 - probs])  # two classes: top probability max(p, 1 - p)
    histogram = pl.confidence_histogram(pl.confidence_and_labels(probs)[0])  # tops 0.85 0.75 0.55 0.55 0.65 0.85
    assert histogram.sum() == 6
    assert pl.threshold_keeping(histogram, 0.5) == pytest.approx(0.75)  # keeps 0.75, 0.85, 0.85
    assert pl.threshold_keeping(histogram, 0.6) == pytest.approx(0.65, abs=1e-3)  # and 0.65
    assert pl.threshold_keeping(histogram, 1.0) == pytest.approx(0.55, abs=1e-3)


def pseudo_label(root, run, out, *extra):
    return pl.main(pl.get_args_parser().parse_args(
        ["--data-root", root, "--checkpoints", run, "--out", str(out), *CPU, *extra]))


@pytest.mark.slow
def test_low_keep_stops_without_a_manifest_unless_allowed(root, run, tmp_path, capsys):
    out = tmp_path / "pseudo"
    pseudo_label(root, run, out, "--threshold", "0")  # an earlier, useful manifest
    with pytest.raises(utils.UserError, match=r"only 0\.0% of the pixels reach --threshold 1\.0 \(floor 30%\); "
                                              r"--threshold 0\.\d+ would keep half") as refusal:
        pseudo_label(root, run, out, "--threshold", "1.0", "--overwrite")
    assert not (out / data.PSEUDO_MANIFEST).exists()  # train.py --pseudo cannot pick up the useless set

    manifest = pseudo_label(root, run, out, "--threshold", "1.0", "--allow-low-keep", "--overwrite")
    assert "warning: only 0.0% of the pixels" in capsys.readouterr().out
    assert (out / data.PSEUDO_MANIFEST).exists() and all(item["kept"] == 0 for item in manifest["items"])

    suggested = re.search(r"--threshold (0\.\d+) would keep half", str(refusal.value)).group(1)
    manifest = pseudo_label(root, run, out, "--threshold", suggested, "--overwrite")
    kept = [item["kept"] for item in manifest["items"]]  # the test images all have one size
    assert np.mean(kept) >= 0.5


# ---------------------------------------------------------------- 4. evaluation paints like training
BIG, SMALL = 1, 2  # labels of the two categories below


def overlap_scene(folder):
    """One 32x32 photo: a big square drawn with 16 vertices under a small triangle (3 vertices).

    `area` paints the big one first (the triangle stays on top); `vertices` paints the
    triangle first (fewer coordinates) and the square covers it.
    """
    os.makedirs(folder, exist_ok=True)
    cv2.imwrite(os.path.join(folder, "a.png"), np.full((32, 32, 3), 128, np.uint8))
    up, down = [4, 10, 16, 22], [28, 22, 16, 10]
    square = [(x, 4) for x in up] + [(28, y) for y in up] + [(x, 28) for x in down] + [(4, y) for y in down]
    triangle = [(10, 10), (20, 10), (10, 20)]
    anns = [{"id": k, "image_id": 1, "category_id": category, "iscrowd": 0, "area": area,
             "segmentation": [[float(v) for point in points for v in point]]}
            for k, (category, points, area) in enumerate([(BIG, square, 576.0), (SMALL, triangle, 50.0)], 1)]
    utils.atomic_write_json(os.path.join(folder, "val.json"), {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}], "annotations": anns,
        "categories": [{"id": 1, "name": "big"}, {"id": 2, "name": "small"}]})
    return folder


def always_big_checkpoint(path, paint_order):
    """A checkpoint whose model predicts BIG everywhere, trained (say its args) with `paint_order`."""
    net = models.create_model("unet", "test_resnet", 3)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    utils.save_checkpoint({"model": "unet", "encoder": "test_resnet", "model_kwargs": {}, "num_classes": 3,
                           "class_names": ["Background", "big", "small"], "image_size": 32,
                           "mean": [0.5] * 3, "std": [0.5] * 3, "state_dict": net.state_dict(),
                           "args": {"paint_order": paint_order}}, path)
    return str(path)


def evaluate(folder, checkpoints, *extra):
    return inference.main(inference.get_args_parser().parse_args(
        ["--data-root", folder, "--json", "val.json", "--eval", "--output", os.path.join(folder, "sub.csv"),
         "--checkpoints", *checkpoints, *CPU, *extra]))


def test_eval_paints_the_ground_truth_like_the_checkpoints_training(tmp_path, capsys):
    folder = overlap_scene(str(tmp_path / "scene"))
    coco = coco_utils.Coco(os.path.join(folder, "val.json"), folder)
    big_share = {order: np.mean(coco_utils.build_mask(coco, coco.images[0], order) == BIG)
                 for order in coco_utils.PAINT_ORDERS}
    assert big_share["vertices"] > big_share["area"]  # the triangle is hidden under vertices, on top under area
    vertices_run = always_big_checkpoint(tmp_path / "vertices.pt", "vertices")

    # predicting BIG everywhere, the IoU of BIG is the share of pixels the ground truth calls BIG
    assert evaluate(folder, [vertices_run])["iou"][BIG] == pytest.approx(big_share["vertices"])
    assert evaluate(folder, [vertices_run], "--paint-order", "area")["iou"][BIG] == pytest.approx(big_share["area"])

    area_run = always_big_checkpoint(tmp_path / "area.pt", "area")
    capsys.readouterr()
    assert evaluate(folder, [vertices_run, area_run])["iou"][BIG] == pytest.approx(big_share["vertices"])
    assert "members were trained with different paint orders" in capsys.readouterr().out


# ---------------------------------------------------------------- 5. copy-paste leaks
@pytest.fixture(scope="module")
def offline(root, tmp_path_factory):
    """8 copy-paste images made from every image of train_all.json (train and val photos both)."""
    out = tmp_path_factory.mktemp("copy_paste")
    return cp.generate(root, "train_all.json", str(out), n=8, seed=0, cache_dir=str(out / "bank"))


def showing(json_path, source_files):
    """Ids of the offline images whose photo or any pasted object comes from `source_files` (real paths)."""
    with open(json_path) as f:
        coco = json.load(f)
    info = coco["info"]

    def file_of(source_id):
        return os.path.realpath(os.path.join(info["source_root"], info["source_files"][str(source_id)]))

    shown = {image["id"] for image in coco["images"] if file_of(image["source_image_id"]) in source_files}
    return shown | {ann["image_id"] for ann in coco["annotations"]
                    if ann["pasted"] and file_of(ann["source_image_id"]) in source_files}


@pytest.mark.parametrize("mode", [["--fold", "0", "--n-folds", "3"], []], ids=["fold", "train-val"])
def test_copy_paste_images_of_validation_images_are_dropped(mode, root, offline, capsys):
    args = train_args(root, "unused", *mode, "--extra-json", offline)
    _, mix, val = train.build_datasets(args, (0.5,) * 3, (0.5,) * 3)
    val_files = {os.path.realpath(val.coco.image_path(image)) for image in val.images}
    leaked = showing(offline, val_files)
    assert leaked and len(leaked) < 8  # a real case: some images show validation images, some do not
    extra = mix.datasets[1]
    assert {image["id"] for image in extra.images} == set(range(1, 9)) - leaked
    assert f"dropped {len(leaked)} of 8 images showing validation images of this run" in capsys.readouterr().out


def test_a_copy_paste_json_without_sources_is_refused(root, offline, tmp_path):
    with open(offline) as f:
        coco = json.load(f)
    del coco["info"]["source_files"]  # as an older copy_paste.py wrote it
    old = tmp_path / "old_copy_paste.json"
    utils.atomic_write_json(old, coco)
    with pytest.raises(utils.UserError, match="older copy_paste.py .* write it again"):
        train.build_datasets(train_args(root, "unused", "--extra-json", str(old)), (0.5,) * 3, (0.5,) * 3)


# ---------------------------------------------------------------- 6. leftover temporaries
def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * utils.STALE_TEMPORARY_SECONDS
    names = {
        "dead": f".a.json.{utils._HOST}-{dead.pid}.abcd1234.tmp",
        "alive": f".a.json.{utils._HOST}-{os.getpid()}.abcd1234.tmp",
        "dead, fresh": f".b.json.{utils._HOST}-{dead.pid}.abcd1234.tmp",
        "dead, other host": f".a.json.otherhost{utils._HOST}-{dead.pid}.abcd1234.tmp",
        "not ours": f".notes.{dead.pid}.tmp",
    }
    for what, name in names.items():
        (tmp_path / name).write_text("half a write")
        if what != "dead, fresh":
            os.utime(tmp_path / name, (old, old))

    with utils.atomic_open(tmp_path / "c.json", "w") as f:
        own = [name for name in os.listdir(tmp_path) if name.startswith(".c.json.")]
        assert len(own) == 1 and f"{utils._HOST}-{os.getpid()}." in own[0]  # the pattern the sweep looks for
        f.write("{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["c.json"] + [name for what, name in names.items() if what != "dead"])
