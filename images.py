"""The one image reader of the toolkit: every script reads photos through it.

Holds: read_image and decode_image (file or bytes -> RGB uint8 as a person sees the photo: EXIF
orientation applied, any mode converted), open_image and image_size (the header alone), the checks
(check_regular_file, check_pixel_limit and its ImageTooLarge, size_mismatch_message), the EXIF and
PNG helpers (exif_orientation, png_chunk), DecodedImageCache (decoded pixels on disk), and the
finders of photos in files, folders and globs (find_images, readable_images). Limits: MAX_IMAGE_PIXELS,
OpenCV's own (OPENCV_MAX_SIDE, OPENCV_MAX_PIXELS); IMAGE_EXTENSIONS; DEFAULT_CACHE_DIR, the toolkit's cache.
"""
import collections
import glob
import hashlib
import io
import os
import stat
import struct

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils import UserError, atomic_write_npy

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "recycleseg", "masks")
MAX_IMAGE_PIXELS = 50_000_000  # about four 12-megapixel phone photos; scripts raise it with --max-image-pixels
OPENCV_MAX_SIDE, OPENCV_MAX_PIXELS = 1 << 20, 1 << 30  # OpenCV's own limits on images it reads

# One reader for every script. Colour and greyscale JPEGs, nearly every photo, take a fast path:
# a walk over the JPEG's markers gives the size (checked against the pixel limit before anything is
# decoded) and shows whether the image data is complete (bytes after its end marker are fine:
# phones append videos and metadata), then OpenCV decodes it, applying the EXIF orientation.
# Everything else goes to Pillow, which recognises a file by its bytes (a PNG named .jpg is read as
# the PNG it is), reads the size from the header, applies EXIF orientation (ImageOps.exif_transpose)
# and converts each mode (16-bit, palette or alpha transparency, CMYK) explicitly. Pillow for every
# file would cost about 0.5 ms more per image (its header parsing in Python), which small images feel.
Image.MAX_IMAGE_PIXELS = None  # read_image's own limit replaces Pillow's global one, so a flag can raise it
READER_VERSION = 3  # part of DecodedImageCache's keys: bump when the decoded pixels of a file change
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ORIENTATION_TAG = 0x0112
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# formats people save photos in that Pillow cannot read: (offset, magic bytes, name)
UNREADABLE_FORMATS = ((4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"),
                      (4, b"ftypavif", "AVIF"), (0, b"%PDF", "PDF"), (0, b"PK\x03\x04", "ZIP"))
WHITE = (255, 255, 255, 255)
# a one-channel image's levels that map to 0..255: floats 0..1, integers (16-bit and 32-bit modes) 0..65535
LEVEL_RANGES = {"F": ("floating-point", 1.0), "I": ("32-bit integer", 65535), "I;16": ("16-bit", 65535)}
NOT_REGULAR_FILES = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
                     stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JpegLayout = collections.namedtuple("JpegLayout", "width height components complete")


def read_image(path, expected_hw=None, max_pixels=MAX_IMAGE_PIXELS):
    """RGB uint8 H x W x 3 pixels as a person sees the photo: EXIF orientation applied, any mode converted.

    Problems are errors naming the file: missing, not a regular file (or a link to none), empty, not an
    image, over `max_pixels`, truncated or corrupt, levels outside their range (see `to_rgb`), or another
    size than `expected_hw` (the json's), saying whether EXIF rotation explains it.
    """
    path = os.fspath(path)
    check_regular_file(path)
    with open(path, "rb") as f:
        rgb = decode_image(f.read(), path, max_pixels)
    if expected_hw is not None and rgb.shape[:2] != tuple(expected_hw):
        raise UserError(size_mismatch_message(path, rgb.shape[:2], expected_hw))
    return rgb


def decode_image(contents, path, max_pixels=MAX_IMAGE_PIXELS):
    """An image file's bytes -> RGB pixels, as read_image reads the file (`path` names it in messages).

    Colour and greyscale JPEGs take OpenCV's fast path; everything else goes through Pillow.
    """
    layout = jpeg_layout(contents)
    if layout is not None and layout.components in (1, 3):
        check_pixel_limit(path, layout.width, layout.height, max_pixels)
        return decode_jpeg(contents, path, layout.complete)
    return decode_with_pillow(contents, path, max_pixels)


def decode_jpeg(contents, path, complete):
    """A colour or greyscale JPEG -> RGB pixels, EXIF orientation applied (by OpenCV)."""
    if not complete:
        raise UserError(f"image file {path} is truncated (its JPEG image data has no end): copy it again or remove it")
    rgb = cv2.imdecode(np.frombuffer(contents, np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise UserError(f"image file {path} is a corrupt JPEG that cannot be decoded: copy it again or remove it")
    return rgb


def decode_with_pillow(contents, path, max_pixels):
    """Any image Pillow reads -> RGB pixels, EXIF orientation applied."""
    with open_image(path, max_pixels, contents) as image:
        try:
            image.load()  # decodes; a cut file fails here
            ImageOps.exif_transpose(image, in_place=True)
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"image file {path} is truncated or corrupt ({err}): copy it again or remove it") from None
        return to_rgb(image, path)


def jpeg_layout(contents):
    """(width, height, colour components, whether the image data runs to its end marker) of a JPEG;
    None when the bytes are not a JPEG or its header cannot be walked (Pillow then reports why).

    The header segments are skipped by their lengths (an embedded thumbnail's own end marker lies
    inside one); after the first scan, the markers outside entropy-coded data (FF followed by
    anything but 00, fill FF or a restart marker D0-D7) are walked in turn up to EOI.
    """
    if contents[:3] != b"\xff\xd8\xff":
        return None
    data = np.frombuffer(contents, np.uint8)
    pos, frame = 2, None
    while True:  # header segments, up to and including the first start-of-scan
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = int(data[pos + 1])
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_FRAME_MARKERS and pos + 10 <= len(data):
            height, width = int(data[pos + 5]) << 8 | int(data[pos + 6]), int(data[pos + 7]) << 8 | int(data[pos + 8])
            frame = (width, height, int(data[pos + 9]))
        pos += 2 + (int(data[pos + 2]) << 8 | int(data[pos + 3]))
        if marker == 0xDA:
            break
    if frame is None:
        return None
    ff = np.flatnonzero(data[pos:-1] == 0xFF) + pos
    following = data[ff + 1]
    is_marker = (following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))
    for at, marker in zip(ff[is_marker].tolist(), following[is_marker].tolist()):
        if at < pos:
            continue  # inside a segment already skipped (progressive JPEGs have several scans and tables)
        if marker == 0xD9:
            return JpegLayout(*frame, complete=True)
        if at + 4 > len(data):
            break
        pos = at + 2 + (int(data[at + 2]) << 8 | int(data[at + 3]))
    return JpegLayout(*frame, complete=False)


def open_image(path, max_pixels=MAX_IMAGE_PIXELS, contents=None):
    """The Pillow image of a file (header read, pixels not decoded), from `contents` when given; a
    UserError naming the file when it is not a regular file, empty, not an image Pillow reads, or over
    `max_pixels` (FileNotFoundError when it is missing)."""
    path = os.fspath(path)
    if contents is None:
        check_regular_file(path)
    if (len(contents) if contents is not None else os.path.getsize(path)) == 0:
        raise UserError(f"image file {path} is empty (0 bytes): copy it again or remove it")
    try:
        image = Image.open(io.BytesIO(contents) if contents is not None else path)
    except UnidentifiedImageError:
        raise UserError(f"image file {path} {_unreadable_reason(path, contents)}") from None
    except (OSError, SyntaxError, ValueError) as err:  # recognised, but its header is cut or damaged
        raise UserError(f"image file {path} is truncated or corrupt ({err}): copy it again or remove it") from None
    try:
        check_pixel_limit(path, *image.size, max_pixels)
    except UserError:
        image.close()
        raise
    return image


def check_regular_file(path):
    """FileNotFoundError when `path` is missing; a UserError naming it when it is not a regular file, so
    that nothing else is ever opened (a named pipe would block forever) or is a link that leads nowhere."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"image file {path} is a broken symbolic link (its target {os.path.realpath(path)} "
                            f"does not exist): fix or remove the link") from None
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except OSError as err:  # a symbolic link loop, a folder on the way that cannot be searched
        raise UserError(f"image file {path} cannot be opened ({err.strerror}): fix or remove it") from None
    if not stat.S_ISREG(mode):
        kind = NOT_REGULAR_FILES.get(stat.S_IFMT(mode), "a special file")
        raise UserError(f"image file {path} is {kind}, not a regular file: remove it or name an image file")


class ImageTooLarge(UserError):
    """An image over the pixel limit; `width` and `height` say its size."""

    def __init__(self, message, width, height):
        super().__init__(message)
        self.width, self.height = width, height


def check_pixel_limit(path, width, height, max_pixels):
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"image file {path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                        f"limit of {max_pixels / 1e6:g} (a guard against decompression bombs); if the photo is "
                        f"genuine, raise the limit with --max-image-pixels", width, height)


def _unreadable_reason(path, contents=None):
    if contents is None:
        with open(path, "rb") as f:
            contents = f.read(16)
    head = contents[:16]
    for offset, magic, name in UNREADABLE_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            return f"is a {name} file, which this toolkit does not read: convert it to JPEG or PNG"
    for magic, name in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG")):
        if head.startswith(magic):
            return f"is a {name} whose header is truncated or corrupt: copy it again or remove it"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ("is a TIFF that Pillow cannot read (e.g. floating-point colour, or a damaged header): "
                "convert it to 8- or 16-bit RGB, or remove it")
    return "is not an image this toolkit can read (its bytes match no known format): convert it to JPEG or PNG, or remove it"


def exif_orientation(image):
    """The EXIF orientation tag of a Pillow image, 1 (as stored) when absent or not one of the 8 values.

    Read without decoding pixels: Pillow's PNG reader decodes a whole PNG to look for an eXIf chunk
    after the pixel data, so here the chunk list is walked instead.
    """
    if image.format == "PNG" and "exif" not in image.info and image.fp is not None:
        body = png_chunk(image.fp, b"eXIf")
        if body is not None:
            image.info["exif"] = b"Exif\x00\x00" + body  # what Pillow's reader stores there after decoding
        exif = Image.Image.getexif(image)  # the base class's: reads `info`, never the pixels
    else:
        exif = image.getexif()
    value = exif.get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def png_chunk(f, kind):
    """The body of a PNG file's first `kind` chunk, None when absent or cut off: the chunks are walked by
    their lengths (pixel data skipped, not read), and `f` is left where it was."""
    start = f.tell()
    try:
        f.seek(8)  # the PNG signature
        while len(head := f.read(8)) == 8:
            length, name = struct.unpack(">I4s", head)
            if name == kind:
                body = f.read(length)
                return body if len(body) == length else None
            if name == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the body and its CRC
        return None
    finally:
        f.seek(start)


def to_rgb(image, path):
    """A decoded Pillow image in any mode -> H x W x 3 uint8 (`path` names it in messages).

    Transparency is laid over white, palettes and CMYK go through Pillow's conversion, greyscale is
    repeated in the three channels. Levels are scaled to 8 bits from their range, not clipped:
    16-bit (and 32-bit integer) levels from 0..65535, floating-point ones (e.g. a float TIFF) from
    0..1; levels outside that range are refused (a UserError), not guessed at.
    """
    if image.mode[:4] in LEVEL_RANGES:  # "I;16B" and the other byte orders of "I;16" included
        return np.repeat(scaled_levels(image, path)[..., None], 3, axis=2)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy, as the transforms and torch.from_numpy want


def scaled_levels(image, path):
    """A one-channel image of 16-bit, 32-bit integer or floating-point levels -> uint8, scaled from its range."""
    kind, top = LEVEL_RANGES[image.mode[:4]]
    levels = np.asarray(image, dtype=np.float32)
    low, high = levels.min(), levels.max()
    if not (low >= 0 and high <= top):  # also false for NaN
        raise UserError(f"image file {path} is a {kind} image with levels from {low:g} to {high:g}, outside "
                        f"0..{top:g}: save it as 8- or 16-bit (its levels scaled as they should be shown), or remove it")
    return np.round(levels * np.float32(255 / top)).astype(np.uint8)


def size_mismatch_message(path, shown_hw, expected_hw):
    """Why an image's size differs from its json entry, and what to do (EXIF rotation or not)."""
    with open_image(path, max_pixels=None) as image:
        stored_size, orientation = image.size, exif_orientation(image)
    shown = f"{shown_hw[1]}x{shown_hw[0]}"
    expected = f"{expected_hw[1]}x{expected_hw[0]}"
    if orientation in ROTATING_ORIENTATIONS and tuple(stored_size) == (expected_hw[1], expected_hw[0]):
        return (f"image file {path} is {shown} (WxH) as displayed, after its EXIF orientation {orientation} "
                f"(a quarter turn), but the json says {expected}, the size of the stored pixels before that "
                f"rotation: if the annotations were drawn on the unrotated pixels, strip the orientation tag "
                f"(e.g. exiftool -Orientation= FILE); if they were drawn on the photo as displayed, fix the json's "
                f"width and height")
    rotation = f"its EXIF orientation {orientation} does not explain it" if orientation != 1 else "it has no EXIF rotation"
    return (f"image file {path} is {shown} (WxH) but the json says {expected} ({rotation}): "
            f"fix the json's width and height, or use the file the json was made for")


def image_size(path, max_pixels=MAX_IMAGE_PIXELS):
    """(height, width) as displayed (EXIF orientation applied), from the header alone: no decoding."""
    with open_image(path, max_pixels) as image:
        width, height = image.size
        if exif_orientation(image) in ROTATING_ORIENTATIONS:
            width, height = height, width
    return height, width


class DecodedImageCache:
    """Decoded RGB pixels stored raw (.npy), so later epochs skip JPEG decoding.

    Costs H*W*3 bytes of disk per image (768 KB at 512x512); keyed by the image
    file's path, size and modification time, so a changed file is decoded again.
    """

    def __init__(self, cache_dir=DEFAULT_CACHE_DIR, max_pixels=MAX_IMAGE_PIXELS):
        self.folder = os.path.join(cache_dir, "decoded")
        self.max_pixels = max_pixels

    def read(self, path, expected_hw=None):
        try:
            info = os.stat(path)
        except OSError:
            return read_image(path, expected_hw)  # raises the error that names the problem
        key = f"{os.path.abspath(path)}|{info.st_size}|{info.st_mtime_ns}|{READER_VERSION}"
        cached = os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest()[:20] + ".npy")
        if os.path.isfile(cached):
            return np.load(cached)
        image = read_image(path, expected_hw, self.max_pixels)
        atomic_write_npy(cached, image)
        return image



