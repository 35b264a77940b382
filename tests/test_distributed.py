"""train.py under DDP: two gloo processes on CPU, and the same script single-process.

The two ranks run in spawned processes and save what they saw under `out/`;
the assertions run here, in the test process, after both have finished.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loss as losses
import model as models
import train
import utils

WORLD_SIZE = 2
TRAIN_IMAGES, BATCH_SIZE = 8, 2  # conftest's tiny_demo and tiny_train_argv
EPOCHS = 3
RUN_FILES = {"args.json", "best.pt", "last.pt", "metrics.json", "tb"}


def tiny_args(base, *extra):
    """train.py's arguments: `base` (the test's tiny_train_argv) and `extra`."""
    return train.get_args_parser().parse_args([*base, *extra])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat_parameters(model):
    return torch.cat([p.detach().reshape(-1) for p in train.unwrap(model).parameters()])


def val_loader(args, train_mix, val_set, rank, world_size):
    """The script's val loader with one image per forward, so every run computes an image's logits alike."""
    one_per_batch = argparse.Namespace(**{**vars(args), "batch_size": 1})
    return train.build_loaders(one_per_batch, train_mix, val_set, rank, world_size)[1]


# ---------------------------------------------------------------- what each rank runs
def rank_main(rank, base, out, ports):
    """One rank: a few steps checked by the tests below, then train.py's main() twice (a run, then its resume)."""
    torch.set_num_threads(1)  # two processes share the CPU
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(ports[0])
    train_and_score(tiny_args(base), out)
    writes = record_writes()
    run = os.path.join(out, "run")
    os.environ["MASTER_PORT"] = str(ports[1])
    train.main(tiny_args(base, "--epochs", "1", "--output", run))
    os.environ["MASTER_PORT"] = str(ports[2])
    train.main(tiny_args(base, "--epochs", "2", "--output", run, "--resume"))
    os.environ["MASTER_PORT"] = str(ports[4])
    unlabeled = os.path.join(base[base.index("--data-root") + 1], "test.json")
    semi_miou = train.main(tiny_args(base, "--epochs", "1", "--output", os.path.join(out, "semi"),
                                     "--unlabeled", unlabeled))
    os.environ["MASTER_PORT"] = str(ports[3])
    dist.init_process_group("gloo")
    nan_on_rank_0 = train.finite_everywhere(torch.tensor(float("nan") if rank == 0 else 1.0))
    all_finite = train.finite_everywhere(torch.tensor(1.0))
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"writes": writes, "finite": [nan_on_rank_0, all_finite], "semi_miou": semi_miou}, f)


def train_and_score(args, out):
    """A few DDP steps with the script's own loaders and model, then its evaluate() and the metric's all-reduce."""
    rank, world_size, local_rank = train.init_distributed(args.device)
    mean, std = models.encoder_normalization(models.resolve_encoder(args.encoder))
    train_set, train_mix, val_set = train.build_datasets(args, mean, std)
    num_classes = len(train_set.class_names)
    train_loader, _ = train.build_loaders(args, train_mix, val_set, rank, world_size)
    model = train.build_model(args, num_classes, local_rank, world_size)
    initial = flat_parameters(model)
    state = train.build_state(args, model, train_set, num_classes, len(train_loader), (mean, std))
    indices = []
    for epoch in range(EPOCHS):
        train_loader.sampler.set_epoch(epoch)
        indices.append([index for index, _ in train_loader.sampler])
        train.train_one_epoch(state, train_loader, epoch, 0, len(train_loader), args, rank, lambda *_: None)
    scores = train.evaluate(model, val_loader(args, train_mix, val_set, rank, world_size), state["criterion"],
                            num_classes, args, rank)
    targets, preds = random_predictions(num_classes)
    confusion = utils.ConfusionMatrix(num_classes)
    for i in range(rank, len(targets), world_size):  # this rank's disjoint share
        confusion.update(targets[i], preds[i])
    confusion.all_reduce()
    torch.save({"initial": initial, "final": flat_parameters(model), "indices": indices, "steps": state["global_step"],
                "scores": scores, "confusion": confusion.mat, "state_dict": train.unwrap(model).state_dict()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def random_predictions(num_classes, n=6, side=16):
    """The same seeded (targets, predictions) on every rank; some targets are the ignore label."""
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, num_classes, (n, side, side), generator=gen)
    targets[:, :2] = utils.IGNORE_INDEX
    return targets, torch.randint(0, num_classes, (n, side, side), generator=gen)


def record_writes():
    """Paths this process writes through utils.atomic_open (checkpoints, args.json): every run file but TensorBoard's."""
    paths = []
    original = utils.atomic_open

    def recording(path, *args, **kwargs):
        paths.append(os.path.abspath(path))
        return original(path, *args, **kwargs)

    utils.atomic_open = recording
    return paths


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ddp_run(tiny_demo, tiny_train_argv, tmp_path_factory):
    """Run both ranks once; returns (train.py's base arguments, out folder, what the ranks printed)."""
    base = tiny_train_argv(tiny_demo)
    out = str(tmp_path_factory.mktemp("ranks"))
    log = os.path.join(out, "stdout.txt")
    with open(log, "w") as f:  # the children print to the inherited stdout: send it to a file
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            mp.spawn(rank_main, args=(base, out, [free_port() for _ in range(5)]), nprocs=WORLD_SIZE)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    with open(log) as f:
        return base, out, f.read()


def load_rank_json(out, rank):
    with open(os.path.join(out, f"rank{rank}.json")) as f:
        return json.load(f)


def load_ranks(out):
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
def test_parameters_stay_identical_across_ranks(ddp_run):
    ranks = load_ranks(ddp_run[1])
    assert ranks[0]["steps"] == ranks[1]["steps"] == EPOCHS * TRAIN_IMAGES // (WORLD_SIZE * BATCH_SIZE)
    assert not torch.equal(ranks[0]["initial"], ranks[0]["final"])  # training did move the weights
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


@pytest.mark.slow
def test_sampler_deals_disjoint_shares_reshuffled_each_epoch(ddp_run):
    ranks = load_ranks(ddp_run[1])
    for epoch in range(EPOCHS):
        shares = [set(r["indices"][epoch]) for r in ranks]
        assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(TRAIN_IMAGES))
    assert ranks[0]["indices"][0] != ranks[0]["indices"][1]


