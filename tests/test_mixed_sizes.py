"""End to end on photos of several sizes and orientations: train -> validation -> inference --json --eval ->
inference --images on a folder of wild photos -> pseudo_label.py --image-dir -> --oof."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coco_utils
import dataset as data
import demo
import images as imaging
import inference
import model as models
import presets
import pseudo_label
import train
import utils

SIZES = [(64, 48), (48, 64), (64, 64)]  # landscape, portrait, square (WxH)
TINY = ["--model", "unet", "--encoder", "test_resnet", "--size", "32", "--batch-size", "3", "--workers", "0",
        "--device", "cpu", "--epochs", "1"]
DEVICE = ["--workers", "0", "--device", "cpu", "--batch-size", "3"]
pytestmark = pytest.mark.slow  # every test reads a run trained here


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A mixed-size demo set and a run trained on it: (data root, run folder, temporary folder)."""
    tmp = tmp_path_factory.mktemp("mixed")
    root = demo.make_demo(str(tmp / "data"), n_train=6, n_val=3, n_test=3, sizes=SIZES)
    run = tmp / "run"
    train.main(train.get_args_parser().parse_args(
        [*TINY, "--data-root", root, "--cache-dir", str(tmp / "cache"), "--output", str(run)]))
    return root, run, tmp


def test_demo_draws_each_size_with_labels_on_the_pixels(mixed):
    root, _, _ = mixed
    coco = coco_utils.Coco(os.path.join(root, "train_all.json"), root)
    assert {(image["width"], image["height"]) for image in coco.images} == set(SIZES)
    for image in coco.images:
        assert imaging.read_image(coco.image_path(image)).shape == (image["height"], image["width"], 3)
        for ann in coco.anns_by_image[image["id"]]:
            x, y, w, h = ann["bbox"]
            assert x + w <= image["width"] + 1 and y + h <= image["height"] + 1


