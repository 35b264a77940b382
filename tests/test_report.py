"""Reports: their numbers equal the metric's and hand counts, their PNGs and HTML are whole."""
import html.parser
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import compare_runs
import dataset as data
import dataset_tool
import inference
import report
import train
import utils

TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "64", "--batch-size", "2", "--workers", "0",
        "--device", "cpu", "--epochs", "1"]


class _References(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs["src"], int(attrs["width"]), int(attrs["height"])))
        elif tag == "a":
            self.links.append(attrs["href"])


def check_report_folder(folder):
    """index.html references only files in the folder; each PNG loads at the size the HTML and report.json state.

    Returns report.json.
    """
    parser = _References()
    parser.feed((folder / "index.html").read_text())
    for src, width, height in parser.images:
        assert "/" not in src and (folder / src).is_file(), src
        with Image.open(folder / src) as image:
            image.load()
            assert image.size == (width, height), src
    for href in parser.links:
        assert (folder / href).is_file(), href
    numbers = json.loads((folder / "report.json").read_text())
    assert [(f["file"], f["width"], f["height"]) for f in numbers["figures"]] == parser.images
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(src for src, _, _ in parser.images)
    assert all(f["title"] for f in numbers["figures"])
    return numbers


@pytest.fixture(scope="module")
def demo_root(demo_set):
    return demo_set(size=64, n_train=6, n_val=4, n_test=2)


# ---------------------------------------------------------------- evaluation report
def half_and_half(value):
    """64x64 mask: class 1 on the left half, `value` on the right half."""
    mask = np.full((64, 64), value, dtype=np.uint8)
    mask[:, :32] = 1
    return mask


@pytest.mark.slow
def test_worst_images_are_the_lowest_miou_in_order(demo_root, tmp_path):
    val = data.SegmentationDataset(str(demo_root), "val.json", "val", cache_dir=str(tmp_path / "cache"))
    target = half_and_half(0)
    # per-image mIoU by hand: perfect 1; all background (0.5 + 0) / 2; all class 1 (0 + 0.5) / 2;
    # right half predicted as class 2: (0 + 1 + 0) / 3
    predictions = [target, np.zeros_like(target), np.ones_like(target), half_and_half(2)]
    expected = [1.0, 0.25, 0.25, 1 / 3]
    accumulator = report.EvalReport(val.class_names, worst=3)
    for info, pred in zip(val.images, predictions):
        accumulator.add(info, target, pred, val.coco.image_path(info))
    numbers = check_report_folder_after(accumulator, tmp_path / "report")
    assert [p["miou"] for p in numbers["per_image"]] == pytest.approx(expected)
    names = [info["file_name"] for info in val.images]
    assert [(w["file_name"], w["rank"]) for w in numbers["worst"]] == [(names[1], 1), (names[2], 2), (names[3], 3)]
    assert [w["miou"] for w in numbers["worst"]] == pytest.approx([0.25, 0.25, 1 / 3])
    assert [w["figure"] for w in numbers["worst"]] == ["worst_01.png", "worst_02.png", "worst_03.png"]
    assert sum(numbers["per_image_miou_histogram"]["images"]) == 4


def check_report_folder_after(accumulator, folder):
    accumulator.write(folder, "test")
    return check_report_folder(folder)


