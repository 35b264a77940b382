"""Shared fixtures: a tiny demo set, a one-epoch run on it, and the scripts' main() with tiny arguments.

The session's demo set is shared by many tests: treat it as read-only (its mask cache aside)
and ask for `tiny_demo_copy` to change it. Runs and predictions go to each test's own folders.
"""
import json
import os
import runpy
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import demo
import images as imaging
import inference
import model
import pseudo_label
import train
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SIZES = dict(size=64, n_train=8, n_val=4, n_test=3)
# A tiny model on tiny images, one CPU process: a few seconds an epoch.
TINY_TRAIN = ["--model", "unet", "--encoder", "test_resnet", "--size", "64", "--batch-size", "2", "--workers", "0",
              "--device", "cpu"]
SCRIPT_FLAGS = ["--workers", "0", "--device", "cpu"]  # inference.py and pseudo_label.py
# One thread: the tests' tensors are tiny, and threads spin-waiting for each other on a CPU that other
# processes hold make each operation tens of times slower (a test of seconds takes minutes).
torch.set_num_threads(1)


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
def constant_copy():
    """constant_copy(source, path, label, **args): the checkpoint at `source` made to predict `label` at every
    pixel, saved at `path` (which may be `source`).

    The head's weights are zeroed and its bias is one-hot, so the logits are the same everywhere;
    `args` replace entries of the checkpoint's saved training arguments (e.g. fold=1).
    """
    def write(source, path, label, **args):
        checkpoint = utils.load_checkpoint(source)
        weights = checkpoint["state_dict"]
        weights["head.weight"] = torch.zeros_like(weights["head.weight"])
        num_classes = len(weights["head.bias"])
        weights["head.bias"] = 10.0 * torch.nn.functional.one_hot(torch.tensor(label), num_classes).float()
        checkpoint["args"] = {**checkpoint["args"], **args}
        utils.save_checkpoint(checkpoint, path)
        return path
    return write


@pytest.fixture(scope="session")
def constant_checkpoint(tiny_run, constant_copy):
    """constant_checkpoint(path, label, **args): tiny_run's best.pt made to predict `label` at every pixel
    (see constant_copy)."""
    def write(path, label, **args):
        return constant_copy(tiny_run / utils.BEST_CHECKPOINT, path, label, **args)
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


@pytest.fixture(scope="session")
def write_checkpoint():
    """write_checkpoint(path, class_names, name="deeplabv3p", encoder="test_resnet", size=64, seed=0): a randomly
    initialised model saved as train.py saves it (its model description and weights); returns path."""
    def write(path, class_names, name="deeplabv3p", encoder="test_resnet", size=64, seed=0):
        torch.manual_seed(seed)
        net = model.create_model(name, encoder, len(class_names))
        utils.save_checkpoint({"model": name, "encoder": encoder, "model_kwargs": {}, "num_classes": len(class_names),
                               "class_names": list(class_names), "image_size": size,
                               "mean": list(utils.IMAGENET_MEAN), "std": list(utils.IMAGENET_STD),
                               "args": {"paint_order": "area"}, "state_dict": net.state_dict()}, path)
        return path
    return write


class LargestFloatTensor(TorchDispatchMode):
    """While active, records the element count of the largest floating-point tensor any torch operation returns.

    Every aten operation passes through __torch_dispatch__, so an allocation cannot hide in a helper;
    it sees the calling thread only.
    """

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.fixture(scope="session")
def largest_float_tensor():
    """largest_float_tensor(function, *args): (function(*args), the element count of the largest float tensor it
    made), run under torch.inference_mode."""
    def run(function, *args):
        with torch.inference_mode(), LargestFloatTensor() as largest:
            result = function(*args)
        return result, largest.numel
    return run


@pytest.fixture(scope="session")
def write_hand_made_set():
    """write_hand_made_set(root): root/all.json and three images (two sizes), classes A, B, C without overlaps;
    returns the hand counts a dataset report must find."""
    def write(root):
        sizes = {1: (30, 40), 2: (30, 40), 3: (20, 50)}  # (height, width)
        boxes = {  # image id -> [(category id, y0, y1, x0, x1)]
            1: [(1, 0, 10, 0, 10), (2, 15, 25, 20, 30)],
            2: [(1, 0, 5, 0, 4), (1, 10, 20, 10, 20), (3, 20, 30, 0, 40)],
            3: [],
        }
        images, annotations = [], []
        rng = np.random.default_rng(0)
        for image_id, (h, w) in sizes.items():
            name = f"img{image_id}.jpg"
            cv2.imwrite(str(root / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for cat, y0, y1, x0, x1 in boxes[image_id]:
                mask = np.zeros((h, w), dtype=np.uint8)
                mask[y0:y1, x0:x1] = 1
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                    "iscrowd": 0, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                    "area": int(mask.sum())})
        categories = [{"id": i, "name": n} for i, n in ((1, "A"), (2, "B"), (3, "C"))]
        (root / "all.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
        foreground = [100 + 20 + 100, 100, 400]  # A: 10x10 + 5x4 + 10x10; B: 10x10; C: 10x40
        total = 2 * 30 * 40 + 20 * 50
        return {
            "images": 3, "class_names": ["Background", "A", "B", "C"], "annotations_per_class": [0, 3, 1, 1],
            "pixels_per_class": [total - sum(foreground)] + foreground,
            "objects_per_image": {"0": 1, "2": 1, "3": 1},
            "image_sizes": [{"width": 40, "height": 30, "images": 2}, {"width": 50, "height": 20, "images": 1}],
            "cooccurrence": [[0, 0, 0, 0], [0, 2, 1, 1], [0, 1, 1, 0], [0, 1, 0, 1]],
            "labels_per_image": {"1": [1, 2], "2": [1, 3], "3": []},
        }
    return write
