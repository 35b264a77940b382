"""The whole user path on a tiny demo set: train, resume from last.pt, predict with and without TTA, validate the CSV."""
import json
import shutil

import numpy as np
import pytest
import torch

import dataset as data
import ensemble as ensembles
import inference
import utils


@pytest.fixture(scope="module")
def trained(tiny_demo, tiny_run, run_train, tmp_path_factory):
    """The shared one-epoch run, resumed from its last.pt for a second epoch; returns (data root, run folder)."""
    output = shutil.copytree(tiny_run, tmp_path_factory.mktemp("e2e") / "run")
    run_train(tiny_demo, "--epochs", 2, "--resume", "--output", output)
    return tiny_demo, output


def predict_args(root, run, *extra):
    return inference.get_args_parser().parse_args(
        map(str, ["--checkpoints", run, "--data-root", root, "--workers", "0", "--device", "cpu", *extra]))


@pytest.mark.slow
def test_resume_continues_to_the_second_epoch(trained):
    _, run = trained
    checkpoint = utils.load_checkpoint(run / utils.LAST_CHECKPOINT)
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]) == (2, 0, 8)
    history = json.loads((run / "metrics.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert {"args.json", "best.pt", "last.pt", "metrics.json", "tb"} <= {p.name for p in run.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_submission_with_and_without_tta_is_valid(trained, tmp_path, tta):
    root, run = trained
    csv = tmp_path / "submission.csv"
    inference.main(predict_args(root, run, "--output", str(csv), *tta))
    file_names = [image["file_name"] for image in json.loads((root / "test.json").read_text())["images"]]
    rows = utils.read_submission(csv, 11, expected_ids=file_names)
    assert list(rows) == file_names
    assert all(mask.shape == (utils.SUBMISSION_SIZE, utils.SUBMISSION_SIZE) for mask in rows.values())


@pytest.mark.slow
def test_tta_changes_the_probabilities(trained):
    root, run = trained
    probabilities = []
    for tta in ([], ["--tta"]):
        ensemble, _ = ensembles.load_ensemble([str(run)], "cpu", ensembles.build_tta(predict_args(root, run, *tta)))
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            probabilities.append(ensemble(image))
    assert not torch.allclose(*probabilities)  # a random net is not flip-symmetric: TTA really ran


@pytest.mark.slow
@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_eval_of_a_model_that_predicts_background_everywhere(tiny_demo, constant_checkpoint, tmp_path, tta):
    checkpoint = constant_checkpoint(tmp_path / "background.pt", label=0)
    scores = inference.main(predict_args(tiny_demo, checkpoint, "--json", "val.json", "--eval",
                                         "--output", tmp_path / "val.csv", *tta))
    val = data.SegmentationDataset(str(tiny_demo), "val.json", "val")
    masks = np.stack([val.label_mask(i) for i in range(len(val))])
    pixels_per_class = np.bincount(masks.ravel(), minlength=256)[:len(val.class_names)]
    # every labelled pixel is predicted background: IoU(background) = its share, 0 for classes present, 0/0 absent
    iou = np.where(pixels_per_class > 0, 0.0, np.nan)
    iou[0] = pixels_per_class[0] / pixels_per_class.sum()
    assert pixels_per_class[0] > 0 and np.isnan(iou).sum() < len(iou) - 1  # some present classes score 0
    np.testing.assert_allclose(scores["iou"], iou)
    assert scores["miou"] == pytest.approx(np.nanmean(iou))
    assert scores["acc"] == pytest.approx(iou[0])
