"""What a training run prints and writes: the start-up summary, epochs numbered from 1 (console and
metrics.json), and best.pt without the training state that only last.pt needs."""
import argparse
import json
import re
import shutil
import types

import pytest
import torch

import dataset as data
import model as models
import train
import utils


def parameters_in_millions(*args):
    return f"{sum(p.numel() for p in models.create_model(*args).parameters()) / 1e6:.2f} M parameters"


@pytest.mark.slow
def test_summary_comes_before_the_preflight_and_epochs_count_from_1(tiny_demo, run_train, tmp_path, capsys):
    output = tmp_path / "run"
    run_train(tiny_demo, "--epochs", 2, "--output", output)
    captured = capsys.readouterr()
    names = utils.load_checkpoint(output / utils.LAST_CHECKPOINT)["class_names"]
    summary = "\n".join([
        "data:   8 training images, 4 validation images",
        f"        11 classes: {', '.join(names)}",
        "        trained at 64 x 64 px; the photos are all 64x64 px (width x height)",
        f"model:  unet on test_resnet, {parameters_in_millions('unet', 'test_resnet', 11)}",
        "device: cpu; precision fp32; channels-last off",
        f"output: {output}",
    ])
    assert summary in captured.out
    assert captured.out.index(summary) < captured.out.index("preflight passed")
    assert re.findall(r"epoch (\d+) val loss", captured.out) == ["1", "2"]
    assert "epoch 1: " in captured.err and "epoch 2: " in captured.err and "epoch 0" not in captured.err  # tqdm
    assert [record["epoch"] for record in json.loads((output / "metrics.json").read_text())] == [1, 2]
    assert utils.load_checkpoint(output / utils.LAST_CHECKPOINT)["epoch"] == 2  # epochs done, as resume reads it


def test_summary_counts_every_source_and_the_range_of_photo_sizes():
    class Part(list):
        def __init__(self, sizes):
            super().__init__(sizes)
            self.images = [{"width": w, "height": h} for w, h in sizes]
            self.class_names = ["Background", "Can", "Jar"]

    train_set, extra, val_set = Part([(640, 480)] * 3), Part([(64, 64)] * 2), Part([(480, 640), (4000, 3000)])
    rotated = Part([(640, 480), (480, 640)])
    pseudo = data.RatioMix(list(range(10)), 4)
    args = argparse.Namespace(size=512, model="upernet", encoder="cnxt", pretrained=True, weights=None,
                              device="cuda:0", amp="bf16", channels_last=True, output="runs/x")
    model = torch.nn.Linear(1000, 1500)
    summary = train.startup_summary(args, train_set, types.SimpleNamespace(datasets=[train_set, extra, pseudo]),
                                    val_set, types.SimpleNamespace(dataset=[0] * 7), model, world_size=4)
    assert summary.split("\n") == [
        "data:   3 training images (+ 2 extra (--extra-json), + 4 pseudo-labelled per epoch, drawn from 10, "
        "+ 7 unlabelled), 2 validation images",
        "        3 classes: Background, Can, Jar",
        "        trained at 512 x 512 px; the photos are 64x64 to 4000x3000 px (width x height)",
        "model:  upernet on convnext_tiny.fb_in22k_ft_in1k, 1.50 M parameters, pretrained",
        "device: cuda:0 x 4 processes; precision bf16 autocast; channels-last on",
        "output: runs/x",
    ]
    summary = train.startup_summary(args, rotated, types.SimpleNamespace(datasets=[rotated]), rotated, None, model, 1)
    assert "the photos are 480x640 to 640x480 px (width x height)" in summary  # as many pixels, not one size


def test_a_resumed_history_keeps_the_validations_of_the_epochs_done(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps([{"epoch": epoch} for epoch in (1, 2, 3)]))
    assert train.earlier_history(str(path), 2) == [{"epoch": 1}, {"epoch": 2}]
    assert train.earlier_history(str(path), 0) == []


# ---------------------------------------------------------------- best.pt
@pytest.mark.slow
def test_best_pt_holds_no_training_state_and_last_pt_does(tiny_run):
    best = utils.load_checkpoint(tiny_run / utils.BEST_CHECKPOINT)
    last = utils.load_checkpoint(tiny_run / utils.LAST_CHECKPOINT)
    assert not set(train.TRAINING_STATE_KEYS) & set(best)
    assert set(train.RESUME_KEYS) <= set(last) and "ema_state_dict" in last
    assert set(utils.MODEL_KEYS + ("args", "epoch", "best_miou")) <= set(best)
    assert (best["epoch"], best["best_miou"], best["args"]) == (last["epoch"], last["best_miou"], last["args"])
    assert (tiny_run / utils.BEST_CHECKPOINT).stat().st_size < 0.5 * (tiny_run / utils.LAST_CHECKPOINT).stat().st_size


@pytest.mark.slow
def test_resume_from_best_pt_is_refused_naming_last_pt(tiny_demo, tiny_run, run_train, tmp_path):
    output = shutil.copytree(tiny_run, tmp_path / "run")
    last = (output / utils.LAST_CHECKPOINT).read_bytes()
    with pytest.raises(utils.UserError) as error:
        run_train(tiny_demo, "--epochs", 2, "--output", output, "--resume", output / utils.BEST_CHECKPOINT)
    assert str(error.value) == (f"--resume {output}/best.pt: this checkpoint holds the weights to predict with (a "
                                f"best.pt) but no training state (optimizer, scheduler, RNG): pass the run's last.pt "
                                f"({output}/last.pt)")
    assert (output / utils.LAST_CHECKPOINT).read_bytes() == last


@pytest.mark.slow
def test_an_old_best_pt_with_training_state_still_loads(tiny_demo, tiny_run, run_inference, tmp_path):
    """Before this change best.pt held everything last.pt holds: one-epoch runs' best.pt and last.pt share weights."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tiny_run / utils.LAST_CHECKPOINT, old / utils.BEST_CHECKPOINT)
    assert "optimizer" in train.load_resume_checkpoint(str(old / utils.BEST_CHECKPOINT))
    scores = [run_inference("--checkpoints", folder, "--data-root", tiny_demo, "--json", "val.json", "--eval",
                            "--output", tmp_path / f"{folder.name}.csv")["miou"] for folder in (old, tiny_run)]
    assert scores[0] == scores[1]