@pytest.mark.slow
def test_all_reduced_confusion_equals_single_process(ddp_run):
    ranks = load_ranks(ddp_run[1])
    num_classes = ranks[0]["confusion"].shape[0]
    expected = utils.ConfusionMatrix(num_classes)
    for target, pred in zip(*random_predictions(num_classes)):
        expected.update(target, pred)
    assert expected.mat.sum() > 0
    for rank in ranks:
        assert torch.equal(rank["confusion"], expected.mat)


@pytest.mark.slow
def test_distributed_evaluate_equals_single_process(ddp_run):
    base, out, _ = ddp_run
    ranks = load_ranks(out)
    args = tiny_args(base)
    mean, std = models.encoder_normalization(models.resolve_encoder(args.encoder))
    train_set, train_mix, val_set = train.build_datasets(args, mean, std)
    num_classes = len(train_set.class_names)
    model = models.create_model(args.model, models.resolve_encoder(args.encoder), num_classes)
    model.load_state_dict(ranks[0]["state_dict"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks, so the predictions are bit for bit the same
    try:
        single = train.evaluate(model, val_loader(args, train_mix, val_set, 0, 1),
                                losses.build_loss(args.loss, num_classes), num_classes, args)
    finally:
        torch.set_num_threads(threads)
    for rank in ranks:
        np.testing.assert_array_equal(rank["scores"]["iou"], single["iou"])
        assert rank["scores"]["miou"] == single["miou"]


@pytest.mark.slow
def test_only_rank_zero_writes_and_resume_continues(ddp_run):
    _, out, printed = ddp_run
    run = os.path.join(out, "run")
    writes = [load_rank_json(out, rank)["writes"] for rank in range(WORLD_SIZE)]
    assert not [path for path in writes[1] if path.startswith(run + os.sep)]
    assert {os.path.basename(path) for path in writes[0]} >= {"args.json", "last.pt", "best.pt"}
    assert set(os.listdir(run)) == RUN_FILES
    assert len(os.listdir(os.path.join(run, "tb"))) == 2  # one event file per run, both from rank 0
    assert printed.count(f"checkpoints in {run}\n") == 2
    assert "at the end of epoch 1" in printed  # the second run resumed where the first stopped
    checkpoint = utils.load_checkpoint(os.path.join(run, utils.LAST_CHECKPOINT))
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 2 * TRAIN_IMAGES // (WORLD_SIZE * BATCH_SIZE)


@pytest.mark.slow
def test_unlabeled_photos_train_under_ddp_with_one_teacher(ddp_run):
    _, out, printed = ddp_run
    assert printed.count("unlabelled photos: 3;") == 1  # the tiny demo's test images, counted by rank 0 alone
    mious = [load_rank_json(out, rank)["semi_miou"] for rank in range(WORLD_SIZE)]
    assert mious[0] == mious[1]  # one all-reduced validation of the model and its EMA
    checkpoint = utils.load_checkpoint(os.path.join(out, "semi", utils.LAST_CHECKPOINT))
    assert checkpoint["global_step"] == TRAIN_IMAGES // (WORLD_SIZE * BATCH_SIZE)
    assert checkpoint["ema_state_dict"].keys() == checkpoint["state_dict"].keys()


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank(ddp_run):
    out = ddp_run[1]
    # [NaN on rank 0 only, finite everywhere], as each rank saw it
    assert [load_rank_json(out, rank)["finite"] for rank in range(WORLD_SIZE)] == [[False, True]] * WORLD_SIZE


@pytest.mark.slow
def test_plain_python_runs_single_process(tiny_demo, tiny_train_argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # as the ranks above: threads fighting over a busy CPU slow the steps severalfold
    run = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "train.py", *tiny_train_argv(tiny_demo, "--epochs", 1, "--output", run)],
                            cwd=os.path.dirname(os.path.abspath(train.__file__)), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done in" in result.stdout
    assert set(os.listdir(run)) == RUN_FILES


def test_sync_bn_on_cpu_is_refused_with_a_clear_error(tiny_demo, tiny_train_argv):
    with pytest.raises(utils.UserError, match="--sync-bn needs CUDA devices, not --device cpu: .* drop --sync-bn, or "
                                              "train on GPUs"):
        train.build_model(tiny_args(tiny_train_argv(tiny_demo), "--sync-bn"), num_classes=3, local_rank=0,
                          world_size=WORLD_SIZE)


def test_fewer_val_images_than_processes_are_refused(tiny_demo, tiny_train_argv):
    with pytest.raises(utils.UserError, match=r"1 validation images cannot be shared among 2 processes, .* start at "
                                              r"most 1 \(torchrun --nproc-per-node\), or validate on more images"):
        train.build_loaders(tiny_args(tiny_train_argv(tiny_demo)), list(range(TRAIN_IMAGES)), [0], rank=0,
                            world_size=WORLD_SIZE)
