"""inference.py's outputs: what is refused before predicting, the CSV's rows (quoted names), what --images writes,
and the memory of whole-image prediction (no float map of a photo's size)."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset as data
import ensemble as ensembles
import inference
import model as models
import utils

NUM_CLASSES = 11


@pytest.fixture
def no_prediction(monkeypatch):
    """Fails the test if anything is predicted: for checks that must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("predicted before the check")
    monkeypatch.setattr(ensembles, "predict", refuse)


def edit_test_json(root, change):
    path = root / "test.json"
    coco = json.loads(path.read_text())
    change(coco["images"])
    path.write_text(json.dumps(coco))
    return coco["images"]


# ---------------------------------------------------------------- refused before predicting
@pytest.mark.slow
def test_a_file_name_under_two_image_ids_is_refused_before_predicting(tiny_demo_copy, tiny_run, run_inference,
                                                                      no_prediction, tmp_path):
    def duplicate(images):
        images[2]["file_name"] = images[0]["file_name"]

    images = edit_test_json(tiny_demo_copy, duplicate)
    with pytest.raises(utils.UserError) as err:
        run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo_copy, "--output", tmp_path / "sub.csv")
    assert str(err.value) == (
        f"{tiny_demo_copy / 'test.json'} lists {images[0]['file_name']} under image ids {images[0]['id']} and "
        f"{images[2]['id']}: the submission has one row per file name; remove or rename one of them")


@pytest.mark.slow
def test_json_images_that_would_write_one_mask_are_refused_before_predicting(tiny_demo_copy, tiny_run, run_inference,
                                                                            no_prediction, tmp_path):
    def same_stem(images):
        images[1]["file_name"] = images[0]["file_name"].replace(".jpg", ".png")

    images = edit_test_json(tiny_demo_copy, same_stem)
    with pytest.raises(utils.UserError) as err:
        run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo_copy, "--save-masks", tmp_path / "masks")
    assert str(err.value) == (f"{images[0]['file_name']} and {images[1]['file_name']} would both write "
                              f"{images[1]['file_name']}: rename one of them")


@pytest.mark.slow
def test_an_output_that_is_a_folder_is_refused_before_predicting(tiny_demo, tiny_run, run_inference, no_prediction,
                                                                 tmp_path):
    with pytest.raises(utils.UserError) as err:
        run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo, "--output", tmp_path)
    assert str(err.value) == (f"--output {tmp_path} is a folder: pass the CSV file's path, e.g. "
                              f"{tmp_path / 'submission.csv'}")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--save-masks", "--save-vis"])
def test_an_output_folder_that_is_a_file_is_refused_before_predicting(tiny_demo, tiny_run, run_inference,
                                                                      no_prediction, tmp_path, flag):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    with pytest.raises(utils.UserError) as err:
        run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo, "--output", tmp_path / "sub.csv",
                      flag, existing)
    assert str(err.value) == f"{flag} {existing} is a file, not a folder: pass a folder to write the PNGs into"
    assert existing.read_text() == "mine" and not (tmp_path / "sub.csv").exists()


def test_a_batch_size_of_0_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        inference.get_args_parser().parse_args(["--batch-size", "0"])
    assert exit_.value.code == 2
    assert "argument --batch-size: must be a positive integer, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- the CSV
def test_file_names_with_commas_and_quotes_round_trip_through_the_csv(tmp_path):
    masks = {"plain.jpg": np.zeros((4, 4), np.uint8), "a, b.jpg": np.ones((4, 4), np.uint8),
             'say "cheese".jpg': np.full((4, 4), 2, np.uint8)}
    path = tmp_path / "submission.csv"
    utils.write_submission(path, masks.items(), NUM_CLASSES, expected_ids=list(masks), size=2)
    assert path.read_text() == ('image_id,PredictionString\nplain.jpg,0 0 0 0\n"a, b.jpg",1 1 1 1\n'
                                '"say ""cheese"".jpg",2 2 2 2\n')
    read = utils.read_submission(path, NUM_CLASSES, expected_ids=list(masks), size=2)
    assert {name: mask.tolist() for name, mask in read.items()} == {name: [[v, v], [v, v]] for name, v in
                                                                    [("plain.jpg", 0), ("a, b.jpg", 1),
                                                                     ('say "cheese".jpg', 2)]}


def test_an_unquoted_comma_in_an_image_id_is_named(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("image_id,PredictionString\na, b.jpg,0 0 0 0\n")
    with pytest.raises(ValueError, match=f"{path}:2: 3 fields, expected 2: quote an image_id holding a comma"):
        utils.read_submission(path, NUM_CLASSES, size=2)


@pytest.mark.slow
def test_a_json_file_name_with_a_comma_gets_its_row(tiny_demo_copy, tiny_run, run_inference, tmp_path):
    def rename(images):
        old = images[0]["file_name"]
        images[0]["file_name"] = old.replace(".jpg", ", copy.jpg")
        os.rename(tiny_demo_copy / old, tiny_demo_copy / images[0]["file_name"])

    images = edit_test_json(tiny_demo_copy, rename)
    csv = tmp_path / "sub.csv"
    run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo_copy, "--output", csv)
    rows = utils.read_submission(csv, NUM_CLASSES, expected_ids=[image["file_name"] for image in images])
    assert list(rows) == [image["file_name"] for image in images]
    assert csv.read_text().splitlines()[1].startswith(f'"{images[0]["file_name"]}",')


