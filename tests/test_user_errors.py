"""One error policy: an expected user mistake ends the script with one `error: ...` line and exit status 2.

Each case runs the script's real `__main__` (conftest.script_error) and checks the whole line: the flag or
file at fault, what is wrong and what to do next. The cases stop before any training or prediction;
those marked so stop before any json is read (or any model is built).
"""
import json

import numpy as np
import pytest
from PIL import Image

import coco_utils
import dataset as data
import ensemble as ensembles
import model as models
import utils

CPU = ["--workers", "0", "--device", "cpu"]


class Case:
    """What a case's arguments and expected line may refer to: the demo set, this test's folder, a run."""

    def __init__(self, root, tmp_path, tiny_train_argv, tiny_run, constant_checkpoint):
        self.root, self.tmp = root, tmp_path
        self._train_argv, self._run, self._constant = tiny_train_argv, tiny_run, constant_checkpoint

    def train(self, *extra):
        return self._train_argv(self.root, "--epochs", 1, "--copy-paste-p", 0, "--output", self.tmp / "run", *extra)

    def run(self):
        return self._run

    def fold_checkpoints(self, *folds):
        """One constant checkpoint per (fold, n_folds) in this test's folder; their glob."""
        for k, (fold, n_folds) in enumerate(folds):
            self._constant(self.tmp / f"fold{k}.pt", 0, fold=fold, n_folds=n_folds, fold_seed=0)
        return str(self.tmp / "fold*.pt")

    def text_file(self, name, text):
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def pseudo(self, manifest):
        """A --pseudo folder holding `manifest` (text, or a dict written as json)."""
        folder = self.tmp / "pseudo"
        folder.mkdir()
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (folder / data.PSEUDO_MANIFEST).write_text(text)
        return folder

    def val_images_manifest(self):
        """A pseudo-label manifest whose only photo is a validation image of the demo's train/val split."""
        coco = coco_utils.Coco(str(self.root / "val.json"), str(self.root))
        image = coco.images[0]
        return {"class_names": coco.class_names, "threshold": 0.5, "checkpoints": [], "source": {},
                "items": [{"image": coco.image_path(image), "image_id": image["id"], "mask": "masks/x.png"}]}


NO_JSON_READ = ("coco_utils", "Coco")  # the check comes before any json (and so any image) is read
NO_MODEL_BUILT = ("ensemble", "build_ensemble")  # before any fold's model predicts

