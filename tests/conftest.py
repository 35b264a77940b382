"""Shared fixtures: a tiny demo set, a one-epoch run on it, and the scripts' main() with tiny arguments.

The session's demo set is shared by many tests: treat it as read-only (its mask cache aside)
and ask for `tiny_demo_copy` to change it. Runs and predictions go to each test's own folders.
"""
import os
import runpy
import shutil
import sys

import pytest
import torch

import demo
import images as imaging
import inference
import pseudo_label
import train
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SIZES = dict(size=64, n_train=8, n_val=4, n_test=3)
# A tiny model on tiny images, one CPU process: a few seconds an epoch.
TINY_TRAIN = ["--model", "unet", "--encoder", "test_resnet", "--size", "64", "--batch-size", "2", "--workers", "0",
              "--device", "cpu"]
SCRIPT_FLAGS = ["--workers", "0", "--device", "cpu"]  # inference.py and pseudo_label.py


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    """A function (size, n_train, n_val, n_test) -> root (a pathlib.Path) of such a demo set, built once.

    For test files that need other sizes than `tiny_demo`; the same rule holds: read-only.
    """
    built = {}

    def make(size, n_train, n_val, n_test):
        key = (size, n_train, n_val, n_test)
        if key not in built:
            built[key] = tmp_path_factory.mktemp("demo") / "data"
            demo.make_demo(str(built[key]), size=size, n_train=n_train, n_val=n_val, n_test=n_test)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_demo(demo_set):
    """Root (a pathlib.Path) of a demo set of 8 train, 4 val and 3 test images of 64 x 64."""
    return demo_set(**DEMO_SIZES)


@pytest.fixture
def tiny_demo_copy(tiny_demo, tmp_path):
    """A copy of the tiny demo set (mask cache included) that the test may change."""
    return shutil.copytree(tiny_demo, tmp_path / "data")


@pytest.fixture
def image_reads(monkeypatch):
    """The real paths of the images read through imaging.read_image during the test, in order."""
    paths, real_read = [], imaging.read_image

    def recording(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(imaging, "read_image", recording)
    return paths


@pytest.fixture(scope="session")
def tiny_train_argv():
    """tiny_train_argv(root, *argv): train.py's tiny arguments on the demo set at `root` (mask cache inside it)."""
    def argv(root, *extra):
        return list(map(str, [*TINY_TRAIN, "--data-root", root, "--cache-dir", root / "cache", *extra]))
    return argv


@pytest.fixture(scope="session")
def run_train(tiny_train_argv):
    """run_train(root, *argv): train.py's main() with tiny_train_argv(root, *argv)."""
    def run(root, *extra):
        return train.main(train.get_args_parser().parse_args(tiny_train_argv(root, *extra)))
    return run


@pytest.fixture(scope="session")
def run_inference():
    """run_inference(*argv): inference.py's main() on the CPU without worker processes."""
    def run(*argv):
        return inference.main(inference.get_args_parser().parse_args([*map(str, argv), *SCRIPT_FLAGS]))
    return run


@pytest.fixture(scope="session")
def run_pseudo_label():
    """run_pseudo_label(*argv): pseudo_label.py's main() on the CPU without worker processes."""
    def run(*argv):
        return pseudo_label.main(pseudo_label.get_args_parser().parse_args([*map(str, argv), *SCRIPT_FLAGS]))
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_demo, run_train, tmp_path_factory):
    """Run folder of one epoch on the tiny demo set (best.pt, last.pt, ...); copy it before changing it."""
    output = tmp_path_factory.mktemp("tiny_run") / "run"
    run_train(tiny_demo, "--epochs", 1, "--output", output)
    return output


@pytest.fixture(scope="session")
def constant_checkpoint(tiny_run):
    """constant_checkpoint(path, label, **args): tiny_run's best.pt made to predict `label` at every pixel.

    The head's weights are zeroed and its bias is one-hot, so the logits are the same everywhere;
    `args` replace entries of the checkpoint's saved training arguments (e.g. fold=1).
    """
    def write(path, label, **args):
        checkpoint = utils.load_checkpoint(tiny_run / utils.BEST_CHECKPOINT)
        weights = checkpoint["state_dict"]
        weights["head.weight"] = torch.zeros_like(weights["head.weight"])
        num_classes = len(weights["head.bias"])
        weights["head.bias"] = 10.0 * torch.nn.functional.one_hot(torch.tensor(label), num_classes).float()
        checkpoint["args"] = {**checkpoint["args"], **args}
        utils.save_checkpoint(checkpoint, path)
        return path
    return write


@pytest.fixture
def script_error(monkeypatch, capsys):
    """script_error(script, *argv): the `error: ...` line of `script`'s own `__main__` run, which must end in a
    UserError: exit status 2 and that one stderr line, no traceback.

    Run in this process (a fresh interpreter costs seconds of imports); the modules it imports are the
    ones the test sees, so a test may monkeypatch them.
    """
    def run(script, *argv):
        monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
        capsys.readouterr()  # what fixtures printed before
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
        stderr = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "\n" not in stderr and stderr.startswith("error: "), stderr
        return stderr
    return run