def test_report_confusion_and_ious_equal_the_metric_with_ignored_pixels_and_mixed_sizes(demo_root, tmp_path):
    val = data.SegmentationDataset(str(demo_root), "val.json", "val", cache_dir=str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    metric = utils.ConfusionMatrix(len(val.class_names))
    accumulator = report.EvalReport(val.class_names, worst=2)
    for index, info in enumerate(val.images):
        target = val.label_mask(index).copy()
        target[rng.random(target.shape) < 0.05] = utils.IGNORE_INDEX
        pred = np.where(rng.random(target.shape) < 0.3, rng.integers(0, 11, target.shape), target)
        pred = np.where(pred == utils.IGNORE_INDEX, 0, pred).astype(np.uint8)
        metric.update(torch.from_numpy(target), torch.from_numpy(pred))
        accumulator.add(info, target, pred, val.coco.image_path(info))
    numbers = check_report_folder_after(accumulator, tmp_path / "report")
    assert numbers["confusion"] == metric.mat.tolist()
    scores = metric.compute()
    assert numbers["iou"] == [None if np.isnan(v) else pytest.approx(v) for v in scores["iou"]]
    assert numbers["miou"] == pytest.approx(scores["miou"])
    assert numbers["pixel_acc"] == pytest.approx(scores["acc"])
    mat = np.array(numbers["confusion"])
    first = numbers["most_confused"][0]
    off = mat - np.diag(np.diag(mat))
    i, j = np.unravel_index(off.argmax(), off.shape)
    assert (first["true"], first["predicted"], first["pixels"]) == (val.class_names[i], val.class_names[j], off.max())
    assert [w["miou"] for w in numbers["worst"]] == sorted(p["miou"] for p in numbers["per_image"])[:2]


@pytest.fixture(scope="module")
def fold_runs(demo_root, tmp_path_factory):
    """Two one-epoch fold runs of a tiny model on the demo set (train_all.json, 2 folds)."""
    runs = tmp_path_factory.mktemp("runs")
    for fold in (0, 1):
        train.main(train.get_args_parser().parse_args(
            [*TINY, "--data-root", str(demo_root), "--cache-dir", str(runs / "cache"), "--fold", str(fold),
             "--n-folds", "2", "--output", str(runs / f"fold{fold}")]))
    return runs


def predict_args(root, *extra):
    return inference.get_args_parser().parse_args(["--data-root", str(root), "--workers", "0", "--device", "cpu",
                                                   *extra])


@pytest.mark.slow
def test_inference_eval_report_equals_the_printed_scores(demo_root, fold_runs, tmp_path):
    args = predict_args(demo_root, "--checkpoints", str(fold_runs / "fold0"), "--json", "val.json", "--eval",
                        "--output", str(tmp_path / "val.csv"), "--report", str(tmp_path / "report"),
                        "--report-worst", "2")
    scores = inference.main(args)
    numbers = check_report_folder(tmp_path / "report")
    assert numbers["images"] == 4 and len(numbers["worst"]) == 2
    assert numbers["iou"] == [None if np.isnan(v) else pytest.approx(v) for v in scores["iou"]]
    assert numbers["miou"] == pytest.approx(scores["miou"])
    assert sum(map(sum, numbers["confusion"])) == 4 * 64 * 64


@pytest.mark.slow
def test_oof_report_covers_every_image_once(demo_root, fold_runs, tmp_path):
    args = predict_args(demo_root, "--oof", str(fold_runs / "fold*"), "--report", str(tmp_path / "report"),
                        "--report-worst", "1")
    scores = inference.main(args)
    numbers = check_report_folder(tmp_path / "report")
    all_images = json.loads((demo_root / "train_all.json").read_text())["images"]
    assert sorted(p["file_name"] for p in numbers["per_image"]) == sorted(i["file_name"] for i in all_images)
    assert numbers["miou"] == pytest.approx(scores["miou"])


@pytest.mark.slow
def test_report_without_eval_is_a_user_error(demo_root, fold_runs, tmp_path):
    args = predict_args(demo_root, "--checkpoints", str(fold_runs / "fold0"), "--output", str(tmp_path / "t.csv"),
                        "--report", str(tmp_path / "report"))
    with pytest.raises(utils.UserError, match="--eval"):
        inference.main(args)


# ---------------------------------------------------------------- dataset report
def test_dataset_report_counts_equal_the_hand_counts(write_hand_made_set, tmp_path, capsys):
    expected = write_hand_made_set(tmp_path)
    out = tmp_path / "report"
    dataset_tool.main(dataset_tool.get_args_parser().parse_args(["summary", "--root", str(tmp_path), "--json",
                                                                 "all.json", "--report", str(out), "--fold", "0",
                                                                 "--n-folds", "2"]))
    assert "wrote" in capsys.readouterr().out  # the text summary is still printed first
    numbers = check_report_folder(out)
    assert {key: numbers[key] for key in expected} == expected
    assert numbers["object_area_percent"]["A"]["max"] == pytest.approx(100 * 100 / 1200)
    assert numbers["object_area_percent"]["C"]["count"] == 1
    folds = numbers["folds"]
    assert [f["images"] for f in folds] in ([2, 1], [1, 2])
    assert np.sum([f["annotations_per_class"] for f in folds], axis=0).tolist() == expected["annotations_per_class"]
    shown = set().union(*(expected["labels_per_image"][str(i)] for i in (1, 2, 3)
                          if f"img{i}.jpg" in numbers["samples"]))
    assert shown == {1, 2, 3}  # every class, the rare ones included, is in the sample grid
    assert {"folds.png", "samples.png", "class_counts.png"} <= {f["file"] for f in numbers["figures"]}


def test_samples_cover_the_rarest_classes_before_random_ones():
    class Images:  # the two attributes sample_image_indices reads
        images = [{"id": k} for k in range(6)]

    labels = {0: [1], 1: [1, 2], 2: [1], 3: [3], 4: [1], 5: [1]}
    indices = report.sample_image_indices(Images, labels, [0, 5, 1, 1], count=2)
    assert indices[:2] == [1, 3]  # class 2 and 3 (one annotation each) first; class 1 comes with image 1
    assert len(indices) == 2


# ---------------------------------------------------------------- run comparison
def test_compare_runs_report(tmp_path, monkeypatch):
    for run, mious in (("a", [0.2, 0.5]), ("b", [0.4, 0.3])):
        history = [{"epoch": epoch, "miou": miou, "iou": {"Background": 0.9, "Can": miou, "Jar": None}}
                   for epoch, miou in enumerate(mious)]
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps(history))
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(tmp_path / "a"), str(tmp_path / "b"), "--best",
                                      "--report", str(tmp_path / "report")])
    compare_runs.main()
    numbers = check_report_folder(tmp_path / "report")
    assert numbers["runs"]["a"]["miou_over_epochs"] == [[0, 0.2], [1, 0.5]]
    assert numbers["runs"]["b"]["compared"]["epoch"] == 0  # --best: b's best validation came first
    assert numbers["runs"]["b"]["compared"]["iou"]["Can"] == 0.4


def test_error_panel_marks_wrong_pixels_red_and_never_ignored_ones():
    target = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    pred = np.array([[0, 2], [1, 2]], dtype=np.uint8)
    wrong = report.wrong_pixels(target, pred)
    assert wrong.tolist() == [[False, True], [False, False]]
    panel = report.error_image(np.full((2, 2, 3), 200, dtype=np.uint8), wrong)
    assert panel[0, 1].tolist() == list(report.ERROR_RGB) and panel[1, 0].tolist() == [80, 80, 80]