# case: (script, argv(case), the line after "error: " (formatted with root=, tmp=), what must not run)
CASES = {
    "unknown --loss": (
        "train.py", lambda c: c.train("--loss", "ce:1,dise:1"),
        "--loss 'ce:1,dise:1': unknown loss 'dise'; valid names: ce, dice, focal, lovasz, ohem; write e.g. "
        "--loss ce:1,dice:0.5", NO_JSON_READ),
    "bad --loss weight": (
        "train.py", lambda c: c.train("--loss", "ce:0"),
        "--loss 'ce:0': bad weight in 'ce:0', which must be a positive number; valid names: ce, dice, focal, "
        "lovasz, ohem; write e.g. --loss ce:1,dice:0.5", NO_JSON_READ),
    "--class-weights not numbers": (
        "train.py", lambda c: c.train("--class-weights", "1,a,1"),
        "--class-weights 1,a,1: not a comma-separated list of numbers: pass one weight per class (e.g. 0.5,1,2), "
        "or --class-weights auto", NO_JSON_READ),
    "--class-weights negative": (
        "train.py", lambda c: c.train("--class-weights", "1,-1,1"),
        "--class-weights: class weights must be finite and >= 0, not [1.0, -1.0, 1.0]: pass one weight per class "
        "(e.g. 0.5,1,2), or --class-weights auto", NO_JSON_READ),
    "--weights missing": (
        "train.py", lambda c: c.train("--weights", c.tmp / "missing.pth", "--no-preflight"),
        "encoder weights {tmp}/missing.pth do not exist: pass --weights a .pth/.pt state dict or a .safetensors "
        "file of the timm encoder", None),
    "--weights not a checkpoint": (
        "train.py", lambda c: c.train("--weights", c.text_file("notes.pth", "not weights"), "--no-preflight"),
        "checkpoint {tmp}/notes.pth cannot be read: it is cut short or not a torch checkpoint (UnpicklingError: "
        "Weights only load failed); copy it again, or pass --weights a .pth/.pt state dict or a .safetensors file "
        "of the timm encoder", None),
    "--ohem-thresh": (
        "train.py", lambda c: c.train("--loss", "ohem", "--ohem-thresh", "1.5", "--no-preflight"),
        "--loss ohem needs --ohem-thresh in (0, 1] and --ohem-min-kept >= 0, not 1.5 and 10000: it trains on "
        "pixels whose true-class probability is under --ohem-thresh", None),
    "--label-smoothing": (
        "train.py", lambda c: c.train("--label-smoothing", "1.5", "--no-preflight"),
        "--label-smoothing must be in [0, 1], not 1.5: it is the probability spread over the other classes "
        "(0: none, e.g. 0.1)", None),
    "--repeat-thresh": (
        "train.py", lambda c: c.train("--sampler", "repeat-factor", "--repeat-thresh", "0"),
        "--repeat-thresh must be above 0, not 0.0: images holding a class found in fewer than that share of the "
        "images are repeated (e.g. 0.5)", None),
    "--crop-rare without a crop": (
        "train.py", lambda c: c.train("--crop-rare", "--aug", "none"),
        "--crop-rare crops with the light or strong augmentation, not --aug none: pass --aug light or --aug "
        "strong, or drop --crop-rare", None),
    "--crop-max-ratio": (
        "train.py", lambda c: c.train("--crop-rare", "--crop-max-ratio", "0"),
        "--crop-max-ratio must be above 0 and at most 1, not 0.0: it is the largest share of a crop's labelled "
        "pixels one class may cover (e.g. 0.75)", None),
    "--copy-paste-classes with copy-paste off": (
        "train.py", lambda c: c.train("--copy-paste-classes", "Battery"),
        "--copy-paste-classes Battery pastes nothing with --copy-paste-p 0 (the default): add --copy-paste-p 0.5",
        NO_JSON_READ),
    "--n-folds 1": (
        "train.py", lambda c: c.train("--fold", "0", "--n-folds", "1"),
        "--n-folds must be 2 or more (one fold validates, the others train), not 1", None),
    "--n-folds above the images": (
        "train.py", lambda c: c.train("--fold", "0", "--n-folds", "99"),
        "--n-folds 99 does not fit {root}/train_all.json: it has 12 images, so pass --n-folds from 2 to 12", None),
    "--pseudo manifest of another program": (
        "train.py", lambda c: c.train("--pseudo", c.pseudo({"items": []})),
        "{tmp}/pseudo/manifest.json lacks class_names, threshold, checkpoints, source: it is not a pseudo-label "
        "manifest; run pseudo_label.py --out {tmp}/pseudo again", None),
    "--pseudo manifest not json": (
        "train.py", lambda c: c.train("--pseudo", c.pseudo("{")),
        "{tmp}/pseudo/manifest.json is not valid json (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)): run pseudo_label.py --out {tmp}/pseudo again", None),
    "--pseudo of validation images only": (
        "train.py", lambda c: c.train("--pseudo", c.pseudo(c.val_images_manifest())),
        "--pseudo {tmp}/pseudo: none of its 1 pseudo-labelled images can be trained on (validation images are "
        "left out): pseudo-label other photos, or drop --pseudo", None),
    "--oof run without --fold": (
        "inference.py", lambda c: ["--oof", c.run(), *CPU],
        "--oof {run}: {run}/best.pt was not trained with --fold: pass the runs of train.py --fold K (e.g. --oof "
        "'runs/*-fold*'), or score this one with --eval", NO_MODEL_BUILT),
    "--oof runs of two splits": (
        "inference.py", lambda c: ["--oof", c.fold_checkpoints((0, 3), (1, 4)), *CPU],
        "--oof {tmp}/fold*.pt: {tmp}/fold1.pt splits {root}/train_all.json into 4 folds (seed 0), {tmp}/fold0.pt "
        "splits {root}/train_all.json into 3 folds (seed 0): pass the runs of one split (same --all-json, "
        "--n-folds and --fold-seed)", NO_MODEL_BUILT),
    "--oof fold twice": (
        "inference.py", lambda c: ["--oof", c.fold_checkpoints((0, 3), (0, 3)), *CPU],
        "--oof {tmp}/fold*.pt: fold 0 appears twice, in {tmp}/fold0.pt and {tmp}/fold1.pt: pass one run per fold",
        NO_MODEL_BUILT),
    # summary: a --root that does not exist, so these checks are shown to come before any data is read
    "summary --fold without --report": (
        "dataset_tool.py", lambda c: ["summary", "--root", c.tmp / "none", "--fold", "0"],
        "summary --fold charts that fold's class balance in the report: add --report DIR, or drop --fold", None),
    "summary --fold out of range": (
        "dataset_tool.py", lambda c: ["summary", "--root", c.tmp / "none", "--report", c.tmp / "report", "--fold", "7"],
        "--fold must be in 0..4 (--n-folds 5), not 7", None),
    "summary --n-folds 1": (
        "dataset_tool.py", lambda c: ["summary", "--root", c.tmp / "none", "--report", c.tmp / "report", "--fold", "0",
                                 "--n-folds", "1"],
        "--n-folds must be 2 or more (one fold validates, the others train), not 1", None),
}


@pytest.fixture
def case(request, tiny_demo, tmp_path, tiny_train_argv, constant_checkpoint, tiny_run):
    return Case(tiny_demo, tmp_path, tiny_train_argv, tiny_run, constant_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_user_errors_end_in_one_line_with_the_advice(name, case, script_error, monkeypatch):
    script, argv, line, forbidden = CASES[name]
    argv = argv(case)  # before the poison below: building a case may read a json
    if forbidden:
        module, attribute = forbidden

        def refuse(*args, **kwargs):
            raise AssertionError(f"{module}.{attribute} ran before the check")

        monkeypatch.setattr({"coco_utils": coco_utils, "ensemble": ensembles}[module], attribute, refuse)
    expected = line.format(root=case.root, tmp=case.tmp, run=case.run())
    assert script_error(script, *argv) == f"error: {expected}"


def test_pretrained_weights_offline_name_the_way_out(monkeypatch):
    create = models.timm.create_model

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")
        return create(*args, **kwargs)

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(utils.UserError) as refusal:
        models.create_model("unet", "resnet18", 3, pretrained=True)
    assert str(refusal.value) == (
        "could not download the pretrained weights of encoder 'resnet18' (We couldn't connect to "
        "'https://huggingface.co'.). Offline? Download model.safetensors from https://huggingface.co/timm/"
        "resnet18.a1_in1k on a connected machine and pass --weights PATH instead of --pretrained")


def test_a_colour_png_in_a_pseudo_label_folder_is_named_with_the_fix(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(utils.UserError) as refusal:
        data.read_label_png(path)
    assert str(refusal.value) == (f"{path} is a RGB PNG, not a label map (paletted or greyscale): write it again "
                                  f"with pseudo_label.py, or save it as a PNG of class indices")
