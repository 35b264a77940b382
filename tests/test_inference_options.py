"""inference.py's --save-masks, --save-vis and --oof on the tiny demo set."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

import dataset as data
import images as imaging
import utils


@pytest.fixture(scope="module")
def predicted(tiny_demo, tiny_run, run_inference, tmp_path_factory):
    """inference.py --eval --save-masks --save-vis on val.json with the shared run; (scores, output folder)."""
    out = tmp_path_factory.mktemp("predicted")
    scores = run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo, "--json", "val.json", "--eval",
                           "--output", out / "val.csv", "--save-masks", out / "masks", "--save-vis", out / "vis")
    return scores, out


@pytest.fixture(scope="module")
def val_set(tiny_demo):
    return data.SegmentationDataset(str(tiny_demo), "val.json", "val")


def png_name(info):
    return os.path.splitext(info["file_name"])[0] + ".png"


def saved_masks(folder, dataset):
    return [np.asarray(Image.open(folder / png_name(info))) for info in dataset.images]


@pytest.mark.slow
def test_saved_masks_are_the_csv_masks_before_resizing(predicted, val_set):
    _, out = predicted
    csv = utils.read_submission(out / "val.csv", len(val_set.class_names))
    predicted_classes = set()
    for info, mask in zip(val_set.images, saved_masks(out / "masks", val_set)):
        assert Image.open(out / "masks" / png_name(info)).mode == "P"  # paletted: raw labels, shown in colour
        assert mask.shape == (info["height"], info["width"])
        np.testing.assert_array_equal(utils.resize_for_submission(mask), csv[info["file_name"]])
        predicted_classes |= set(np.unique(mask).tolist())
    assert len(predicted_classes) > 1  # not a uniform map that any writer would get right


@pytest.mark.slow
def test_eval_scores_are_the_iou_of_the_saved_masks(predicted, val_set):
    scores, out = predicted
    truth = np.stack([val_set.label_mask(i) for i in range(len(val_set))])
    pred = np.stack(saved_masks(out / "masks", val_set))
    labelled = truth != utils.IGNORE_INDEX
    iou = []
    for c in range(len(val_set.class_names)):
        inter = ((pred == c) & (truth == c) & labelled).sum()
        union = (((pred == c) | (truth == c)) & labelled).sum()
        iou.append(inter / union if union else np.nan)
    np.testing.assert_allclose(scores["iou"], iou)
    assert scores["miou"] == pytest.approx(np.nanmean(iou))


@pytest.mark.slow
def test_vis_panel_is_the_image_beside_its_overlay_under_a_title_and_above_a_legend(predicted, val_set, tiny_run):
    _, out = predicted
    names = val_set.class_names
    for info, mask in zip(val_set.images, saved_masks(out / "masks", val_set)):
        panel = cv2.cvtColor(cv2.imread(str(out / "vis" / png_name(info))), cv2.COLOR_BGR2RGB)
        height, width = info["height"], info["width"]
        title = utils.title_strip(f"{info['file_name']} | {tiny_run / utils.BEST_CHECKPOINT}", 2 * width)
        legend = utils.legend_strip(names, 2 * width)
        assert panel.shape == (len(title) + height + len(legend), 2 * width, 3)
        image = imaging.read_image(val_set.coco.image_path(info))
        np.testing.assert_array_equal(panel[:len(title)], title)
        body = panel[len(title):len(title) + height]
        np.testing.assert_array_equal(body[:, :width], image)
        np.testing.assert_array_equal(body[:, width:], utils.overlay(image, mask, len(names)))
        np.testing.assert_array_equal(panel[len(title) + height:], legend)
        assert (title != utils.STRIP_BACKGROUND).any()  # the title's text is drawn


def test_the_legend_shows_every_class_but_background_in_its_colour():
    names = ["Background", "Paper", "Metal", "Glass"]
    legend = utils.legend_strip(names, 400)
    colours = {tuple(int(v) for v in pixel) for pixel in legend.reshape(-1, 3)}
    palette = [tuple(int(v) for v in colour) for colour in utils.class_palette(len(names))]
    assert set(palette[1:]) <= colours and palette[0] not in colours
    assert len(utils.legend_strip(names, 60)) > len(legend)  # too narrow for one row: the names wrap


@pytest.mark.slow
def test_oof_scores_each_fold_on_its_own_val_images(tiny_demo, constant_checkpoint, run_inference, tmp_path):
    n_folds = 3
    for fold in range(n_folds):  # fold k's run predicts class k everywhere: each column counts one fold's pixels
        os.makedirs(tmp_path / f"fold{fold}")
        constant_checkpoint(tmp_path / f"fold{fold}" / utils.BEST_CHECKPOINT, label=fold, fold=fold, n_folds=n_folds,
                            all_json="train_all.json", fold_seed=0)
    scores = run_inference("--oof", tmp_path / "fold*")

    all_set = data.SegmentationDataset(str(tiny_demo), "train_all.json", "val")
    folds = data.kfold_splits(all_set.coco, n_folds, seed=0)
    assert sorted(sum(folds, [])) == sorted(image["id"] for image in all_set.images)  # each image in one fold
    num_classes = len(all_set.class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)  # the sum of the per-fold matrices
    for index, image in enumerate(all_set.images):
        fold = next(k for k, ids in enumerate(folds) if image["id"] in ids)
        confusion[:, fold] += np.bincount(all_set.label_mask(index).ravel(), minlength=256)[:num_classes]
    diag = np.diag(confusion)
    with np.errstate(invalid="ignore"):
        iou = diag / (confusion.sum(0) + confusion.sum(1) - diag)
    assert (diag[:n_folds] > 0).any()
    np.testing.assert_allclose(scores["iou"], iou)
    assert scores["miou"] == pytest.approx(np.nanmean(iou))
