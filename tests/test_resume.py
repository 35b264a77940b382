"""Fault test: a run killed with SIGKILL mid-epoch and resumed ends exactly like one never interrupted.

Runs train.py in subprocesses on a tiny demo set (about 10 s each on a CPU). The kill
point is chosen by watching the run folder: last.pt is written atomically, so it can
be loaded the moment it appears.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import demo
import train
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, BATCHES_PER_EPOCH = 2, 4  # 8 training images in batches of 2
KILL_AT = (1, 2)  # (epoch, step in epoch) after which the run is killed
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.make_demo(str(root), size=64, n_train=8, n_val=4, n_test=2)
    return root


def train_args(data_root, output, *extra):
    return ["--data-root", str(data_root), "--model", "unet", "--encoder", "test_resnet", "--size", "64",
            "--batch-size", "2", "--workers", "0", "--deterministic", "--save-every-steps", "1",
            "--epochs", str(EPOCHS), "--cache-dir", str(data_root / "cache"), "--output", str(output), *extra]


def start_training(args, log_prefix, python_code=None):
    """train.py (or `python_code` reading the same argv) in a subprocess; output goes to log files."""
    program = ["-c", python_code] if python_code else [os.path.join(REPO, "train.py")]
    out, err = open(f"{log_prefix}.out", "w"), open(f"{log_prefix}.err", "w")
    with out, err:
        return subprocess.Popen([sys.executable, *program, *args], cwd=REPO, stdout=out, stderr=err)


def finish(proc, log_prefix):
    """Wait for a run to end well; on failure show its log."""
    try:
        returncode = proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert returncode == 0, f"training failed ({returncode}):\n" + read_log(log_prefix)[-3000:]
    return read_log(log_prefix)


def read_log(log_prefix):
    with open(f"{log_prefix}.out") as out, open(f"{log_prefix}.err") as err:
        return out.read() + err.read()


def position(path):
    """(epoch, step in epoch) stored in a checkpoint."""
    checkpoint = utils.load_checkpoint(path)
    return checkpoint["epoch"], checkpoint["step_in_epoch"]


def kill_when_saved(proc, last_pt, at):
    """SIGKILL the run once last.pt reports position `at` or later; returns the position it holds then."""
    deadline, seen_mtime = time.monotonic() + RUN_TIMEOUT_S, None
    while proc.poll() is None and time.monotonic() < deadline:
        mtime = os.stat(last_pt).st_mtime_ns if os.path.exists(last_pt) else None
        if mtime != seen_mtime and position(last_pt) >= at:
            break
        seen_mtime = mtime
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(RUN_TIMEOUT_S) == -signal.SIGKILL
    return position(last_pt)


def assert_same(a, b, where="checkpoint"):
    """Equal nested checkpoint contents; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_run_args(checkpoint):
    """The checkpoint less the command line, which names another output folder and --resume."""
    return {key: value for key, value in checkpoint.items() if key != "args"}


def last_validation(log):
    """The last epoch's printed validation block: loss, per-class IoU and mIoU."""
    blocks = re.findall(r"epoch \d+ val loss .*?\nmIoU[^\n]*", log, flags=re.S)
    assert blocks, "no validation in the log"
    return blocks[-1]


@pytest.fixture(scope="module")
def uninterrupted(demo_root):
    output = demo_root / "uninterrupted"
    log = finish(start_training(train_args(demo_root, output), output), output)
    return output, log


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(demo_root, uninterrupted):
    reference, reference_log = uninterrupted
    output = demo_root / "killed"
    args = train_args(demo_root, output)
    killed_at = kill_when_saved(start_training(args, output), output / "last.pt", KILL_AT)
    assert KILL_AT <= killed_at < (KILL_AT[0], BATCHES_PER_EPOCH), f"killed at {killed_at}, not mid-epoch"
    log = finish(start_training(args + ["--resume"], f"{output}-resumed"), f"{output}-resumed")
    assert f"resumed from {output / 'last.pt'} at epoch {killed_at[0]}, step {killed_at[1]}" in log
    for name in ("last.pt", "best.pt"):
        assert_same(without_run_args(utils.load_checkpoint(reference / name)),
                     without_run_args(utils.load_checkpoint(output / name)), name)
    assert last_validation(log) == last_validation(reference_log)