# ---------------------------------------------------------------- what --images writes
@pytest.fixture
def photos(tiny_demo):
    return tiny_demo / "batch_04_test"


@pytest.mark.slow
def test_images_write_no_csv_unless_asked_and_say_where_everything_went(tiny_run, run_inference, photos, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_inference("--checkpoints", tiny_run, "--images", photos, "--save-masks", "masks")
    assert sorted(os.listdir(tmp_path)) == ["masks"]  # no submission.csv of 256 x 256 rows per photo
    assert sorted(os.listdir(tmp_path / "masks")) == ["0013.png", "0014.png", "0015.png"]
    assert capsys.readouterr().out.splitlines()[-1] == "wrote 3 masks to masks"

    run_inference("--checkpoints", tiny_run, "--images", photos, "--save-vis", "vis", "--save-masks", "masks",
                  "--output", "photos.csv")
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "wrote photos.csv (3 images)", "wrote 3 masks to masks", "wrote 3 overlays to vis"]
    assert sorted(utils.read_submission(tmp_path / "photos.csv", NUM_CLASSES)) == ["0013.jpg", "0014.jpg", "0015.jpg"]


@pytest.mark.slow
def test_images_with_nothing_to_write_are_refused_and_a_json_still_writes_submission_csv(
        tiny_demo, tiny_run, run_inference, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match="^--images alone writes nothing: add --save-masks DIR, --save-vis DIR "
                                              "or --output CSV$"):
        run_inference("--checkpoints", tiny_run, "--images", photos)
    run_inference("--checkpoints", tiny_run, "--data-root", tiny_demo)
    assert capsys.readouterr().out.splitlines()[-1] == "wrote submission.csv (3 images)"
    assert len(utils.read_submission(tmp_path / "submission.csv", NUM_CLASSES)) == 3


# ---------------------------------------------------------------- memory of whole-image prediction
def random_member(name, size, tta=None, seed=0, num_classes=NUM_CLASSES):
    torch.manual_seed(seed)
    net = models.create_model(name, "test_resnet", num_classes)
    checkpoint = {"model": name, "encoder": "test_resnet", "model_kwargs": {}, "num_classes": num_classes,
                  "image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": net.state_dict()}
    return ensembles.Member(checkpoint, tta).eval()


def full_probability_labels(members, image, vote):
    """The labels as inference.py made them before: each member's probabilities resized to the whole photo
    (F.interpolate of the [0, 1] photo and of the probabilities), voted there, argmax."""
    size = image.shape[-2:]
    full = []
    for member in members:
        square = F.interpolate(image[None].float() / 255, (member.size, member.size), mode="bilinear",
                               align_corners=False)
        full.append(F.interpolate(member.probs(square), size, mode="bilinear", align_corners=False)[0])
    return ensembles.Ensemble(members, vote).combine(full).argmax(0)


@pytest.mark.parametrize("vote", ensembles.VOTES)
def test_labels_made_band_by_band_match_the_full_probability_path(monkeypatch, vote):
    """Members of two sizes, with TTA (merged at each member's size): the bands' labels are the old labels."""
    monkeypatch.setattr(ensembles, "BAND_PIXELS", 3000)  # bands of 27 rows of a 110 wide photo
    tta = ensembles.build_tta(inference.get_args_parser().parse_args(["--tta", "--tta-vflip"]))
    members = [random_member("unet", 32, tta), random_member("deeplabv3p", 48, tta, seed=1)]
    image = torch.randint(0, 256, (3, 150, 110), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bands = []

    def labels(probs):
        bands.append(tuple(probs.shape))
        return ensembles.labels_of(probs)

    with torch.inference_mode():
        got = ensembles.Ensemble(members, vote).summarise_images([image], labels)[0]
        expected = full_probability_labels(members, image, vote)
    assert bands == [(NUM_CLASSES, 27, 110)] * 5 + [(NUM_CLASSES, 15, 110)]
    assert got.shape == (150, 110)
    differing = (got != expected).float().mean().item()
    assert differing <= 1e-3  # float rounding of the two resizes may only flip near-ties
    assert len(expected.unique()) > 1  # not a uniform map that any path would get right


@pytest.mark.slow
def test_a_large_photo_without_tile_never_holds_a_float_map_of_its_size(tiny_run, run_inference, largest_float_tensor,
                                                                        tmp_path, monkeypatch):
    """inference.py --images on a photo without --tile: neither the photo as floats nor its probabilities."""
    monkeypatch.setattr(ensembles, "BAND_PIXELS", 2 ** 13)
    height, width = 1000, 1200
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), rgb)

    def load_and_predict_its_size():
        member = ensembles.Member(utils.load_checkpoint(tiny_run / utils.BEST_CHECKPOINT))
        return member(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))

    _, model_largest = largest_float_tensor(load_and_predict_its_size)  # the weights, the activations at 64 x 64
    _, largest = largest_float_tensor(run_inference, "--checkpoints", tiny_run, "--images", tmp_path / "big.png",
                                      "--save-masks", tmp_path / "masks")
    # the model, the photo's rows it reads (3 x 64 x width), a band of probabilities
    assert largest <= max(model_largest, 3 * 64 * width, NUM_CLASSES * 2 ** 13)
    assert largest < height * width  # before: 3 x H x W for the [0, 1] photo, 11 x H x W probabilities
    assert data.read_label_png(str(tmp_path / "masks" / "big.png")).shape == (height, width)