def test_training_validates_mixed_sizes_and_records_the_score(mixed):
    """The recorded scores are those of best.pt scored image by image, each prediction resized to its own mask;
    training validated the three sizes together, in batches of 3."""
    root, run, _ = mixed
    history = json.loads((run / "metrics.json").read_text())
    checkpoint = utils.load_checkpoint(run / utils.BEST_CHECKPOINT)
    net = models.create_model(checkpoint["model"], checkpoint["encoder"], checkpoint["num_classes"],
                              **checkpoint["model_kwargs"])
    net.load_state_dict(checkpoint["state_dict"])
    transform = presets.build_transform("eval", checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    dataset = data.SegmentationDataset(root, "val.json", "val", transform)
    confusion = utils.ConfusionMatrix(checkpoint["num_classes"])
    sizes = set()
    with torch.no_grad():
        for image, mask in (dataset[index] for index in range(len(dataset))):
            logits = F.interpolate(net.eval()(image[None]), size=mask.shape, mode="bilinear", align_corners=False)
            confusion.update(mask, logits.argmax(1))
            sizes.add(tuple(mask.shape))
    assert len(sizes) > 1  # the val set does mix sizes
    expected = confusion.compute()
    assert len(history) == 1 and history[0]["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    recorded = [np.nan if v is None else v for v in history[0]["iou"].values()]
    np.testing.assert_allclose(recorded, expected["iou"], atol=1e-6)


def test_preflight_fails_within_seconds_on_a_bad_val_image(mixed, tmp_path):
    root, _, _ = mixed
    val = json.loads(open(os.path.join(root, "val.json")).read())
    val["images"][-1]["width"] += 1  # the json disagrees with the file, for the last val image only
    with open(os.path.join(root, "val_bad.json"), "w") as f:
        json.dump(val, f)
    args = train.get_args_parser().parse_args(
        [*TINY, "--data-root", root, "--val-json", "val_bad.json", "--cache-dir", str(tmp_path / "cache"),
         "--output", str(tmp_path / "run")])
    with pytest.raises(utils.UserError, match="but the json says"):
        train.main(args)
    assert not (tmp_path / "run" / utils.LAST_CHECKPOINT).exists()  # stopped before the first training step


def test_eval_scores_each_image_at_its_own_size(mixed, tmp_path):
    root, run, _ = mixed
    masks = tmp_path / "masks"
    scores = inference.main(inference.get_args_parser().parse_args(
        ["--checkpoints", str(run), "--data-root", root, "--json", "val.json", "--eval", *DEVICE,
         "--output", str(tmp_path / "val.csv"), "--save-masks", str(masks)]))
    dataset = data.SegmentationDataset(root, "val.json", "val")
    confusion = utils.ConfusionMatrix(dataset.coco.num_classes)
    for index, info in enumerate(dataset.images):
        predicted = np.array(Image.open(masks / data.output_name(info["file_name"])))
        assert predicted.shape == (info["height"], info["width"])
        confusion.update(torch.from_numpy(dataset.label_mask(index)), torch.from_numpy(predicted))
    assert confusion.compute()["miou"] == pytest.approx(scores["miou"])


def write_wild_photos(folder):
    """Photos as they come: EXIF-rotated, greyscale, transparent, 16-bit, CMYK, PNG named .jpg, and broken files."""
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[imaging.ORIENTATION_TAG] = 6
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)  # shown as 40 wide, 56 high
    (folder / "phone").mkdir()
    Image.fromarray(rgb[..., 0], "L").save(folder / "phone" / "grey.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "print.jpg")
    Image.fromarray(rgb).save(folder / "png_named.jpg", format="PNG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    full = (folder / "rotated.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(full[:len(full) // 2])
    shown = {"rotated": (56, 40), "phone/grey": (40, 56), "alpha": (40, 56), "deep": (40, 56), "print": (40, 56),
             "png_named": (40, 56)}
    return shown, 3  # readable photos' (height, width) as displayed; unreadable files


def test_a_folder_of_wild_photos_gives_masks_and_panels_at_the_size_people_see(mixed, capsys):
    _, run, tmp = mixed
    shown, broken = write_wild_photos(tmp / "photos")
    run_class_names = utils.load_checkpoint(os.path.join(run, utils.BEST_CHECKPOINT))["class_names"]
    for tile in ([], ["--tile", "48"]):
        out = tmp / f"out{len(tile)}"
        inference.main(inference.get_args_parser().parse_args(
            ["--checkpoints", str(run), "--images", str(tmp / "photos"), *DEVICE, *tile,
             "--save-masks", str(out / "masks"), "--save-vis", str(out / "vis"), "--output", str(out / "sub.csv")]))
        assert f"{broken} unreadable file(s) skipped" in capsys.readouterr().out
        for stem, (height, width) in shown.items():
            assert np.array(Image.open(out / "masks" / f"{stem}.png")).shape == (height, width)
            vis = np.array(Image.open(out / "vis" / f"{stem}.png"))
            strips = len(utils.title_strip("", 2 * width)) + len(utils.legend_strip(run_class_names, 2 * width))
            assert vis.shape == (height + strips, 2 * width, 3)
        rows = utils.read_submission(out / "sub.csv", 11)
        assert sorted(os.path.splitext(name)[0] for name in rows) == sorted(shown)


def test_pseudo_labels_and_out_of_fold_on_mixed_sizes(mixed, constant_copy, capsys):
    root, run, tmp = mixed
    if not (tmp / "photos").exists():
        write_wild_photos(tmp / "photos")
    manifest = pseudo_label.main(pseudo_label.get_args_parser().parse_args(
        ["--checkpoints", str(run), "--image-dir", str(tmp / "photos"), "--out", str(tmp / "pseudo"), *DEVICE,
         "--allow-low-keep"]))  # an untrained model is confident nowhere
    assert len(manifest["items"]) == 6 and "3 unreadable file(s) skipped" in capsys.readouterr().out
    rotated = next(item for item in manifest["items"] if item["file_name"] == "rotated.jpg")
    assert data.read_label_png(str(tmp / "pseudo" / rotated["mask"])).shape == (56, 40)

    for fold in (0, 1):
        train.main(train.get_args_parser().parse_args(
            [*TINY, "--data-root", root, "--cache-dir", str(tmp / "cache"), "--fold", str(fold), "--n-folds", "2",
             "--output", str(tmp / f"fold{fold}"), "--no-preflight"]))
    # fold 0 predicts Background everywhere, fold 1 class 3: the out-of-fold scores are the ground truth of each
    # fold's own val images, at their own sizes, against that fold's class
    labels = {0: 0, 1: 3}
    for fold, label in labels.items():
        best = tmp / f"fold{fold}" / utils.BEST_CHECKPOINT
        constant_copy(best, best, label)
    scores = inference.main(inference.get_args_parser().parse_args(["--oof", str(tmp / "fold*"), *DEVICE]))
    dataset = data.SegmentationDataset(root, "train_all.json", "val")
    index_of = {image["id"]: index for index, image in enumerate(dataset.images)}
    expected = utils.ConfusionMatrix(dataset.coco.num_classes)
    for fold, label in labels.items():
        for image_id in data.fold_image_ids(dataset.coco, fold, n_splits=2)[1]:
            target = torch.from_numpy(dataset.label_mask(index_of[image_id]))
            expected.update(target, torch.full_like(target, label))
    expected = expected.compute()
    assert scores["miou"] == pytest.approx(expected["miou"]) and 0 < scores["miou"] < 1
    np.testing.assert_allclose(scores["iou"], expected["iou"])
