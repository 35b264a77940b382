import json
import os

import cv2
import numpy as np
import pytest
import torch

import coco_utils
import dataset as data
import ensemble as ensembles
import presets
import pseudo_label as pl
import utils

IGNORE = 255
CLASS_NAMES = ["Background", "Can", "Bottle"]


def write_coco(root, json_name, images):
    """A COCO json under `root` listing `images` as (id, file_name), 8 x 10 pixels, no annotations."""
    content = {"images": [{"id": i, "file_name": f, "height": 8, "width": 10} for i, f in images],
               "annotations": [],
               "categories": [{"id": 1, "name": "Can"}, {"id": 2, "name": "Bottle"}]}
    utils.atomic_write_json(os.path.join(root, json_name), content)


def write_photos(root, names, height=8, width=10):
    """Photos whose left half is bright and right half dark (the fake ensemble's cue)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = 230
    for name in names:
        ok, encoded = cv2.imencode(os.path.splitext(name)[1], image)
        utils.atomic_write_bytes(os.path.join(root, name), encoded.tobytes())


# ---------------------------------------------------------------- threshold

def test_pseudo_mask_keeps_confident_pixels_and_ignores_the_rest():
    # pixels (C = 3): confident class 0 | unsure class 1 | exactly at threshold, class 1 | uniform
    probs = torch.tensor([[0.875, 0.5, 0.25, 1 / 3],
                          [0.0625, 0.375, 0.75, 1 / 3],
                          [0.0625, 0.125, 0.0, 1 / 3]]).reshape(3, 1, 4)
    confidence, labels = pl.confidence_and_labels(probs)
    assert labels.dtype == torch.uint8 and labels.tolist() == [[0, 0, 1, 0]]
    assert confidence.tolist() == [[0.875, 0.5, 0.75, pytest.approx(1 / 3)]]
    mask = pl.pseudo_mask(confidence, labels, 0.75)
    assert mask.dtype == np.uint8 and mask.shape == (1, 4)
    assert mask.tolist() == [[0, IGNORE, 1, IGNORE]]  # >= threshold is kept
    assert pl.pseudo_mask(confidence, labels, 0.0).tolist() == [[0, 0, 1, 0]]
    assert pl.pseudo_mask(confidence, labels, 1.0).tolist() == [[IGNORE] * 4]
    assert pl.pseudo_mask(confidence.numpy(), labels.numpy(), 0.75).tolist() == mask.tolist()
    assert labels.tolist() == [[0, 0, 1, 0]]  # the caller's labels are not overwritten


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_pseudo_mask_rejects_threshold_outside_unit_range(threshold):
    with pytest.raises(ValueError, match="threshold"):
        pl.pseudo_mask(torch.full((1, 1), 0.5), torch.zeros((1, 1), dtype=torch.uint8), threshold)


# ---------------------------------------------------------------- leak guard

@pytest.fixture
def val_set(tmp_path):
    """val.json with images 1, 2; other.json (different content) reuses ids 1, 2 for other files."""
    root = str(tmp_path / "data")
    write_coco(root, "val.json", [(1, "a/1.jpg"), (2, "a/2.jpg")])
    write_coco(root, "other.json", [(1, "b/1.jpg"), (2, "b/2.jpg"), (3, "b/3.jpg")])
    return data.SegmentationDataset(root, "val.json", "val", cache_dir=str(tmp_path / "cache"))


def write_manifest(out_dir, source, items):
    utils.atomic_write_json(os.path.join(out_dir, data.PSEUDO_MANIFEST), {
        "class_names": CLASS_NAMES, "threshold": 0.9, "checkpoints": [], "source": source,
        "items": [{"file_name": os.path.basename(image), "image_id": image_id, "image": image,
                   "mask": f"masks/{k}.png", "kept": 1.0} for k, (image_id, image) in enumerate(items)]})


def test_leak_guard_drops_val_images_by_resolved_path(tmp_path, val_set):
    root = val_set.coco.root
    os.symlink(os.path.join(root, "a"), tmp_path / "link")
    write_manifest(tmp_path, {"image_dir": root}, [
        (None, os.path.join(root, "a", "..", "a", "1.jpg")),  # val image 1, unnormalised path
        (None, str(tmp_path / "link" / "2.jpg")),              # val image 2, through a symlink
        (None, os.path.join(root, "b", "1.jpg")),
    ])
    pseudo = data.PseudoLabelDataset(str(tmp_path), transform=None, exclude=val_set)
    assert [item["image"] for item in pseudo.items] == [os.path.join(root, "b", "1.jpg")]


def test_leak_guard_drops_val_ids_only_from_the_same_json(tmp_path, val_set):
    root = val_set.coco.root
    copies = [str(tmp_path / f"copy{i}.jpg") for i in range(3)]  # files elsewhere: only ids can match
    same_json = {"data_root": root, "json": val_set.coco.path, "json_hash": val_set.coco.content_hash}
    write_manifest(tmp_path, same_json, [(1, copies[0]), (2, copies[1]), (3, copies[2])])
    assert [i["image_id"] for i in data.PseudoLabelDataset(str(tmp_path), None, exclude=val_set).items] == [3]

    other = coco_utils.Coco(os.path.join(root, "other.json"), root)
    other_json = {"data_root": root, "json": other.path, "json_hash": other.content_hash}
    write_manifest(tmp_path, other_json, [(1, copies[0]), (2, copies[1]), (3, copies[2])])
    assert [i["image_id"] for i in data.PseudoLabelDataset(str(tmp_path), None, exclude=val_set).items] == [1, 2, 3]


def test_no_exclusion_keeps_every_item(tmp_path, val_set):
    write_manifest(tmp_path, {"image_dir": val_set.coco.root}, [(None, val_set.coco.image_path(val_set.images[0]))])
    assert len(data.PseudoLabelDataset(str(tmp_path), None)) == 1


# ---------------------------------------------------------------- manifest round trip

class BrightIsCan(torch.nn.Module):
    """Fake ensemble: bright pixels are 'Can' with p = 0.95, dark ones 'Bottle' with p = 0.6."""

    tiling = None
    members = ()  # none that could say which data root they were trained on

    def forward(self, images):  # uint8 images, as the prediction datasets give them
        bright = (images.float().mean(1) > 127.5).float()
        can = 0.95 * bright + 0.2 * (1 - bright)
        bottle = 0.6 * (1 - bright) + 0.03 * bright
        return torch.stack([1 - can - bottle, can, bottle], 1)

    def summarise_images(self, images, summarise):  # as Ensemble's, which predict() calls
        return [summarise(probs) for probs in self(images)]


@pytest.fixture
def fake_ensemble(monkeypatch, tmp_path):
    checkpoint = tmp_path / "fold0.pt"
    checkpoint.write_bytes(b"")
    monkeypatch.setattr(ensembles, "load_ensemble", lambda patterns, device, tta, tiling, undo_class_weights:
                        (BrightIsCan(), CLASS_NAMES))
    return str(checkpoint)


def run(*argv):
    return pl.main(pl.get_args_parser().parse_args([*argv, "--workers", "0", "--device", "cpu"]))


def expected_mask(height=8, width=10):
    mask = np.full((height, width), IGNORE, np.uint8)
    mask[:, : width // 2] = 1  # only the confident bright half survives threshold 0.9
    return mask


def test_manifest_round_trip_through_the_training_dataset(tmp_path, fake_ensemble):
    root, out = str(tmp_path / "data"), str(tmp_path / "pseudo")
    write_photos(root, ["batch/1.png", "batch/2.png"])
    write_coco(root, "test.json", [(7, "batch/1.png"), (8, "batch/2.png")])
    manifest = run("--checkpoints", fake_ensemble, "--data-root", root, "--json", "test.json",
                   "--threshold", "0.9", "--out", out)

    with open(os.path.join(out, data.PSEUDO_MANIFEST)) as f:
        assert json.load(f) == manifest
    assert manifest["class_names"] == CLASS_NAMES and manifest["threshold"] == 0.9
    assert manifest["checkpoints"] == [fake_ensemble]
    assert manifest["source"]["json_hash"] == coco_utils.Coco(os.path.join(root, "test.json"), root).content_hash
    assert [(i["image_id"], i["mask"], i["kept"]) for i in manifest["items"]] == [
        (7, os.path.join("masks", "batch", "1.png"), 0.5), (8, os.path.join("masks", "batch", "2.png"), 0.5)]
    assert manifest["items"][0]["image"] == os.path.join(root, "batch", "1.png")
    for item in manifest["items"]:
        np.testing.assert_array_equal(data.read_label_png(os.path.join(out, item["mask"])), expected_mask())

    pseudo = data.PseudoLabelDataset(out, presets.build_transform("none", 16))
    assert pseudo.class_names == CLASS_NAMES and len(pseudo) == 2
    image, mask = pseudo[(1, 123)]
    assert image.shape == (3, 16, 16) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {1, IGNORE}
    np.testing.assert_array_equal(mask.numpy(), cv2.resize(expected_mask(), (16, 16), interpolation=cv2.INTER_NEAREST))


def test_image_dir_lists_images_recursively_and_never_its_own_output(tmp_path, fake_ensemble):
    folder = str(tmp_path / "photos")
    write_photos(folder, ["x.jpg", "sub/y.png"])
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    out = os.path.join(folder, "pseudo")  # output inside the input folder: left out of the inputs
    for again in ([], ["--overwrite"]):
        manifest = run("--checkpoints", fake_ensemble, "--image-dir", folder, "--out", out, *again)
        assert [(i["file_name"], i["image_id"]) for i in manifest["items"]] == [
            (os.path.join("sub", "y.png"), None), ("x.jpg", None)]
    assert manifest["source"] == {"image_dir": folder}


# ---------------------------------------------------------------- the output folder

@pytest.fixture
def no_prediction(monkeypatch):
    """For refusals: loading the ensemble (the first step of predicting) fails the test."""
    def load_ensemble(*args, **kwargs):
        raise AssertionError("predicted although --out was refused")
    monkeypatch.setattr(ensembles, "load_ensemble", load_ensemble)


def folder_files(folder):
    """{path relative to `folder`: bytes} of every file under it."""
    return {os.path.relpath(os.path.join(parent, name), folder): open(os.path.join(parent, name), "rb").read()
            for parent, _, names in os.walk(folder) for name in names}


def test_an_out_that_is_or_holds_the_image_dir_is_refused_before_predicting(tmp_path, no_prediction):
    folder = tmp_path / "photos"
    write_photos(str(folder), ["a.jpg"])
    utils.atomic_write_png(str(folder / "masks" / "a.png"), np.ones((8, 10), np.uint8))  # the user's ground truth
    before = folder_files(folder)
    for out in (folder, tmp_path):
        with pytest.raises(utils.UserError) as err:
            run("--checkpoints", "fold0.pt", "--image-dir", str(folder), "--out", str(out))
        assert str(err.value) == (f"--image-dir {folder} is --out {out} or inside it: the masks would land among the "
                                  f"photos (and be read as photos next time); pass an --out outside it")
    assert folder_files(folder) == before


def test_an_out_holding_other_files_is_refused_even_with_overwrite(tmp_path, no_prediction):
    photos, out = tmp_path / "photos", tmp_path / "results"
    write_photos(str(photos), ["a.jpg"])
    utils.atomic_write_png(str(out / "masks" / "a.png"), np.ones((8, 10), np.uint8))
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(utils.UserError) as err:
            run("--checkpoints", "fold0.pt", "--image-dir", str(photos), "--out", str(out), *overwrite)
        assert str(err.value) == (f"--out {out} is not empty and holds no pseudo-label manifest.json, so its files "
                                  f"are not this script's to replace: pass a new or empty folder")
    assert folder_files(out) == {os.path.join("masks", "a.png"): folder_files(out)[os.path.join("masks", "a.png")]}
    np.testing.assert_array_equal(data.read_label_png(str(out / "masks" / "a.png")), np.ones((8, 10), np.uint8))


def test_a_second_run_takes_overwrite_and_replaces_only_what_runs_wrote(tmp_path, fake_ensemble):
    root, out = str(tmp_path / "data"), tmp_path / "pseudo"
    write_photos(root, ["1.png", "2.png", "3.png"])
    write_coco(root, "first.json", [(1, "1.png"), (2, "2.png")])
    write_coco(root, "second.json", [(1, "1.png"), (3, "3.png")])
    label = ["--checkpoints", fake_ensemble, "--data-root", root, "--out", str(out)]
    run(*label, "--json", "first.json")
    (out / "notes.txt").write_text("mine")
    before = folder_files(out)
    with pytest.raises(utils.UserError) as err:
        run(*label, "--json", "second.json")
    assert str(err.value) == (f"--out {out} already holds the pseudo-labels of an earlier run (2 masks): replace "
                              f"them with --overwrite, or pass another --out")
    utils.atomic_write_bytes(out / "masks" / "3.png", b"the user's")  # where the second run would write
    with pytest.raises(utils.UserError) as err:
        run(*label, "--json", "second.json", "--overwrite")
    assert str(err.value) == (f"{out / 'masks' / '3.png'} is in the way of a mask and was not written by "
                              f"pseudo_label.py (1 such files): move them, or pass another --out")
    assert folder_files(out) == {**before, os.path.join("masks", "3.png"): b"the user's"}

    os.remove(out / "masks" / "3.png")
    manifest = run(*label, "--json", "second.json", "--overwrite")
    assert [item["image_id"] for item in manifest["items"]] == [1, 3]
    assert sorted(folder_files(out)) == ["manifest.json", os.path.join("masks", "1.png"),
                                         os.path.join("masks", "3.png"), "notes.txt"]  # 2.png, a mask of ours, is gone
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_stopped_midway_leaves_no_manifest_and_a_folder_still_ours(tmp_path, fake_ensemble, monkeypatch):
    root, out = str(tmp_path / "data"), tmp_path / "pseudo"
    write_photos(root, ["1.png", "2.png", "3.png"])
    write_coco(root, "test.json", [(1, "1.png"), (2, "2.png"), (3, "3.png")])
    label = ["--checkpoints", fake_ensemble, "--data-root", root, "--out", str(out), "--batch-size", "1"]
    run(*label)
    real_mask, made = pl.pseudo_mask, []

    def stopped_at_the_second_image(*args):
        if len(made) == 1:
            raise KeyboardInterrupt
        made.append(real_mask(*args))
        return made[-1]

    monkeypatch.setattr(pl, "pseudo_mask", stopped_at_the_second_image)
    with pytest.raises(KeyboardInterrupt):
        run(*label, "--overwrite")
    monkeypatch.setattr(pl, "pseudo_mask", real_mask)
    assert not (out / data.PSEUDO_MANIFEST).exists()  # no older manifest points at the masks it replaced
    with pytest.raises(utils.UserError, match="run pseudo_label.py --out"):
        data.PseudoLabelDataset(str(out), None)
    with pytest.raises(utils.UserError, match=r"already holds the pseudo-labels of an earlier run \(3 masks\)"):
        run(*label)
    assert len(run(*label, "--overwrite")["items"]) == 3
    assert sorted(folder_files(out)) == ["manifest.json", *(os.path.join("masks", f"{i}.png") for i in (1, 2, 3))]


def test_two_images_with_one_stem_are_refused(tmp_path, fake_ensemble):
    folder = str(tmp_path / "photos")
    write_photos(folder, ["a.jpg", "a.png"])
    with pytest.raises(ValueError, match="would both write"):
        run("--checkpoints", fake_ensemble, "--image-dir", folder, "--out", str(tmp_path / "out"))


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(utils.UserError, match="run pseudo_label.py"):
        data.PseudoLabelDataset(str(tmp_path), None)


# ---------------------------------------------------------------- ratio mix

class Recorder(torch.utils.data.Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, key):
        return key


def test_ratio_mix_length_and_disabled_ratios():
    assert len(data.mix_ratio_dataset(Recorder(), 10, 0.5)) == 5
    assert len(data.mix_ratio_dataset(Recorder(), 10, 2.0)) == 20
    assert data.mix_ratio_dataset(Recorder(), 10, 0.0) is None
    assert data.mix_ratio_dataset(Recorder(), 10, -1.0) is None
    with pytest.raises(ValueError, match="no pseudo-labelled images"):
        data.mix_ratio_dataset([], 10, 0.5)


def test_ratio_mix_draws_follow_the_sampler_seed():
    mix = data.mix_ratio_dataset(Recorder(), 40, 0.5)
    assert mix[(3, 1234)] == (1234 % 7, 1234) and mix[3] == 3

    def epoch_draws(epoch):
        sampler = data.ResumableSampler(mix, seed=5)
        sampler.set_epoch(epoch)
        return [mix[key] for key in sampler]

    assert epoch_draws(0) == epoch_draws(0)  # same run seed and epoch: same items, same augmentation
    assert epoch_draws(0) != epoch_draws(1)
    assert len({index for index, _ in epoch_draws(0) + epoch_draws(1)}) > 1


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_train_pseudo_label_retrain_end_to_end(tiny_demo, tiny_run, run_train, run_pseudo_label, tmp_path,
                                               image_reads):
    root, out = str(tiny_demo), str(tmp_path / "pseudo")
    manifest = run_pseudo_label("--checkpoints", tiny_run, "--data-root", root, "--threshold", 0.2, "--out", out,
                                "--allow-low-keep")  # a one-epoch teacher is rarely sure
    test_images = coco_utils.Coco(os.path.join(root, "test.json"), root)
    assert [i["image_id"] for i in manifest["items"]] == [image["id"] for image in test_images.images]
    for item in manifest["items"]:
        mask = data.read_label_png(os.path.join(out, item["mask"]))
        assert mask.shape == (64, 64) and item["kept"] == pytest.approx(np.mean(mask != IGNORE))
        assert set(np.unique(mask)) <= set(range(len(manifest["class_names"]))) | {IGNORE}

    image_reads.clear()
    retrained = tmp_path / "retrained"
    run_train(tiny_demo, "--epochs", 1, "--output", retrained, "--pseudo", out, "--pseudo-ratio", 1)
    # ratio 1: 8 pseudo-labelled draws join the 8 labelled images, so the epoch has 8 batches of 2, not 4
    assert utils.load_checkpoint(tiny_run / utils.LAST_CHECKPOINT)["global_step"] == 4
    assert utils.load_checkpoint(retrained / utils.LAST_CHECKPOINT)["global_step"] == 8
    test_paths = {os.path.realpath(test_images.image_path(image)) for image in test_images.images}
    assert sum(path in test_paths for path in image_reads) == 8


def test_the_class_weights_a_checkpoint_learnt_with_are_taken_out_before_the_threshold(
        tiny_demo, tiny_run, run_pseudo_label, tmp_path, capsys):
    # tiny_run learnt with the default --class-weights auto, and records them: the mean over present classes
    # is 1 and Background, the most frequent class, has the smallest weight
    checkpoint = utils.load_checkpoint(tiny_run / utils.BEST_CHECKPOINT)
    recorded = checkpoint["class_weights"]
    assert len(recorded) == 11 and min(recorded) == recorded[0] < 1
    # a model sure of Background, p = (0.95, 0.005 x 10), under weights (0.1, 1 x 10) predicts
    # q = w p / sum(w p) = (0.655, 0.0345 x 10): below the threshold 0.9 with the weights in, above it without
    weights = torch.tensor([0.1] + [1.0] * 10)
    p = torch.tensor([0.95] + [0.005] * 10)
    checkpoint["state_dict"]["head.weight"].zero_()
    checkpoint["state_dict"]["head.bias"] = torch.log(weights * p)
    checkpoint["class_weights"] = weights.tolist()
    utils.save_checkpoint(checkpoint, tmp_path / "recorded.pt")
    del checkpoint["class_weights"]
    utils.save_checkpoint(checkpoint, tmp_path / "unrecorded.pt")

    common = ["--data-root", tiny_demo, "--threshold", 0.9, "--allow-low-keep"]
    manifest = run_pseudo_label("--checkpoints", tmp_path / "recorded.pt", "--out", tmp_path / "a", *common)
    for item in manifest["items"]:
        assert (data.read_label_png(os.path.join(tmp_path / "a", item["mask"])) == 0).all()
    capsys.readouterr()
    manifest = run_pseudo_label("--checkpoints", tmp_path / "unrecorded.pt", "--out", tmp_path / "b", *common)
    assert all(item["kept"] == 0 for item in manifest["items"])
    assert "learnt with class weights but does not record them" in capsys.readouterr().out
