"""Fault tests: a run killed with SIGKILL and resumed ends exactly like one never interrupted.

train.py runs in subprocesses on a tiny demo set. The kill point is found by watching
the run folder: last.pt is written atomically, so it can be loaded as soon as it appears.
"""
import itertools
import json
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

pytestmark = pytest.mark.slow  # subprocess trainings killed and resumed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2  # of 8 training images in batches of 2
KILL_AFTER = (1, 2)  # (epoch, step in epoch) of the last.pt after which the run is killed
RUN_TIMEOUT_S = 300
TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "64", "--batch-size", "2", "--workers", "0",
        "--save-every-steps", "1", "--epochs", str(EPOCHS), "--device", "cpu"]
# One thread per run: the runs share the CPU, and every run computes the same way.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUN_NUMBERS = itertools.count()
# Resume must stay exact with each training-order option: the default sampler, repeat-factor sampling,
# and unlabelled photos (their stream, the EMA teacher, the strong views' RNG); {root} is the data root.
SAMPLER_CASES = {"uniform": [], "repeat-factor": ["--sampler", "repeat-factor", "--repeat-thresh", "0.5"],
                 "unlabeled": ["--unlabeled", "{root}/test.json", "--unlabeled-ratio", "2"]}

KILLED_SAVE = 3  # the saves are last.pt after steps 1, 2 and 3 of epoch 0: the third is cut in half
# train.py, except that its KILLED_SAVE-th torch.save writes half the checkpoint and the process SIGKILLs itself.
DIE_MID_WRITE = f"""
import io, os, signal
import torch
import train

saves, real_save = [], torch.save

def save_half_then_die(obj, f):
    saves.append(f.name)
    if len(saves) < {KILLED_SAVE}:
        return real_save(obj, f)
    whole = io.BytesIO()
    real_save(obj, whole)
    f.write(whole.getvalue()[: whole.tell() // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
train.main(train.get_args_parser().parse_args())
"""


class Run:
    """A training subprocess whose output goes to a log file of its own beside its run folder."""

    def __init__(self, output, args, program=("train.py",)):
        self.output, self.log = output, f"{output}-{next(RUN_NUMBERS)}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=ENV,
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait(self, expect=0):
        """Wait for the end; the exit status must be `expect`. Returns the log."""
        try:
            returncode = self.proc.wait(RUN_TIMEOUT_S)
        finally:
            self.stop()
        with open(self.log) as f:
            log = f.read()
        assert returncode == expect, f"exit status {returncode}, expected {expect}:\n{log[-3000:]}"
        return log

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def exact_args(data_root, output, *extra):
    return [*TINY, "--deterministic", "--data-root", str(data_root), "--cache-dir", f"{output}-cache",
            "--output", str(output), *(arg.format(root=data_root) for arg in extra)]


def position(path):
    """(epoch, step in epoch) stored in a checkpoint."""
    checkpoint = utils.load_checkpoint(path)
    return checkpoint["epoch"], checkpoint["step_in_epoch"]


def kill_once_saved(run, at):
    """SIGKILL the run as soon as its last.pt reports position `at` or later; returns last.pt's position then."""
    last_pt, seen = run.output / utils.LAST_CHECKPOINT, None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run.proc.poll() is None and time.monotonic() < deadline:
        stamp = os.stat(last_pt).st_mtime_ns if last_pt.exists() else None
        if stamp != seen and position(last_pt) >= at:
            break
        seen = stamp
        time.sleep(0.01)
    assert run.proc.poll() is None, "the run ended before it could be killed"
    run.proc.send_signal(signal.SIGKILL)
    run.wait(expect=-signal.SIGKILL)
    return position(last_pt)


