"""The whole user path on a tiny demo set: train, resume from last.pt, predict with and without TTA, validate the CSV."""
import json

import pytest
import torch

import demo
import inference
import train
import utils

TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "64", "--batch-size", "2", "--workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of one epoch, then resumed from its last.pt for a second one; returns (data root, run folder)."""
    root = tmp_path_factory.mktemp("e2e")
    demo.make_demo(str(root), size=64, n_train=8, n_val=4, n_test=3)
    output = root / "run"
    common = [*TINY, "--data-root", str(root), "--cache-dir", str(root / "cache"), "--output", str(output)]
    train.main(train.get_args_parser().parse_args([*common, "--epochs", "1"]))
    train.main(train.get_args_parser().parse_args([*common, "--epochs", "2", "--resume"]))
    return root, output


def predict_args(root, run, *extra):
    return inference.get_args_parser().parse_args(
        ["--checkpoints", str(run), "--data-root", str(root), "--workers", "0", "--device", "cpu", *extra])


def test_resume_continues_to_the_second_epoch(trained):
    _, run = trained
    checkpoint = utils.load_checkpoint(run / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]) == (2, 0, 8)
    history = json.loads((run / "metrics.json").read_text())
    assert [record["epoch"] for record in history] == [0, 1]
    assert {"args.json", "best.pt", "last.pt", "metrics.json", "tb"} <= {p.name for p in run.iterdir()}


@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_submission_with_and_without_tta_is_valid(trained, tmp_path, tta):
    root, run = trained
    csv = tmp_path / "submission.csv"
    inference.main(predict_args(root, run, "--output", str(csv), *tta))
    file_names = [image["file_name"] for image in json.loads((root / "test.json").read_text())["images"]]
    rows = utils.read_submission(csv, 11, expected_ids=file_names)
    assert list(rows) == file_names
    assert all(mask.shape == (utils.SUBMISSION_SIZE, utils.SUBMISSION_SIZE) for mask in rows.values())


def test_tta_changes_the_probabilities_and_eval_scores_both(trained, tmp_path):
    root, run = trained
    probabilities, scores = [], []
    for tta in ([], ["--tta"]):
        args = predict_args(root, run, "--json", "val.json", "--eval", "--output", str(tmp_path / "val.csv"), *tta)
        scores.append(inference.main(args))
        ensemble, _ = inference.load_ensemble(args.checkpoints, "cpu", inference.build_tta(args))
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            probabilities.append(ensemble(image))
    assert not torch.allclose(*probabilities)  # a random net is not flip-symmetric: TTA really ran
    assert all(0 <= s["miou"] <= 1 for s in scores)
