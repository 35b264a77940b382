"""train.py's --fold, --extra-json, --class-weights auto and --accum-steps on the tiny demo set."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coco_utils
import dataset as data
import loss as losses
import model as models
import train
import utils

BATCHES_PER_EPOCH = 4  # 8 training images in batches of 2


def global_step(run):
    """Optimizer steps taken by the run in `run` (a folder)."""
    return utils.load_checkpoint(run / utils.LAST_CHECKPOINT)["global_step"]


# ---------------------------------------------------------------- --fold
def test_fold_trains_and_validates_on_its_share_of_all_json(tiny_demo, tiny_train_argv):
    coco = coco_utils.Coco(str(tiny_demo / "train_all.json"), str(tiny_demo))
    folds = data.kfold_splits(coco, 3, seed=0)
    mean, std = models.encoder_normalization("test_resnet")
    seen_in_val = []
    for fold in range(3):
        args = train.get_args_parser().parse_args(
            tiny_train_argv(tiny_demo, "--fold", fold, "--n-folds", 3, "--copy-paste-p", 0))
        train_set, _, val_set = train.build_datasets(args, mean, std)
        train_ids, val_ids = ({image["id"] for image in part.images} for part in (train_set, val_set))
        assert train_set.coco.path == val_set.coco.path == str(tiny_demo / "train_all.json")
        assert val_ids == set(folds[fold])
        assert not train_ids & val_ids and train_ids | val_ids == {image["id"] for image in coco.images}
        seen_in_val += sorted(val_ids)
    assert sorted(seen_in_val) == sorted(image["id"] for image in coco.images)  # each image validated once


# ---------------------------------------------------------------- --extra-json
@pytest.mark.slow
def test_extra_json_images_are_trained_on(tiny_demo_copy, tiny_run, run_train, tmp_path, image_reads):
    extra = tiny_demo_copy / "extra.json"
    extra.write_text((tiny_demo_copy / "val.json").read_text())  # 4 more labelled images
    # no preflight: it reads images too, and this test counts the reads
    run_train(tiny_demo_copy, "--epochs", 1, "--output", tmp_path / "run", "--extra-json", extra, "--no-preflight")
    assert global_step(tiny_run) == BATCHES_PER_EPOCH
    assert global_step(tmp_path / "run") == BATCHES_PER_EPOCH + 2  # 8 + 4 images in batches of 2
    val = coco_utils.Coco(str(tiny_demo_copy / "val.json"), str(tiny_demo_copy))
    val_paths = [os.path.realpath(val.image_path(image)) for image in val.images]
    # each read twice: once trained on, once validated
    assert sorted(path for path in image_reads if path in val_paths) == sorted(val_paths * 2)


# ---------------------------------------------------------------- --class-weights auto
class LossBuilt(Exception):
    """Raised with the criterion train.py built, to stop before any training."""


def test_auto_class_weights_come_from_the_training_pixels(tiny_demo, run_train, tmp_path, monkeypatch):
    real_build_loss = losses.build_loss

    def build_and_stop(*args, **kwargs):
        raise LossBuilt(real_build_loss(*args, **kwargs))

    monkeypatch.setattr(losses, "build_loss", build_and_stop)
    with pytest.raises(LossBuilt) as built:
        run_train(tiny_demo, "--loss", "ce", "--class-weights", "auto", "--output", tmp_path / "run")
    criterion = built.value.args[0]

    train_set = data.SegmentationDataset(str(tiny_demo), "train.json", "val")
    num_classes = len(train_set.class_names)
    counts = sum(np.bincount(train_set.label_mask(i).ravel(), minlength=256)[:num_classes]
                 for i in range(len(train_set)))
    weights = losses.auto_class_weights(torch.as_tensor(counts))
    assert not torch.allclose(weights, weights.mean())  # unequal, so unweighted CE would differ
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 8, 8, generator=generator)
    target = torch.randint(0, num_classes, (2, 8, 8), generator=generator)
    expected = F.cross_entropy(logits, target, weight=weights)
    assert criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- --accum-steps
@pytest.mark.slow
def test_accumulation_takes_one_optimizer_step_per_accum_batches(tiny_demo, run_train, tmp_path):
    run_train(tiny_demo, "--epochs", 1, "--accum-steps", 3, "--output", tmp_path / "run")
    assert global_step(tmp_path / "run") == 2  # ceil(4 batches / 3): the last, short group steps too
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [record["epoch"] for record in history] == [1]


def one_epoch(batches, accum_steps):
    """train_one_epoch on `batches` with a net without batch norm and plain SGD; (weights after, optimizer steps)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    state = {"model": net, "optimizer": optimizer, "criterion": losses.build_loss("ce", 4),
             "scaler": torch.amp.GradScaler("cpu", enabled=False),
             "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
             "global_step": 0, "skipped_steps": 0, "teacher": None}
    args = argparse.Namespace(accum_steps=accum_steps, device="cpu", amp="off", channels_last=False, clip_grad=None)
    train.train_one_epoch(state, batches, 0, 0, len(batches), args, 0, lambda *_: None)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), state["global_step"]


def test_two_accumulated_half_batches_step_like_one_full_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 8, 8, generator=generator)
    masks = torch.randint(0, 4, (4, 8, 8), generator=generator)  # no ignored pixel: halves weigh the same
    halves = [(images[:2], masks[:2]), (images[2:], masks[2:])]
    full, full_steps = one_epoch([(images, masks)], accum_steps=1)
    accumulated, accumulated_steps = one_epoch(halves, accum_steps=2)
    stepped_twice, _ = one_epoch(halves, accum_steps=1)
    assert full_steps == accumulated_steps == 1
    torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stepped_twice, full, rtol=1e-5, atol=1e-6)  # the check can tell the difference