def assert_same(a, b, where):
    """Equal nested checkpoint contents, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run_files(reference, output):
    """best.pt and last.pt equal everywhere -- weights, optimizer, scheduler, RNG, best mIoU -- but the command line."""
    for name in ("last.pt", "best.pt"):
        ours, theirs = utils.load_checkpoint(output / name), utils.load_checkpoint(reference / name)
        assert ours.pop("args")["output"] == str(output) and theirs.pop("args")["output"] == str(reference)
        assert_same(ours, theirs, name)


def last_validation(log):
    """The last printed validation: loss, per-class IoU and mIoU."""
    blocks = re.findall(r"epoch \d+ val loss .*?\nmIoU[^\n]*", log, flags=re.S)
    assert blocks, f"no validation in the log:\n{log[-3000:]}"
    return blocks[-1]


@pytest.fixture(scope="module")
def demo_root(demo_set):
    return demo_set(size=64, n_train=8, n_val=4, n_test=2)


@pytest.fixture(scope="module")
def early_runs(demo_root):
    """The runs that wait for nothing start together at once, so that they share the CPU with the tests."""
    mid_write = demo_root / "killed-mid-write"
    runs = {"reference": Run(demo_root / "uninterrupted", exact_args(demo_root, demo_root / "uninterrupted")),
            "mid_write": Run(mid_write, exact_args(demo_root, mid_write), program=("-c", DIE_MID_WRITE))}
    for name, extra in SAMPLER_CASES.items():
        if extra:
            output = demo_root / f"uninterrupted-{name}"
            runs[f"reference-{name}"] = Run(output, exact_args(demo_root, output, *extra))
    yield runs
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def reference(early_runs):
    return early_runs["reference"]


@pytest.mark.parametrize("sampler", SAMPLER_CASES)
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(demo_root, early_runs, sampler):
    reference = early_runs["reference" if not SAMPLER_CASES[sampler] else f"reference-{sampler}"]
    output = demo_root / f"killed-{sampler}"
    args = exact_args(demo_root, output, *SAMPLER_CASES[sampler])
    killed_at = kill_once_saved(Run(output, args), KILL_AFTER)
    # last.pt within an epoch says (epoch, step > 0); at its end (epoch + 1, 0)
    assert killed_at[0] == KILL_AFTER[0] and killed_at[1] >= KILL_AFTER[1], f"killed at {killed_at}, not mid-epoch"
    log = Run(output, args + ["--resume"]).wait()
    assert f"resumed from {output / 'last.pt'} at epoch {killed_at[0] + 1}, step {killed_at[1]}" in log  # from 1
    reference_log = reference.wait()
    assert_same_run_files(reference.output, output)
    assert last_validation(log) == last_validation(reference_log)
    history = json.loads((output / "metrics.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))  # the one before the kill is kept
    assert history == json.loads((reference.output / "metrics.json").read_text())
    assert f"{history[-1]['miou']:.4f}" in last_validation(log)


def test_sigkill_mid_write_keeps_the_previous_last_pt(demo_root, early_runs):
    run, reference = early_runs["mid_write"], early_runs["reference"]
    run.wait(expect=-signal.SIGKILL)
    assert position(run.output / utils.LAST_CHECKPOINT) == (0, KILLED_SAVE - 1)
    half_written = [name for name in os.listdir(run.output) if name.startswith(".last.pt.")]
    assert len(half_written) == 1, os.listdir(run.output)
    with pytest.raises(ValueError, match="cannot be read"):
        utils.load_checkpoint(run.output / half_written[0])
    Run(run.output, exact_args(demo_root, run.output, "--resume")).wait()  # the leftover file is never read
    reference.wait()
    assert_same_run_files(reference.output, run.output)


# ---------------------------------------------------------------- resuming something else
def resume_in_process(data_root, output, checkpoint, *extra):
    """train.main in this process (no --deterministic: it would stay switched on for later tests)."""
    args = [*TINY, "--copy-paste-p", "0", "--data-root", str(data_root), "--cache-dir", f"{output}-cache",
            "--output", str(output), "--resume", str(checkpoint), *extra]
    return train.main(train.get_args_parser().parse_args(args))


def test_resume_with_another_model_names_both(demo_root, reference):
    reference.wait()
    last_pt, output = reference.output / utils.LAST_CHECKPOINT, demo_root / "other-model"
    message = f"{last_pt} is unet/test_resnet, this run is unetpp/test_resnet"
    with pytest.raises(ValueError, match=re.escape(message)):
        resume_in_process(demo_root, output, last_pt, "--model", "unetpp")
    assert not output.exists()  # refused before anything was written


def test_resume_with_changed_arguments_names_them(demo_root, reference, capsys):
    reference.wait()
    resume_in_process(demo_root, demo_root / "changed-args", reference.output / utils.LAST_CHECKPOINT,
                      "--lr", "0.5", "--class-weights", "none", "--workers", "1", "--val-every", "2")
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    changes = warning.split(": ", 2)[2].split("; ")
    assert "lr: 0.002 -> 0.5" in changes and "class_weights: 'auto' -> 'none'" in changes
    assert not [c for c in changes if c.startswith(("workers", "val_every", "output", "resume", "cache_dir"))]


def subset_jsons(root, n_categories):
    """train/val jsons of the demo set cut down to its first `n_categories` categories; returns their names."""
    names = []
    for name in ("train.json", "val.json"):
        with open(root / name) as f:
            coco = json.load(f)
        coco["categories"] = coco["categories"][:n_categories]
        kept = {category["id"] for category in coco["categories"]}
        coco["annotations"] = [ann for ann in coco["annotations"] if ann["category_id"] in kept]
        names.append(f"{n_categories}-classes-{name}")
        with open(root / names[-1], "w") as f:
            json.dump(coco, f)
    return names


def test_resume_with_another_class_count_names_both(demo_root, reference):
    reference.wait()
    last_pt, output = reference.output / utils.LAST_CHECKPOINT, demo_root / "other-classes"
    train_json, val_json = subset_jsons(demo_root, 4)
    with pytest.raises(ValueError) as err:
        resume_in_process(demo_root, output, last_pt, "--train-json", train_json, "--val-json", val_json)
    theirs = ["Background"] + demo.CATEGORY_NAMES
    ours = theirs[:5]
    assert str(err.value).startswith(f"the classes of {last_pt}, {theirs}, differ from those of the dataset, {ours} ")
    assert not output.exists()


def test_a_state_dict_from_elsewhere_is_refused_by_name(demo_root, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} lacks ['model', 'encoder'")):
        resume_in_process(demo_root, tmp_path / "run", path)
