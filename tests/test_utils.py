import math
import os
import re
import stat

import albumentations as A
import numpy as np
import pytest
import torch

import inference
import serve
import train
from utils import (ConfusionMatrix, UserError, atomic_open, class_palette, colorize, format_class_table,
                   load_checkpoint, overlay, overlay_panel, read_submission, resize_for_submission, save_checkpoint,
                   scores_from_confusion, write_submission)

NUM_CLASSES = 11


# ---------------------------------------------------------------- metric
def baseline_scores(label_true, label_pred, n):
    """The competition's baseline formulas, written with numpy only."""
    mask = (label_true >= 0) & (label_true < n)
    hist = np.bincount(n * label_true[mask].astype(int) + label_pred[mask], minlength=n ** 2).reshape(n, n)
    acc = np.diag(hist).sum() / hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = np.nanmean(np.diag(hist) / hist.sum(axis=1))
        iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    mean_iu = np.nanmean(iu)
    freq = hist.sum(axis=1) / hist.sum()
    fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return acc, acc_cls, mean_iu, fwavacc, iu


def test_hand_computed_scores():
    # 4 classes; the last pixel is ignored (target 255) although it predicts class 2.
    target = torch.tensor([[0, 0, 1], [1, 1, 255]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1], [1, 3, 2]])
    cm = ConfusionMatrix(4)
    cm.update(target, pred)
    # rows gt, columns pred: gt0 -> pred0 1, pred1 1; gt1 -> pred1 2, pred3 1.
    assert cm.mat.tolist() == [[1, 1, 0, 0], [0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    scores = cm.compute()
    # IoU0 = 1 / (2 + 1 - 1) = 1/2; IoU1 = 2 / (3 + 3 - 2) = 1/2;
    # class 2 absent in gt and (counted) prediction: 0/0 = NaN, left out;
    # class 3 predicted once, absent in gt: 0 / (0 + 1 - 0) = 0, counted.
    iou = scores["iou"]
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert math.isnan(iou[2]) and iou[3] == 0
    assert scores["miou"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert scores["acc"] == pytest.approx(3 / 5)  # 3 correct of 5 counted pixels
    assert scores["acc_cls"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # classes absent in gt are NaN
    assert scores["fwiou"] == pytest.approx(2 / 5 * 0.5 + 3 / 5 * 0.5)


def test_accumulated_updates_equal_one_update_on_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, NUM_CLASSES, (2, 7, 9), generator=gen) for _ in range(4)]
    preds = [torch.randint(0, NUM_CLASSES, (2, 7, 9), generator=gen) for _ in range(4)]
    targets[1][0, :3] = 255
    many, once = ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES)
    for target, pred in zip(targets, preds):
        many.update(target, pred)
    once.update(torch.cat(targets), torch.cat(preds))
    assert torch.equal(many.mat, once.mat)
    assert many.mat.sum() == sum(int((t != 255).sum()) for t in targets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_the_baseline_formulas(seed):
    rng = np.random.default_rng(seed)
    # Classes 0..7 in the targets, 0..5 and 9 in the predictions: class 8 is NaN,
    # 9 is a false positive only, 6 and 7 are never predicted.
    target = rng.integers(0, 8, (4, 64, 48))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.choice([0, 1, 2, 3, 4, 5, 9], size=target.shape)
    cm = ConfusionMatrix(10)
    cm.update(torch.from_numpy(target), torch.from_numpy(pred))
    scores = cm.compute()
    acc, acc_cls, mean_iu, fwavacc, iu = baseline_scores(target.ravel(), pred.ravel(), 10)
    np.testing.assert_allclose(scores["iou"], iu, equal_nan=True)
    assert math.isnan(scores["iou"][8]) and scores["iou"][9] == 0
    assert scores["miou"] == pytest.approx(mean_iu)
    assert scores["acc"] == pytest.approx(acc)
    assert scores["acc_cls"] == pytest.approx(acc_cls)
    assert scores["fwiou"] == pytest.approx(fwavacc)


def test_scores_from_a_numpy_matrix():
    hist = np.array([[3, 1], [0, 0]])
    scores = scores_from_confusion(hist)
    assert scores["iou"][0] == pytest.approx(3 / 4) and scores["iou"][1] == 0
    assert scores["miou"] == pytest.approx(3 / 8)


@pytest.mark.parametrize("bad", [NUM_CLASSES, -1])
def test_prediction_out_of_range_raises(bad):
    cm = ConfusionMatrix(NUM_CLASSES)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, bad]))


