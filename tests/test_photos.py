"""Photos from the wild: one reader for every script (EXIF, modes, limits, JPEG checks), batching of mixed sizes, tiling."""
import faulthandler
import json
import os
import struct
import sys
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import dataset as data
import ensemble as ensembles
import images as imaging
import model as models
import presets
from utils import UserError

# 4 x 6 blocks of 8 x 8 pixels (aligned to JPEG's blocks, so JPEG keeps them almost exactly), all colours distinct
BLOCKS = np.random.default_rng(0).permutation(np.arange(24)).reshape(4, 6)
STORED = np.kron(np.stack([BLOCKS * 10, 255 - BLOCKS * 10, (BLOCKS * 37) % 256], -1), np.ones((8, 8, 1))).astype(np.uint8)

# what a viewer shows for each EXIF orientation, written from the EXIF specification's words
DISPLAYED = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],                  # mirror horizontal
    3: lambda s: np.rot90(s, 2),              # rotate 180
    4: lambda s: s[::-1],                     # mirror vertical
    5: lambda s: np.rot90(s[:, ::-1], 1),     # mirror horizontal, then rotate 270 clockwise
    6: lambda s: np.rot90(s, -1),             # rotate 90 clockwise
    7: lambda s: np.rot90(s[:, ::-1], -1),    # mirror horizontal, then rotate 90 clockwise
    8: lambda s: np.rot90(s, 1),              # rotate 270 clockwise
}


def save_jpeg(path, rgb, orientation=None, **kwargs):
    exif = Image.Exif()
    if orientation is not None:
        exif[imaging.ORIENTATION_TAG] = orientation
    Image.fromarray(rgb).save(path, "JPEG", quality=100, subsampling=0, exif=exif, **kwargs)
    return str(path)


# ---------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_the_photo_as_a_viewer_does(tmp_path, orientation):
    path = save_jpeg(tmp_path / "photo.jpg", STORED, orientation)
    expected = DISPLAYED[orientation](STORED)
    image = imaging.read_image(path)
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).max() <= 4  # JPEG's rounding; a wrong turn differs by >= 10
    assert imaging.image_size(path) == expected.shape[:2]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_png_matches_pillows_exif_transpose(tmp_path, orientation):
    exif = Image.Exif()
    exif[imaging.ORIENTATION_TAG] = orientation
    Image.fromarray(STORED).save(tmp_path / "photo.png", exif=exif)  # decoded by Pillow, not OpenCV
    expected = np.array(ImageOps.exif_transpose(Image.open(tmp_path / "photo.png")).convert("RGB"))
    assert np.array_equal(imaging.read_image(str(tmp_path / "photo.png")), expected)
    assert np.array_equal(expected, DISPLAYED[orientation](STORED))


def test_exif_orientation_is_applied_alike_by_the_training_cache_and_the_folder_reader(tmp_path):
    path = save_jpeg(tmp_path / "photo.jpg", STORED, 6)
    cached = imaging.DecodedImageCache(str(tmp_path / "cache")).read(path)
    assert np.array_equal(cached, imaging.read_image(path))
    folder = data.ImageFolderDataset([str(tmp_path / "photo.jpg")], presets.build_transform("eval", None, 0, 1))
    image, name = folder[0]
    assert name == "photo.jpg" and tuple(image.shape) == (3, 48, 32)
    assert np.allclose(image.permute(1, 2, 0).numpy() * 255, cached, atol=0.01)


# ---------------------------------------------------------------- modes
@pytest.mark.parametrize("suffix,tolerance", [(".png", 0), (".jpg", 2)])
def test_greyscale_becomes_three_equal_channels(tmp_path, suffix, tolerance):
    grey = STORED[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / f"grey{suffix}", quality=100)
    image = imaging.read_image(str(tmp_path / f"grey{suffix}")).astype(int)
    assert (image == image[..., :1]).all() and np.abs(image[..., 0] - grey).max() <= tolerance


def test_palette_png_becomes_its_colours(tmp_path):
    palette_image = Image.fromarray(STORED).quantize(colors=24, method=Image.Quantize.MEDIANCUT)
    palette_image.save(tmp_path / "palette.png")
    assert np.array_equal(imaging.read_image(str(tmp_path / "palette.png")), np.array(palette_image.convert("RGB")))


