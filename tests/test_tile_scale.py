"""--tile alone: windows as large as the photos the model was trained on, so it sees them at the scale it learned.

A run trained on 128 px photos resized to 32 sees a 128 px photo as 32 px: a window of 128 photo
pixels, not 32 (the training size, what --tile 32 cuts), shows it each part of a photo as it saw
the training photos.
"""
import os

import pytest
import torch

import coco_utils
import dataset as data
import demo
import ensemble as ensembles
import export
import images as imaging
import inference
import train
import utils

TRAINED_ON, SIZE = 128, 32  # training photos resized down 4x


@pytest.fixture(scope="module")
def scale_run(demo_set, run_train, tmp_path_factory):
    """(the demo root, best.pt of a run of one epoch on 128 px photos at --size 32, with a random head).

    After one epoch the run labels nearly every pixel background, which any window agrees with. A
    random head (seeded) makes the labels hinge on the features of local content at the scale the
    model sees it, so a window at another scale labels otherwise; its large weights make it as sure
    of each pixel as a trained model is (nearly one-hot probabilities).
    """
    root = demo_set(TRAINED_ON, 4, 2, 2)
    run = tmp_path_factory.mktemp("tile_scale") / "run"
    run_train(root, "--size", SIZE, "--epochs", 1, "--output", run)
    checkpoint = utils.load_checkpoint(run / utils.BEST_CHECKPOINT)
    head = checkpoint["state_dict"]["head.weight"]
    checkpoint["state_dict"]["head.weight"] = 100 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
    checkpoint["state_dict"]["head.bias"] = torch.zeros(len(checkpoint["state_dict"]["head.bias"]))
    utils.save_checkpoint(checkpoint, run / "random_head.pt")
    return root, run / "random_head.pt"


def load(checkpoints, *flags):
    """The ensemble inference.py builds with these flags (all the windows of a photo in one batch)."""
    argv = ["--checkpoints", *checkpoints, *flags, "--batch-size", 256, "--device", "cpu"]
    args = inference.get_args_parser().parse_args(map(str, argv))
    return ensembles.load_ensemble(args.checkpoints, "cpu", tiling=ensembles.build_tiling(args))[0]


@torch.inference_mode()
def labels(ensemble, image):
    """H x W labels of one 3 x H x W uint8 image, as inference.py predicts them (window by window with --tile)."""
    if ensemble.tiling is not None:
        return ensemble.slide(image, ensembles.labels_of)
    return ensemble.summarise_images([image], ensembles.labels_of)[0]


def photos(root, count):
    """The first `count` demo photos, uint8 3 x H x W."""
    coco = coco_utils.Coco(os.path.join(root, "train_all.json"), str(root))
    return [torch.from_numpy(imaging.read_image(coco.image_path(info))).permute(2, 0, 1)
            for info in coco.images[:count]]


def resized(image, side):
    return ensembles.resize_image(image[None], (side, side))[0]


@pytest.mark.slow
def test_a_run_records_its_training_photos_size_and_an_export_carries_it(scale_run):
    _, random_head = scale_run
    for name in (utils.BEST_CHECKPOINT, utils.LAST_CHECKPOINT):
        checkpoint = utils.load_checkpoint(random_head.parent / name)
        assert (checkpoint["train_image_size"], checkpoint["image_size"]) == ([TRAINED_ON, TRAINED_ON], SIZE)
    assert export.description(checkpoint, 64, labels=False)["train_image_size"] == [TRAINED_ON, TRAINED_ON]


def test_the_record_is_each_sides_median_and_the_window_their_geometric_mean(tmp_path):
    root = demo.make_demo(str(tmp_path / "data"), n_train=3, n_val=1, n_test=0, sizes=[(80, 48), (80, 64), (48, 80)])
    trained_on = torch.utils.data.ConcatDataset([data.SegmentationDataset(root, "train.json", cache_dir=tmp_path)])
    assert train.train_image_size(trained_on) == [64, 80]  # heights 48, 64, 80; widths 80, 80, 48
    assert ensembles.native_window([64, 80], 32, 32) == 72  # sqrt(64 * 80) = 71.6
    assert ensembles.native_window([128, 128], 32, 64) == 256  # an ONNX export at 64 of a run at 32
    assert ensembles.native_window(None, 32, 32) is None