# ---------------------------------------------------------------- submission CSV
def albumentations_resized_mask(mask, size=256):
    image = np.zeros(mask.shape + (3,), dtype=np.uint8)
    return A.Resize(size, size)(image=image, mask=mask)["mask"]


@pytest.mark.parametrize("height, width", [(512, 512), (375, 500)])
def test_submission_resize_matches_albumentations(height, width):
    mask = np.random.default_rng(height).integers(0, NUM_CLASSES, (height, width), dtype=np.uint8)
    expected = albumentations_resized_mask(mask)
    assert expected.shape == (256, 256)
    np.testing.assert_array_equal(resize_for_submission(mask), expected)


def test_submission_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    masks = {"batch_01/0001.jpg": rng.integers(0, NUM_CLASSES, (512, 512), dtype=np.uint8),
             "batch_02/0002.jpg": rng.integers(0, NUM_CLASSES, (375, 500), dtype=np.uint8)}
    path = tmp_path / "submission.csv"
    write_submission(path, masks.items(), NUM_CLASSES, expected_ids=list(masks))
    lines = path.read_text().splitlines()
    assert lines[0] == "image_id,PredictionString" and len(lines) == 3
    assert lines[1].startswith("batch_01/0001.jpg,")
    read = read_submission(path, NUM_CLASSES, expected_ids=list(masks))
    assert list(read) == list(masks)
    for image_id, mask in masks.items():
        np.testing.assert_array_equal(read[image_id], albumentations_resized_mask(mask))
    # row-major flattening: the second value of a row is pixel (0, 1)
    first = np.array(lines[1].split(",")[1].split(), dtype=np.int64)
    np.testing.assert_array_equal(first, read["batch_01/0001.jpg"].ravel())


def csv_text(*rows, header="image_id,PredictionString"):
    return "\n".join([header, *rows]) + "\n"


SIZE = 2  # tiny 2x2 predictions keep the hand-written CSVs readable
GOOD_ROW = "a.jpg,0 1 2 3"


@pytest.mark.parametrize("text, kwargs, message", [
    (csv_text(GOOD_ROW, header="id,PredictionString"), {}, "header"),
    (csv_text("a.jpg,0 1 2"), {}, "3 values, expected 4"),
    (csv_text("a.jpg,0 1 2 3 4"), {}, "5 values"),
    (csv_text("a.jpg,0 1 x 3"), {}, "not an integer"),
    (csv_text("a.jpg,0 1 2.5 3"), {}, "not an integer"),
    (csv_text("a.jpg,0 1 2 11"), {}, "0..10"),
    (csv_text("a.jpg,0 -1 2 3"), {}, "0..10"),
    (csv_text(GOOD_ROW, "a.jpg,3 2 1 0"), {}, "appears twice"),
    (csv_text("a.jpg 0 1 2 3"), {}, "no comma"),
    (csv_text(GOOD_ROW), {"expected_ids": ["a.jpg", "b.jpg"]}, "1 test images missing"),
    (csv_text(GOOD_ROW, "c.jpg,0 0 0 0"), {"expected_ids": ["a.jpg"]}, "1 unexpected"),
])
def test_submission_validator_names_the_file(tmp_path, text, kwargs, message):
    path = tmp_path / "submission.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        read_submission(path, NUM_CLASSES, size=SIZE, **kwargs)
    assert message in str(err.value)