def test_transparency_is_laid_over_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[:, :4, 3] = 255  # left half opaque, right half half transparent
    rgba[:, 4:, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    image = imaging.read_image(str(tmp_path / "alpha.png")).astype(int)
    assert (image[:, :4] == (100, 50, 0)).all()
    half = np.array([100, 50, 0]) * 128 / 255 + 255 * 127 / 255
    assert np.abs(image[:, 4:] - half).max() <= 1


def test_palette_transparency_is_laid_over_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # colour 0 (10, 20, 30) is transparent
    image.save(tmp_path / "palette_alpha.png", transparency=0)
    rgb = imaging.read_image(str(tmp_path / "palette_alpha.png"))
    assert tuple(rgb[0, 0]) == (200, 0, 0) and (rgb[1:] == 255).all()


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.array([[0, 100 * 257, 200 * 257, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), levels)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert imaging.read_image(str(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 100, 200, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8] = (0, 255, 255, 0)  # red
    cmyk[:, 8:] = (0, 0, 0, 255)  # black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    rgb = imaging.read_image(str(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(rgb[:, :6] - (255, 0, 0)).max() <= 8 and rgb[:, 10:].max() <= 8


# ---------------------------------------------------------------- files that are not (readable) images
def test_a_file_that_is_not_an_image_is_named(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list")
    with pytest.raises(UserError, match=r"notes\.jpg is not an image .*convert it to JPEG or PNG"):
        imaging.read_image(str(path))


def test_a_heic_photo_is_named_as_heic(tmp_path):
    path = tmp_path / "iphone.jpg"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    with pytest.raises(UserError, match=r"iphone\.jpg is a HEIC file"):
        imaging.read_image(str(path))


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.png is empty"):
        imaging.read_image(str(tmp_path / "empty.png"))


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width, height):
    """A PNG that claims width x height in its header and holds no pixels: a decompression bomb's calling card."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(bytes(64)))
            + png_chunk(b"IEND", b""))


def test_the_pixel_limit_refuses_a_bomb_from_its_header_alone(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(UserError, match=r"bomb\.png is 100000x100000 = 10000\.0 megapixels.*--max-image-pixels"):
        imaging.read_image(str(path))


def test_the_pixel_limit_can_be_raised(tmp_path):
    path = save_jpeg(tmp_path / "photo.jpg", STORED)
    with pytest.raises(UserError, match="over the limit of 0.001"):
        imaging.read_image(path, max_pixels=1000)
    assert imaging.read_image(path, max_pixels=32 * 48).shape == (32, 48, 3)


# ---------------------------------------------------------------- JPEG checks
def test_a_jpeg_with_data_after_its_end_is_accepted(tmp_path):
    clean = save_jpeg(tmp_path / "clean.jpg", STORED)
    motion = tmp_path / "motion.jpg"  # phones append a video or metadata after the image
    motion.write_bytes(open(clean, "rb").read() + b"\x00\x00\x00\x18ftypmp42" + bytes(20000))
    assert np.array_equal(imaging.read_image(str(motion)), imaging.read_image(clean))


@pytest.mark.parametrize("keep", [0.01, 0.67], ids=["cut-in-the-header", "cut-in-the-pixels"])
def test_a_truncated_jpeg_is_refused(tmp_path, keep):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    full = open(save_jpeg(tmp_path / "full.jpg", noise), "rb").read()
    (tmp_path / "cut.jpg").write_bytes(full[:round(len(full) * keep)])
    with pytest.raises(UserError, match=r"cut\.jpg is truncated"):
        imaging.read_image(str(tmp_path / "cut.jpg"))


def test_a_progressive_jpeg_is_read_whole_and_refused_cut(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    path = save_jpeg(tmp_path / "progressive.jpg", noise, progressive=True)
    assert np.array_equal(imaging.read_image(path), np.array(Image.open(path)))
    full = open(path, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(full[:len(full) // 2])  # cut between two of its scans' data
    with pytest.raises(UserError, match="truncated"):
        imaging.read_image(str(tmp_path / "cut.jpg"))


def test_an_exif_thumbnail_does_not_hide_a_cut_photo(tmp_path):
    thumbnail = open(save_jpeg(tmp_path / "thumb.jpg", STORED[:8, :8]), "rb").read()  # ends with its own FF D9
    app1 = b"Exif\x00\x00" + thumbnail
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    photo = open(save_jpeg(tmp_path / "photo.jpg", noise), "rb").read()
    with_thumbnail = photo[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + photo[2:]
    (tmp_path / "whole.jpg").write_bytes(with_thumbnail)
    assert np.array_equal(imaging.read_image(str(tmp_path / "whole.jpg")),
                          imaging.read_image(str(tmp_path / "photo.jpg")))
    (tmp_path / "cut.jpg").write_bytes(with_thumbnail[:len(with_thumbnail) - len(photo) // 2])
    with pytest.raises(UserError, match="truncated"):
        imaging.read_image(str(tmp_path / "cut.jpg"))


def test_a_png_named_jpg_is_read_by_its_content(tmp_path):
    Image.fromarray(STORED).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert np.array_equal(imaging.read_image(str(tmp_path / "really_a_png.jpg")), STORED)


# ---------------------------------------------------------------- COCO size checks
def write_coco(root, width, height):
    coco = {"images": [{"id": 1, "file_name": "photo.jpg", "width": width, "height": height}],
            "annotations": [], "categories": [{"id": 1, "name": "Can"}]}
    (root / "test.json").write_text(json.dumps(coco))


def test_exif_rotation_that_explains_a_size_mismatch_says_so(tmp_path):
    save_jpeg(tmp_path / "photo.jpg", STORED, 6)  # stored 48x32 (WxH), displayed 32x48
    write_coco(tmp_path, width=48, height=32)  # the json describes the stored pixels
    dataset = data.SegmentationDataset(str(tmp_path), "test.json", "test")
    with pytest.raises(UserError, match=r"photo\.jpg is 32x48 .*EXIF orientation 6.*strip the orientation tag"):
        dataset[0]


def test_a_size_mismatch_that_exif_does_not_explain_says_so(tmp_path):
    save_jpeg(tmp_path / "photo.jpg", STORED, 3)
    write_coco(tmp_path, width=40, height=30)
    dataset = data.SegmentationDataset(str(tmp_path), "test.json", "test")
    with pytest.raises(UserError, match=r"is 48x32 \(WxH\) but the json says 40x30 \(its EXIF orientation 3 does not"):
        dataset[0]


# ---------------------------------------------------------------- folders of photos
def test_folder_dataset_skips_unreadable_files_and_reports_decoding_failures(tmp_path):
    save_jpeg(tmp_path / "a.jpg", STORED)
    (tmp_path / "sub").mkdir()
    save_jpeg(tmp_path / "sub" / "b.jpg", STORED, 8)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    full = open(tmp_path / "a.jpg", "rb").read()
    (tmp_path / "cut.jpg").write_bytes(full[:len(full) // 2])
    folder = data.ImageFolderDataset([str(tmp_path)], presets.build_transform("eval", None, 0, 1))
    assert [i["file_name"] for i in folder.images] == ["a.jpg", "cut.jpg", "sub/b.jpg"]
    assert len(folder.skipped) == 2  # empty and bomb, from their headers
    assert isinstance(folder[1][0], UserError)  # the cut file fails only when decoded
    assert tuple(folder[2][0].shape) == (3, 48, 32)


def test_files_folders_and_globs_are_all_accepted(tmp_path):
    for name in ("x.jpg", "y.jpg"):
        save_jpeg(tmp_path / name, STORED)
    (tmp_path / "more").mkdir()
    save_jpeg(tmp_path / "more" / "z.jpg", STORED)
    found = imaging.find_images([str(tmp_path / "x.jpg"), str(tmp_path / "*.jpg"), str(tmp_path / "more")])
    assert [name for _, name in found] == ["x.jpg", "y.jpg", "z.jpg"]
    with pytest.raises(UserError, match="matches no file or folder"):
        imaging.find_images([str(tmp_path / "nothing*.jpg")])


# ---------------------------------------------------------------- batching mixed sizes
def test_collate_stacks_equal_sizes_and_lists_different_ones():
    same = [(torch.ones(3, 4, 5), torch.zeros(4, 5), "a"), (torch.ones(3, 4, 5), torch.zeros(4, 5), "b")]
    images, masks, names = data.collate_mixed(same)
    assert images.shape == (2, 3, 4, 5) and masks.shape == (2, 4, 5) and names == ["a", "b"]
    mixed = [(torch.ones(3, 8, 8), torch.zeros(4, 5)), (torch.ones(3, 8, 8), torch.zeros(5, 4))]
    images, masks = data.collate_mixed(mixed)
    assert images.shape == (2, 3, 8, 8) and [tuple(m.shape) for m in masks] == [(4, 5), (5, 4)]


# ---------------------------------------------------------------- tiling
def tiny_member(image_size, seed=0):
    torch.manual_seed(seed)
    net = models.create_model("unet", "test_resnet", 3)
    checkpoint = {"model": "unet", "encoder": "test_resnet", "model_kwargs": {}, "num_classes": 3,
                  "image_size": image_size, "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": net.state_dict()}
    return ensembles.Member(checkpoint).eval()


def test_window_spans_cover_the_side_with_the_last_window_on_the_border():
    assert ensembles.window_spans(64, 64, 1 / 3) == [(0, 64)]
    assert ensembles.window_spans(100, 64, 0.25) == [(0, 64), (36, 100)]  # stride 48, the last one moved back
    assert ensembles.window_spans(150, 64, 0.25) == [(0, 64), (48, 112), (86, 150)]
    assert ensembles.window_spans(40, 64, 0.25) == [(0, 40)]  # a short side is one window


def tiled(members, tile, overlap, batch_size=4, vote="soft"):
    return ensembles.Ensemble(members, vote, ensembles.Tiling(tile, overlap, batch_size, "cpu")).eval()


def keep_probabilities(probs):
    return probs


@pytest.mark.parametrize("image_size,side", [(64, 64), (32, 80)])
def test_one_window_the_size_of_the_image_gives_exactly_the_untiled_prediction(image_size, side):
    member = tiny_member(image_size)
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(tiled([member], side, 1 / 3).slide(image, keep_probabilities), member(image[None])[0])


def window_average(member, image, tile, overlap):
    """Each window's probabilities summed where they fall, divided by how many windows hold each pixel."""
    height, width = image.shape[-2:]
    total, count = torch.zeros(3, height, width), torch.zeros(height, width)
    for y0, y1 in ensembles.window_spans(height, tile, overlap):
        for x0, x1 in ensembles.window_spans(width, tile, overlap):
            total[:, y0:y1, x0:x1] += member(image[None, :, y0:y1, x0:x1])[0]
            count[y0:y1, x0:x1] += 1
    assert count.min() >= 1 and count.max() > 1
    return total / count


@pytest.mark.parametrize("height,width,overlap", [(40, 56, 0.5), (100, 70, 1 / 3), (90, 33, 0.25)])
def test_tiled_probabilities_average_the_overlapping_windows(height, width, overlap):
    member = tiny_member(32)
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        probs = tiled([member], 32, overlap, batch_size=2).slide(image, keep_probabilities)
        expected = window_average(member, image, 32, overlap)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(0), torch.ones(height, width))


def test_tiling_summarises_bands_no_higher_than_a_window():
    """The photo's full probabilities are never held: `summarise` sees bands of rows at most a window high."""
    member, bands = tiny_member(32), []

    def labels_and_top(probs):
        bands.append(probs.shape[-2:])
        return ensembles.labels_of(probs), probs.max(0).values

    image = torch.randint(0, 256, (3, 150, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        labels, top = tiled([member], 32, 1 / 3).slide(image, labels_and_top)
        expected = window_average(member, image.float() / 255, 32, 1 / 3)
    assert len(bands) > 2 and all(h <= 32 and w == 70 for h, w in bands) and sum(h for h, _ in bands) == 150
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected.argmax(0).byte())
    torch.testing.assert_close(top, expected.max(0).values)


def test_tiled_hard_vote_counts_each_members_averaged_windows():
    members = [tiny_member(32), tiny_member(32, seed=1)]
    image = torch.rand(3, 50, 45, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = tiled(members, 32, 0.25, vote="hard").slide(image, keep_probabilities)
        averages = [window_average(m, image, 32, 0.25) for m in members]
    torch.testing.assert_close(got, ensembles.Ensemble(members, "hard").combine(averages))


def test_members_take_uint8_images_as_their_unit_range_floats():
    """At the training size: resized, a uint8 image is rounded to uint8 again (tests/test_onnx_parity.py)."""
    member = tiny_member(32)
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(member(image), member(image.float() / 255), rtol=0, atol=0)
        assert torch.equal(member([image[0]])[0], member(image[:1])[0])


# ---------------------------------------------------------------- files that are not regular, cut PNGs, levels
@pytest.fixture
def fails_if_blocked():
    """Ends the run with a traceback if the test hangs (opening a named pipe waits for a writer forever)."""
    faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__)  # stderr itself may be captured
    yield
    faulthandler.cancel_dump_traceback_later()


def write_unreadable_entries(folder):
    """A readable photo, a symbolic link loop, a link to nothing, a named pipe and a PNG cut in its pixels."""
    folder.mkdir()
    Image.fromarray(STORED).save(folder / "ok.png")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("gone.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "pipe.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.png")
    full = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    (folder / "cut.png").write_bytes(full[:len(full) // 2])


def test_links_to_nothing_and_pipes_are_skipped_unopened_and_a_cut_png_when_decoded(tmp_path, fails_if_blocked):
    write_unreadable_entries(tmp_path / "photos")
    folder = data.ImageFolderDataset([str(tmp_path / "photos")], presets.build_transform("eval", None, 0, 1))
    assert [info["file_name"] for info in folder.images] == ["cut.png", "ok.png"]
    photos = tmp_path / "photos"
    assert folder.skipped == [
        f"image file {photos / 'dangling.jpg'} is a broken symbolic link (its target {photos / 'gone.jpg'} does "
        f"not exist): fix or remove the link",
        f"image file {photos / 'loop.jpg'} cannot be opened (Too many levels of symbolic links): fix or remove it",
        f"image file {photos / 'pipe.jpg'} is a named pipe (FIFO), not a regular file: remove it or name an image file"]
    error = folder[0][0]
    assert isinstance(error, UserError) and "cut.png is truncated or corrupt (image file is truncated" in str(error)
    assert tuple(folder[1][0].shape) == (3, 32, 48)


def test_globs_and_named_files_take_links_to_nothing_and_pipes_as_unreadable_files(tmp_path, fails_if_blocked):
    write_unreadable_entries(tmp_path / "photos")
    photos = tmp_path / "photos"
    found = imaging.find_images([str(photos / "*.jpg"), str(photos / "pipe.jpg"), str(photos / "ok.png")])
    assert [name for _, name in found] == ["dangling.jpg", "loop.jpg", "ok.png", "pipe.jpg"]
    transform = presets.build_transform("eval", None, 0, 1)
    folder = data.ImageFolderDataset([str(photos / "*.jpg"), str(photos / "ok.png")], transform)
    assert [info["file_name"] for info in folder.images] == ["ok.png"] and len(folder.skipped) == 3


@pytest.mark.slow
def test_inference_on_a_folder_counts_links_to_nothing_pipes_and_cut_pngs(
        tmp_path, constant_checkpoint, run_inference, capsys, fails_if_blocked):
    write_unreadable_entries(tmp_path / "photos")
    checkpoint = constant_checkpoint(tmp_path / "constant.pt", 1)
    run_inference("--checkpoints", checkpoint, "--images", tmp_path / "photos", "--output", tmp_path / "sub.csv")
    out = capsys.readouterr().out
    assert out.count("skipped: image file") == 4
    assert f"wrote {tmp_path / 'sub.csv'} (1 images)\n4 unreadable file(s) skipped\n" in out


def png_with_exif_after_the_pixels(path, rgb, orientation):
    """A PNG whose eXIf chunk follows its pixel data (the PNG specification allows it; Pillow writes it before)."""
    exif = Image.Exif()
    exif[imaging.ORIENTATION_TAG] = orientation
    Image.fromarray(rgb).save(path, exif=exif)
    contents, chunks, pos = path.read_bytes(), [], 8
    while pos < len(contents):
        length = struct.unpack(">I", contents[pos:pos + 4])[0]
        chunks.append(contents[pos:pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(chunk for chunk in chunks if chunk[4:8] == b"eXIf")
    chunks.remove(exif_chunk)
    path.write_bytes(contents[:8] + b"".join(chunks[:-1]) + exif_chunk + chunks[-1])  # before IEND


def test_the_header_scan_of_a_png_decodes_no_pixels_and_finds_exif_after_them(tmp_path, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "plain.png")
    png_with_exif_after_the_pixels(tmp_path / "turned.png", noise, 6)
    loads, real_load = [], ImageFile.ImageFile.load

    def counting_load(image):
        loads.append(image)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    assert imaging.image_size(tmp_path / "plain.png") == (300, 200)
    assert imaging.image_size(tmp_path / "turned.png") == (200, 300)
    assert loads == []
    assert np.array_equal(imaging.read_image(tmp_path / "turned.png"), np.rot90(noise, -1))  # the decoder agrees


def test_a_float_tiff_of_0_to_1_is_scaled_to_8_bits(tmp_path):
    Image.fromarray(np.array([[0, 0.25, 0.5, 1]], np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert imaging.read_image(tmp_path / "float.tif")[0].tolist() == [[0] * 3, [64] * 3, [128] * 3, [255] * 3]


@pytest.mark.parametrize("levels,message", [
    (np.array([[0, 2.5, 300]], np.float32), "a floating-point image with levels from 0 to 300, outside 0..1"),
    (np.array([[0, np.nan]], np.float32), "a floating-point image with levels from nan to nan, outside 0..1"),
    (np.array([[-5, 70000]], np.int32), "a 32-bit integer image with levels from -5 to 70000, outside 0..65535")])
def test_levels_outside_their_range_are_refused_not_clipped(tmp_path, levels, message):
    Image.fromarray(levels).save(tmp_path / "levels.tif")
    with pytest.raises(UserError, match=rf"levels\.tif is {message}: save it as 8- or 16-bit"):
        imaging.read_image(tmp_path / "levels.tif")


def test_16_bit_tiffs_of_either_byte_order_are_scaled_to_8_bits(tmp_path):
    levels = np.array([[0, 100 * 257, 200 * 257, 65535]], np.uint16)
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2")):
        Image.frombytes(mode, (4, 1), levels.astype(dtype).tobytes()).save(tmp_path / "deep.tif")
        assert Image.open(tmp_path / "deep.tif").mode == mode
        assert imaging.read_image(tmp_path / "deep.tif")[0, :, 0].tolist() == [0, 100, 200, 255]


def test_a_tiff_pillow_cannot_read_is_named_as_a_tiff(tmp_path):
    cv2.imwrite(str(tmp_path / "colour.tif"), np.full((4, 4, 3), 0.5, np.float32))  # floating-point RGB
    with pytest.raises(UserError, match=r"colour\.tif is a TIFF that Pillow cannot read .*convert it to 8- or 16-bit"):
        imaging.read_image(tmp_path / "colour.tif")


def test_a_json_image_over_the_pixel_guard_is_not_refused_as_beyond_opencv(tmp_path):
    write_coco(tmp_path, width=10_000, height=6_000)  # 60 megapixels: over the 50 MP guard, far within OpenCV
    (tmp_path / "photo.jpg").write_bytes(png_header_only(10_000, 6_000))
    dataset = data.SegmentationDataset(str(tmp_path), "test.json", "test")
    with pytest.raises(UserError, match=r"photo\.jpg is 10000x6000 = 60\.0 megapixels, over the limit of 50 .*--max-"):
        dataset[0]  # the guard, which --max-image-pixels raises, is what refuses it
    raised = data.SegmentationDataset(str(tmp_path), "test.json", "test", max_pixels=70_000_000)
    assert raised.images[0]["width"] == 10_000
    write_coco(tmp_path, width=40_000, height=30_000)
    with pytest.raises(UserError, match=r"image 1 is 40000x30000 \(WxH\), larger than OpenCV reads \(1048576 pixels "
                                        r"a side, 1073741824 in all\)"):
        data.SegmentationDataset(str(tmp_path), "test.json", "test", max_pixels=2_000_000_000)
