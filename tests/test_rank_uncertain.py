"""inference.py --rank-uncertain: the photos to label next, near-duplicates skipped, as CSV, COCO json and PNG."""
import csv
import math
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import coco_utils
import ensemble as ensembles
import images as imaging
import inference
import report
import utils

CLASS_NAMES = ["Background", "Can", "Bottle"]
HEIGHT, WIDTH = 64, 72  # 8 x 9 blocks of 8 x 8 pixels: one block per pixel of the 9 x 8 hash thumbnail


def uncertainty_of_red(red):
    """The fake ensemble's uncertainty 1 - (p1 - p2) of a pixel of this red level."""
    return 1 - abs(2 * red / 255 - 1)


class RedIsCan(torch.nn.Module):
    """Fake ensemble: p(Can) = red / 255 and p(Bottle) = 1 - red / 255 at each pixel, p(Background) = 0,
    so each pixel's uncertainty is uncertainty_of_red(red); green (the photo's texture) carries no signal."""

    tiling = None
    members = ()  # none that could say which data root they were trained on

    def forward(self, images):  # a batch tensor or a list of uint8 images; one C x H x W map each
        return [torch.stack([torch.zeros_like(can), can, 1 - can]) for can in (image[0].float() / 255
                                                                                 for image in images)]

    def summarise_images(self, images, summarise):  # as Ensemble's, which predict() calls
        return [summarise(probs) for probs in self(images)]