def test_a_valid_tiny_submission_reads(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text(csv_text(GOOD_ROW, "b.jpg,10 10 0 0"))
    masks = read_submission(path, NUM_CLASSES, expected_ids=["a.jpg", "b.jpg"], size=SIZE)
    assert masks["a.jpg"].tolist() == [[0, 1], [2, 3]] and masks["b.jpg"].tolist() == [[10, 10], [0, 0]]


@pytest.mark.parametrize("rows, expected_ids, message", [
    ([("a.jpg", np.full((8, 8), NUM_CLASSES, dtype=np.uint8))], None, "0..10"),
    ([("a.jpg", np.zeros((8, 8), dtype=np.uint8))], ["a.jpg", "b.jpg"], "missing"),
    ([("a.jpg", np.zeros((8, 8), dtype=np.uint8))] * 2, None, "twice"),
])
def test_failed_validation_keeps_the_old_submission(tmp_path, rows, expected_ids, message):
    path = tmp_path / "submission.csv"
    write_submission(path, [("old.jpg", np.ones((8, 8), dtype=np.uint8))], NUM_CLASSES)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message) as err:
        write_submission(path, rows, NUM_CLASSES, expected_ids=expected_ids)
    assert str(path) in str(err.value)  # the real file, not the vanished temporary one
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["submission.csv"]


# ---------------------------------------------------------------- atomic files
def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "state.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half-written")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_atomic_open_replaces_on_success(tmp_path):
    path = tmp_path / "state.txt"
    path.write_text("old")
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_atomic_files_get_the_permissions_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    with atomic_open(atomic, "w") as f:
        f.write("x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


# ---------------------------------------------------------------- checkpoints
CODE_RAN = []


def _record_code_ran():
    CODE_RAN.append(True)
    return "payload"


class ArbitraryObject:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return _record_code_ran, ()


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": ArbitraryObject()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path} cannot be loaded safely: Unsupported global: GLOBAL test_utils._record_code_ran was not "
        f"an allowed global by default; only tensors and plain data are read, since unpickling anything else can run "
        f"code: pass a best.pt or last.pt that train.py wrote")
    assert "weights_only" not in str(err.value)  # never torch's advice to load it unsafely
    assert CODE_RAN == []


def saved_then_cut(path, keep):
    """A checkpoint file of which only the first `keep` share of the bytes is left."""
    save_checkpoint({"state_dict": {"w": torch.zeros(100)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[:int(keep * path.stat().st_size)])


@pytest.mark.parametrize("write, message", [
    (lambda path: None, "does not exist: pass a best.pt or last.pt that train.py wrote"),
    (lambda path: saved_then_cut(path, 0), "is empty (0 bytes): copy it again, or pass a best.pt or last.pt that "
                                           "train.py wrote"),
    (lambda path: saved_then_cut(path, 0.5), "cannot be read: it is cut short or not a torch checkpoint (RuntimeError: "
                                             "PytorchStreamReader failed reading zip archive: failed finding central "
                                             "directory); copy it again, or pass a best.pt or last.pt that train.py "
                                             "wrote"),
    (lambda path: path.write_text("hello world"),
     "cannot be read: it is cut short or not a torch checkpoint (KeyError"),
    (lambda path: torch.save({"conv.weight": torch.zeros(1)}, path),
     "lacks ['model', 'state_dict']: it is a bare state dict (weights without their model's description); pass a "
     "best.pt or last.pt that train.py wrote"),
    (lambda path: torch.save([torch.zeros(1)], path), "lacks ['model', 'state_dict']: it is not a train.py checkpoint"),
], ids=["missing", "zero bytes", "cut short", "text", "bare state dict", "list"])
def test_load_checkpoint_names_the_file_and_the_fix_in_one_line(tmp_path, write, message):
    path = tmp_path / "last.pt"
    write(path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path, required_keys=("model", "state_dict"))
    assert str(err.value).startswith(f"checkpoint {path} {message}") and "\n" not in str(err.value)
    assert "weights_only" not in str(err.value)


def test_checkpoint_round_trip(tmp_path):
    state = {"model": {"conv.weight": torch.randn(4, 3, 3, 3)}, "epoch": 7, "best_miou": 0.61,
             "class_names": ["Background", "Paper"]}
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["conv.weight"], state["model"]["conv.weight"])
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}
    assert os.listdir(path.parent) == ["last.pt"]


