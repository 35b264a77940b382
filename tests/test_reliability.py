"""Faults that end in a clear message or a counted note, never a silent wrong result: non-finite training, fp16
overflow, checkpoints from strangers, an empty image selection, counts below one.

Json checks are in test_coco_checks.py, json and image faults of the datasets in test_dataset.py, checkpoint
loading and CSV checks in test_utils.py, kills and resumes in test_resume.py, model inputs in test_models.py.
"""
import argparse
import json
import math
import re

import pytest
import torch

import dataset
import loss as losses
import train
import utils

ADVICE = "Try a lower --lr, --clip-grad or --amp off."
FAST = ["--size", "32", "--copy-paste-p", "0"]  # on top of the tiny arguments


# ---------------------------------------------------------------- NaN / inf during training
POISONS = {
    "nan loss": lambda loss, logits: loss + math.nan,
    "inf loss": lambda loss, logits: loss + math.inf,
    # the value stays finite; d sqrt(z)/dz at z = 0 is inf, times 0 gives NaN gradients and NaN weights
    "nan gradient": lambda loss, logits: loss + 0 * torch.sqrt(logits.sum() * 0),
}


class PoisonedLoss(torch.nn.Module):
    """The real loss until call `at` (1-based), which is poisoned; records last.pt's bytes at that moment."""

    def __init__(self, criterion, poison, at, last_pt):
        super().__init__()
        self.criterion, self.poison, self.at, self.last_pt = criterion, poison, at, last_pt
        self.calls, self.last_pt_then = 0, None

    def forward(self, logits, target):
        self.calls += 1
        loss = self.criterion(logits, target)
        if self.calls != self.at:
            return loss
        self.last_pt_then = self.last_pt.read_bytes() if self.last_pt.exists() else None
        return self.poison(loss, logits)


@pytest.mark.slow
@pytest.mark.parametrize("poison, at, reason, kept_position", [
    ("nan loss", 3, "loss is nan at epoch 1, step 3", (0, 2)),
    ("inf loss", 1, "loss is inf at epoch 1, step 1", None),
    ("nan gradient", 3, "the weights hold NaN/inf at epoch 1, step 3", (0, 2)),
])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tiny_demo, run_train, tmp_path, monkeypatch,
                                                                      poison, at, reason, kept_position):
    last_pt = tmp_path / "run" / utils.LAST_CHECKPOINT
    real_build_loss, poisoned = losses.build_loss, []

    def build_poisoned_loss(*args, **kwargs):
        poisoned.append(PoisonedLoss(real_build_loss(*args, **kwargs), POISONS[poison], at, last_pt))
        return poisoned[-1]

    monkeypatch.setattr(losses, "build_loss", build_poisoned_loss)
    with pytest.raises(SystemExit) as stop:
        # no preflight: its validation would count as calls of the poisoned loss
        run_train(tiny_demo, *FAST, "--output", tmp_path / "run", "--save-every-steps", 1, "--no-preflight")
    if kept_position is None:
        assert stop.value.code == f"stopped: {reason}; no checkpoint was saved yet. {ADVICE}"
        assert not last_pt.exists()
        return
    assert stop.value.code == f"stopped: {reason}; the last good checkpoint is {last_pt}. {ADVICE}"
    assert last_pt.read_bytes() == poisoned[0].last_pt_then  # not touched since the poisoned step
    checkpoint = utils.load_checkpoint(last_pt)
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == kept_position
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_fp16_overflow_steps_are_skipped_and_counted():
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    state = {"model": net, "optimizer": optimizer, "scaler": torch.amp.GradScaler("cpu", init_scale=4.0),
             "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
             "global_step": 0, "skipped_steps": 0, "teacher": None}
    before = net.weight.detach().clone()
    for factor, changed in [(math.inf, False), (1.0, True)]:  # an overflowing loss, then a normal one
        state["scaler"].scale(net(torch.ones(1, 2)).sum() * factor).backward()
        train.optimizer_step(state, argparse.Namespace(clip_grad=None))
        assert (not torch.equal(net.weight, before)) == changed
    assert state["skipped_steps"] == 1 and state["global_step"] == 2


# ---------------------------------------------------------------- checkpoints
CODE_RAN = []


def _record_code_ran():
    CODE_RAN.append(True)
    return {}


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return _record_code_ran, ()


@pytest.mark.parametrize("content, message", [
    ({"model": RunsCodeWhenUnpickled()}, "cannot be loaded safely: Unsupported global"),
    ({"conv.weight": torch.zeros(1)}, "lacks ['model', 'encoder'"),  # a bare state dict
])
def test_inference_refuses_a_strangers_checkpoint(run_inference, tmp_path, content, message):
    path = tmp_path / "stranger.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} {message}")):
        run_inference("--checkpoints", path, "--data-root", tmp_path, "--output", tmp_path / "submission.csv")
    assert CODE_RAN == []


def plain_data(value):
    """True for tensors and json-like data: what weights_only loading accepts without surprises."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain_data(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


@pytest.mark.slow
def test_checkpoints_hold_only_plain_data(tiny_run):
    for name, keys in (("best.pt", utils.MODEL_KEYS + ("args",)), ("last.pt", train.RESUME_KEYS)):
        checkpoint = utils.load_checkpoint(tiny_run / name, required_keys=keys)
        assert json.loads(json.dumps(checkpoint["args"])) == checkpoint["args"]
        assert checkpoint["args"]["output"] == str(tiny_run)
        assert plain_data(checkpoint)


# ---------------------------------------------------------------- image selections
def test_an_image_selection_with_no_images(tiny_demo):
    with pytest.raises(ValueError, match=re.escape(f"{tiny_demo / 'val.json'}: no images selected for train")):
        dataset.SegmentationDataset(str(tiny_demo), "val.json", "train", image_ids=[])


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("flag", ["--size", "--epochs", "--batch-size", "--accum-steps", "--val-every"])
def test_sizes_and_counts_below_one_are_refused_by_name(flag, capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args([flag, "0"])
    assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err