def photo(seed, red_left, red_right=None):
    """HEIGHT x WIDTH RGB: a random 8 x 9 block texture in green (its own dHash), red levels in the two halves."""
    texture = np.random.default_rng(seed).integers(0, 256, (8, 9), dtype=np.uint8)
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    rgb[..., 1] = cv2.resize(texture, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST)
    rgb[:, : WIDTH // 2, 0] = red_left
    rgb[:, WIDTH // 2:, 0] = red_left if red_right is None else red_right
    return rgb


def with_noise(rgb, seed=9, amplitude=2):
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)


def write_photo(path, rgb, orientation=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exif = Image.Exif()
    if orientation:
        exif[imaging.ORIENTATION_TAG] = orientation
    Image.fromarray(rgb).save(path, exif=exif)


# Known scores (red levels): a 128 everywhere, b 102 | 230, c 102, d 230; a_noisy is a with noise (a score
# just below a's) and c_big is c twice as large with red 101 (just below c's): near-duplicates of a and c.
SCORE = {"a": uncertainty_of_red(128), "b": (uncertainty_of_red(102) + uncertainty_of_red(230)) / 2,
         "c": uncertainty_of_red(102), "d": uncertainty_of_red(230)}
SHARES = {"a": [0, 1, 0], "b": [0, 0, 0.5], "c": [0, 0, 1], "d": [0, 0, 0]}  # uncertain above 0.5: 128 and 102


@pytest.fixture
def pool(tmp_path):
    """A folder of photos whose uncertainty the fake ensemble makes known; d is stored rotated (EXIF 6)."""
    folder = tmp_path / "pool"
    big_c = cv2.resize(photo(3, 101), (2 * WIDTH, 2 * HEIGHT), interpolation=cv2.INTER_NEAREST)
    for name, rgb in {"scene1/a.png": photo(1, 128), "scene1/a_noisy.png": with_noise(photo(1, 128)),
                      "b.png": photo(2, 102, 230), "c.png": photo(3, 102), "c_big.png": big_c}.items():
        write_photo(str(folder / name), rgb)
    write_photo(str(folder / "d.png"), photo(4, 230), orientation=6)
    return folder


@pytest.fixture
def fake_ensemble(monkeypatch):
    monkeypatch.setattr(ensembles, "load_ensemble", lambda *args: (RedIsCan(), CLASS_NAMES))


def run(*argv):
    return inference.main(inference.get_args_parser().parse_args([*map(str, argv), "--workers", "0",
                                                                  "--device", "cpu"]))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------- unit functions
def test_uncertainty_is_the_mean_margin_and_shares_count_uncertain_pixels_per_predicted_class():
    probs = torch.tensor([[0.1, 0.4, 0.0, 0.2],  # pixel:  class 1 sure | class 0 unsure | class 2 unsure | class 2 sure
                          [0.8, 0.35, 0.3, 0.0],
                          [0.1, 0.25, 0.7, 0.8]]).reshape(3, 1, 4)
    sums = inference.uncertainty_sums(probs)  # uncertainty: 0.3, 0.95, 0.6, 0.4
    assert sums.dtype == torch.float64 and sums.shape == (1, 7)
    assert sums[0].tolist() == pytest.approx([2.25, 1, 1, 2, 1, 0, 1])
    score, shares = inference.photo_uncertainty(sums, 3)
    assert score == pytest.approx(2.25 / 4) and shares == pytest.approx([0.25, 0, 0.25])
    # a photo predicted in bands of rows: the bands' sums, joined row-wise, give the same answer
    bands = torch.cat([inference.uncertainty_sums(probs[..., :1]), inference.uncertainty_sums(probs[..., 1:])])
    assert inference.photo_uncertainty(bands, 3) == (pytest.approx(score), pytest.approx(shares))


def test_difference_hash_distances():
    rising = np.tile(np.arange(0, 180, 2, dtype=np.uint8), (80, 1))[..., None].repeat(3, 2)  # brighter to the right
    assert inference.difference_hash(rising) == 2 ** 64 - 1
    assert inference.difference_hash(rising[:, ::-1].copy()) == 0
    assert inference.hash_bits_apart(2 ** 64 - 1, 0) == 64

    image = photo(1, 128)
    code = inference.difference_hash(image)
    assert inference.hash_bits_apart(code, inference.difference_hash(image.copy())) == 0
    for near in (with_noise(image), cv2.resize(image, (2 * WIDTH, 2 * HEIGHT)),
                 cv2.resize(image, (WIDTH // 2, HEIGHT // 2), interpolation=cv2.INTER_AREA)):
        assert inference.hash_bits_apart(code, inference.difference_hash(near)) <= 2
    others = [inference.difference_hash(photo(seed, 128)) for seed in (2, 3, 4)]
    assert min(inference.hash_bits_apart(code, other) for other in others) > 16


# ---------------------------------------------------------------- the ranking
def test_the_most_uncertain_distinct_photos_are_written_as_csv_coco_and_contact_sheet(pool, tmp_path, fake_ensemble,
                                                                                       capsys):
    output = tmp_path / "out" / "to_label.csv"
    chosen = run("--images", pool, "--rank-uncertain", 3, "--output", output)

    assert [c.file_name for c in chosen] == [os.path.join("scene1", "a.png"), "c.png", "b.png"]
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"ranked 6 photos; wrote the 3 least certain to {output}, {tmp_path / 'out' / 'to_label.json'} and "
        f"{tmp_path / 'out' / 'to_label.png'}",
        "2 near-duplicate(s) skipped (dHash within 6 bits of a chosen photo)"]  # a_noisy after a, c_big after c

    rows = read_csv(output)
    assert rows[0] == ["rank", "file_name", "path", "score", "uncertain Background", "uncertain Can",
                       "uncertain Bottle"]
    for rank, (row, stem) in enumerate(zip(rows[1:], "acb"), 1):
        name = os.path.join("scene1", "a.png") if stem == "a" else f"{stem}.png"
        assert row[:3] == [str(rank), name, str(pool / name)]
        assert [float(value) for value in row[3:]] == pytest.approx([SCORE[stem], *SHARES[stem]], abs=1e-6)
    assert len(rows) == 4

    coco = COCO(str(tmp_path / "out" / "to_label.json"))
    assert coco.dataset["info"]["image_root"] == str(pool)  # the chosen photos' common folder
    assert [coco.imgs[i] for i in sorted(coco.imgs)] == [
        {"id": 1, "file_name": os.path.join("scene1", "a.png"), "width": WIDTH, "height": HEIGHT},
        {"id": 2, "file_name": "c.png", "width": WIDTH, "height": HEIGHT},
        {"id": 3, "file_name": "b.png", "width": WIDTH, "height": HEIGHT}]
    assert coco.dataset["annotations"] == [] and coco.loadCats(coco.getCatIds()) == [
        {"id": 1, "name": "Can"}, {"id": 2, "name": "Bottle"}]
    unlabelled = coco_utils.Coco(tmp_path / "out" / "to_label.json", pool, expect_annotations=False)
    assert unlabelled.class_names == CLASS_NAMES and len(unlabelled.images) == 3

    sheet = cv2.imread(str(tmp_path / "out" / "to_label.png"))
    panel = report.SHEET_INCHES * report.DPI
    assert sheet.shape == (panel + report.SHEET_TITLE_INCHES * report.DPI, 3 * panel, 3)  # one row of three
    assert sorted(os.listdir(tmp_path / "out")) == ["to_label.csv", "to_label.json", "to_label.png"]


def test_a_pool_smaller_than_n_gives_every_distinct_photo_as_displayed(pool, tmp_path, fake_ensemble, capsys):
    output = tmp_path / "to_label.csv"
    chosen = run("--images", pool, "--rank-uncertain", 10, "--output", output)
    assert [c.file_name for c in chosen] == [os.path.join("scene1", "a.png"), "c.png", "b.png", "d.png"]
    assert [c.score for c in chosen] == pytest.approx([SCORE[s] for s in "acbd"])
    out = capsys.readouterr().out
    assert "only 4 distinct photos: fewer than --rank-uncertain 10" in out
    coco = COCO(str(tmp_path / "to_label.json"))
    assert (coco.imgs[4]["file_name"], coco.imgs[4]["width"], coco.imgs[4]["height"]) == ("d.png", HEIGHT, WIDTH)
    sheet = cv2.imread(str(tmp_path / "to_label.png"))  # four photos: one row of four
    assert sheet.shape[:2] == ((report.SHEET_INCHES + report.SHEET_TITLE_INCHES) * report.DPI,
                               4 * report.SHEET_INCHES * report.DPI)


def test_a_json_s_images_are_ranked_and_no_submission_is_written(pool, tmp_path, fake_ensemble, monkeypatch):
    images = [(1, "scene1/a.png", HEIGHT, WIDTH), (2, "scene1/a_noisy.png", HEIGHT, WIDTH), (3, "c.png", HEIGHT, WIDTH),
              (4, "c_big.png", 2 * HEIGHT, 2 * WIDTH)]
    utils.atomic_write_json(pool / "pool.json", {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
        "categories": [{"id": 1, "name": "Can"}, {"id": 2, "name": "Bottle"}]})
    monkeypatch.chdir(tmp_path)
    chosen = run("--data-root", pool, "--json", "pool.json", "--rank-uncertain", 2, "--output", "next.csv")
    assert [c.file_name for c in chosen] == ["scene1/a.png", "c.png"]
    assert [row[1] for row in read_csv("next.csv")[1:]] == ["scene1/a.png", "c.png"]
    assert sorted(os.listdir(tmp_path)) == ["next.csv", "next.json", "next.png", "pool"]  # no submission.csv


@pytest.mark.slow
def test_real_checkpoints_score_their_known_margin(tiny_demo, constant_checkpoint, run_inference, tmp_path):
    """A constant checkpoint's logits are 10 for its class and 0 elsewhere: p1 - p2 = (e^10 - 1) / (e^10 + C - 1)
    at every pixel; two of them voting for two classes leave p1 = p2: uncertainty 1, every pixel uncertain."""
    can, bottle = constant_checkpoint(tmp_path / "can.pt", 1), constant_checkpoint(tmp_path / "bottle.pt", 2)
    rank = ["--data-root", tiny_demo, "--rank-uncertain", 3, "--duplicate-distance", 0]
    num_classes = len(coco_utils.Coco(tiny_demo / "test.json", tiny_demo, expect_annotations=False).class_names)
    margin = (math.exp(10) - 1) / (math.exp(10) + num_classes - 1)
    for tile in ([], ["--tile", 32]):  # whole photos in bands of rows, and window by window
        chosen = run_inference("--checkpoints", can, *rank, *tile, "--output", tmp_path / "one.csv")
        assert len(chosen) == 3  # float32 softmax: 1 - (p1 - p2) is exact to about 1e-7
        assert [c.score for c in chosen] == pytest.approx([1 - margin] * 3, abs=1e-6)
        assert all(c.shares == [0] * num_classes for c in chosen)
        chosen = run_inference("--checkpoints", can, bottle, *rank, *tile, "--output", tmp_path / "two.csv")
        assert [c.score for c in chosen] == pytest.approx([1] * 3)
        assert all(sum(c.shares) == pytest.approx(1) and sum(c.shares[1:3]) == pytest.approx(1) for c in chosen)


# ---------------------------------------------------------------- refusals, before predicting
@pytest.fixture
def no_prediction(monkeypatch):
    def load_ensemble(*args, **kwargs):
        raise AssertionError("predicted although the flags were refused")
    monkeypatch.setattr(ensembles, "load_ensemble", load_ensemble)


@pytest.mark.parametrize("flags, message", [
    (["--eval"], "--rank-uncertain ranks photos by the model's own uncertainty, without labels: drop --eval, --oof "
                 "and --report"),
    (["--save-masks", "masks", "--output", "x.csv"],
     "--rank-uncertain writes the ranking only: drop --save-masks (run inference.py without --rank-uncertain for "
     "the masks)"),
    ([], "--rank-uncertain needs --output CSV, e.g. --output to_label.csv (the COCO json and contact sheet go "
         "beside it: to_label.json, to_label.png)"),
    (["--output", "to_label.txt"], "--output to_label.txt must end in .csv with --rank-uncertain (e.g. "
                                   "to_label.csv): the COCO json and contact sheet go beside it as to_label.json and "
                                   "to_label.png"),
])
def test_flags_that_cannot_work_are_refused_before_predicting(tmp_path, monkeypatch, no_prediction, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError) as err:
        run("--images", tmp_path, "--rank-uncertain", 5, *flags)
    assert str(err.value) == message


def test_an_output_that_is_or_collides_with_a_folder_is_refused(tmp_path, no_prediction):
    with pytest.raises(utils.UserError) as err:
        run("--images", tmp_path, "--rank-uncertain", 5, "--output", tmp_path)
    assert str(err.value) == f"--output {tmp_path} is a folder: pass the CSV file's path, e.g. " \
                             f"{tmp_path / 'to_label.csv'}"
    os.makedirs(tmp_path / "next.png")
    with pytest.raises(utils.UserError) as err:
        run("--images", tmp_path, "--rank-uncertain", 5, "--output", tmp_path / "next.csv")
    assert str(err.value) == f"{tmp_path / 'next.png'} is a folder, where --output {tmp_path / 'next.csv'} puts " \
                             f"its .png file: pass another --output"


def test_a_duplicate_distance_beyond_the_hash_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        inference.get_args_parser().parse_args(["--rank-uncertain", "5", "--duplicate-distance", "65"])
    assert "must be at most 64 (the bits of a difference hash), got 65" in capsys.readouterr().err