# ---------------------------------------------------------------- command-line flags
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "argument --lr: must be a number above 0, got 0"),
    ("--lr", "-0.001", "argument --lr: must be a number above 0, got -0.001"),
    ("--lr", "nan", "argument --lr: must be a number above 0, got nan"),
    ("--workers", "-1", "argument --workers: must be 0 or more, got -1"),
    ("--warmup-epochs", "-1", "argument --warmup-epochs: must be a number 0 or more, got -1"),
    ("--cycle-mult", "0.5", "argument --cycle-mult: must be a number 1 or more, got 0.5"),
    ("--cycle-decay", "0", "argument --cycle-decay: must be a number above 0, got 0"),
    ("--aux-weight", "-1", "argument --aux-weight: must be a number 0 or more, got -1"),
    ("--confidence", "1.5", "argument --confidence: must be a number in [0, 1], got 1.5"),
    ("--ema-decay", "1", "argument --ema-decay: must be a number in [0, 1), got 1"),
    ("--copy-paste-p", "inf", "argument --copy-paste-p: must be a number in [0, 1], got inf"),
])
def test_train_refuses_bad_numbers_before_any_work(flag, value, message, capsys):
    parser = train.get_args_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([flag, value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{parser.prog}: error: {message}"
    assert train.get_args_parser().parse_args(["--workers", "0", "--lr", "5e-4"]).lr == 5e-4


@pytest.mark.parametrize("gpus, device, message", [
    (0, "cuda", "cuda: no CUDA GPU is available here: pass --device cpu"),
    (0, "cuda:1", "cuda:1: no CUDA GPU is available here: pass --device cpu"),
    (2, "cuda:2", "cuda:2: this machine has 2 CUDA GPU(s), cuda:0..cuda:1"),
    (0, "gpu", "'gpu' is not a torch device: pass cpu, cuda or cuda:N"),
])
def test_device_flag_refuses_a_gpu_this_machine_lacks(gpus, device, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for parser in (train.get_args_parser(), inference.get_args_parser(), serve.get_args_parser()):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--device", device])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"{parser.prog}: error: argument --device: {message}"
    assert train.get_args_parser().parse_args(["--device", "cpu"]).device == "cpu"
    if gpus:
        assert train.get_args_parser().parse_args(["--device", "cuda:1"]).device == "cuda:1"


# ---------------------------------------------------------------- palette
def test_colorize_ignore_is_white_and_classes_follow_the_palette():
    mask = np.array([[0, 1], [255, 10]], dtype=np.uint8)
    rgb = colorize(mask, NUM_CLASSES)
    palette = class_palette(NUM_CLASSES)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == palette[0].tolist() and rgb[1, 1].tolist() == palette[10].tolist()


@pytest.mark.parametrize("num_classes", [3, NUM_CLASSES, 40])
def test_class_colours_are_distinct(num_classes):
    palette = class_palette(num_classes)
    assert palette.shape == (num_classes, 3)
    colours = {tuple(c) for c in palette.tolist()}
    assert len(colours) == num_classes
    assert (255, 255, 255) not in colours  # white stays the ignore colour


def test_class_table_aligns_columns_and_shows_missing_values_as_dashes():
    table = format_class_table(["Background", "Can"], [("pixels", [np.int64(1200), 7]), ("IoU", [0.5, float("nan")])])
    assert table.split("\n") == ["class       pixels     IoU",
                                 "Background    1200  0.5000",
                                 "Can              7       -"]


def test_overlay_panel_is_the_image_then_one_overlay_per_mask():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 1], [0, 0, 2]], dtype=np.uint8)
    panel = overlay_panel(image, [mask, np.zeros_like(mask)], num_classes=3)
    assert panel.shape == (2, 9, 3)
    np.testing.assert_array_equal(panel[:, :3], image)
    np.testing.assert_array_equal(panel[:, 3:6], overlay(image, mask, 3))
    np.testing.assert_array_equal(panel[:, 6:], image)  # background only: the image unchanged
    assert (panel[0, 4] != image[0, 1]).any()  # a labelled pixel is tinted