def readable_images(found, max_pixels, paths):
    """(image records, reasons skipped) of the (path, file name) pairs whose headers read within the limit.

    Each skipped file is printed; none readable is an error naming `paths`, what the user gave.
    """
    images, skipped = [], []
    for path, file_name in found:
        try:
            image_size(path, max_pixels)
        except UserError as err:
            skipped.append(str(err))
            continue
        images.append({"id": None, "file_name": file_name, "path": path})
    for reason in skipped:
        print(f"skipped: {reason}")
    if not images:
        raise UserError(f"no readable {'/'.join(IMAGE_EXTENSIONS)} image in {' '.join(map(str, paths))}")
    return images, skipped


def find_images(paths, skip_dir=None):
    """(absolute path, file name) of the images that files, folders (recursively) and globs name, sorted.

    A file is taken whatever its extension (its bytes decide); in folders, files with an image
    extension. `skip_dir` (an output folder) is left out, so outputs never become inputs. Entries
    that are not regular files (named pipes, links that lead nowhere) are listed too: the reader
    refuses them without opening them, so they are skipped and counted like any unreadable file.
    """
    skip = os.path.realpath(skip_dir) if skip_dir else None
    found = {}
    for pattern in paths:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.lexists(m) for m in matches):
            raise UserError(f"{pattern} matches no file or folder")
        for match in matches:
            if not os.path.isdir(match):
                found.setdefault(os.path.abspath(match), os.path.basename(match))
                continue
            for folder, subfolders, files in os.walk(match):
                subfolders[:] = sorted(d for d in subfolders if os.path.realpath(os.path.join(folder, d)) != skip)
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        path = os.path.join(folder, name)
                        found.setdefault(os.path.abspath(path), os.path.relpath(path, match))
    return sorted(found.items(), key=lambda item: item[1])