@pytest.mark.slow
def test_a_photo_upscaled_4x_and_tiled_labels_as_the_original_untiled(scale_run, capsys):
    """The issue's test. The model saw its 128 px training photos at 32 px: a 32 px photo is a scene as it
    saw them; upscaled 4x (to the training photos' 128 px) and tiled with --tile, its labels resized back
    down are the original's. --tile 32 (the training size, what --tile could only be before) shows the
    model windows of a quarter of the scene, 4x larger than it learned them.

    Each pixel is upscaled to a 4 x 4 block, which the model's resize of a 128 px window makes one pixel
    again: the model sees the very pixels of the original, and the labels differ only where the
    probabilities, resized to 128 px, tie at a border between classes."""
    root, random_head = scale_run
    untiled, native = load([random_head]), load([random_head], "--tile")
    training_size = load([random_head], "--tile", SIZE)
    assert f"--tile: windows of {TRAINED_ON} x {TRAINED_ON} photo pixels, the size of the photos {random_head} " \
           f"was trained on (--tile SIZE sets another)" in capsys.readouterr().out
    assert (native.tiling.size, training_size.tiling.size) == (TRAINED_ON, SIZE)
    agreement = {"native": [], "training size": []}
    for photo in photos(root, 4):
        original = resized(photo, SIZE)
        expected = labels(untiled, original)
        upscaled = original.repeat_interleave(4, 1).repeat_interleave(4, 2)
        for name, ensemble in (("native", native), ("training size", training_size)):
            down = labels(ensemble, upscaled)[2::4, 2::4]  # nearest (-exact): a centre pixel of each 4 x 4 block
            agreement[name].append((down == expected).float().mean().item())
    assert min(agreement["native"]) >= 0.98  # measured 0.995 .. 1.0
    assert max(agreement["training size"]) < 0.8  # measured 0.33 .. 0.42


@pytest.mark.slow
def test_a_wide_photo_is_labelled_window_by_window_as_each_training_sized_photo_alone(scale_run):
    """A photo of a scene twice as wide as the training photos, at their pixel density (2 x 2 of them): --tile
    windows it at 128 photo pixels, each predicted as that photo alone is. Windows overlapping two photos
    (the default overlap) see a collage no photo shows; without overlap each window is one photo."""
    root, random_head = scale_run
    untiled = load([random_head])
    cells = photos(root, 4)
    wide = torch.cat([torch.cat(cells[:2], 2), torch.cat(cells[2:], 2)], 1)
    expected = [labels(untiled, cell) for cell in cells]
    expected = torch.cat([torch.cat(expected[:2], 1), torch.cat(expected[2:], 1)], 0)
    agreement = {flags: (labels(load([random_head], *flags), wide) == expected).float().mean().item()
                 for flags in (("--tile", "--tile-overlap", "0"), ("--tile", str(SIZE), "--tile-overlap", "0"),
                               ("--tile",), ())}
    assert agreement[("--tile", "--tile-overlap", "0")] == 1.0
    assert agreement[("--tile", str(SIZE), "--tile-overlap", "0")] < 0.5  # measured 0.35
    assert agreement[("--tile",)] > 0.6  # measured 0.76: the windows across two photos see a collage
    assert agreement[()] < 0.5  # the whole photo at 32 px: objects at half the scale (measured 0.36)


@pytest.mark.slow
def test_tile_with_a_number_keeps_its_window(scale_run, capsys):
    _, random_head = scale_run
    assert load([random_head], "--tile", "48").tiling.size == 48
    assert "--tile:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        inference.get_args_parser().parse_args(["--tile", "0"])
    assert "argument --tile: must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_without_the_record_tiles_at_its_training_size_with_a_note(scale_run, tmp_path, capsys):
    _, random_head = scale_run
    checkpoint = utils.load_checkpoint(random_head)
    del checkpoint["train_image_size"]
    old = tmp_path / "old.pt"
    utils.save_checkpoint(checkpoint, old)
    assert load([old], "--tile").tiling.size == SIZE
    assert f"note: --tile: {old} does not record the size of its training photos (trained before it was recorded), " \
           f"so windows are {SIZE} photo pixels, its training size; pass --tile SIZE with the size of the photos it " \
           f"was trained on" in capsys.readouterr().out


@pytest.mark.slow
def test_members_trained_on_other_sizes_are_warned_of_once_and_the_first_windows(scale_run, tmp_path, capsys):
    _, random_head = scale_run
    checkpoint = utils.load_checkpoint(random_head)
    checkpoint["train_image_size"] = [48, 48]
    other = tmp_path / "other.pt"
    utils.save_checkpoint(checkpoint, other)
    assert load([random_head, other, random_head], "--tile").tiling.size == TRAINED_ON
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: --tile: the models were trained on photos of different sizes, so they would "
                        f"window a photo differently ({random_head}: {TRAINED_ON}, {other}: 48); using "
                        f"{random_head}'s (pass --tile SIZE to choose)"]
