"""Prediction with one model file or an ensemble: the machinery inference.py, pseudo_label.py,
export.py and serve.py share.

A model file is a checkpoint (Member) or an ONNX file written by export.py (OnnxMember, run by
onnxruntime); an Ensemble combines its members' class probabilities (soft or hard vote), with
test-time augmentation (ttach) and, for photos larger than the training size, slide inference.
`predict` runs an ensemble over a loader of uint8 images of any sizes. `prepare_for_inference`
folds BatchNorms into convs for a model that will only predict.
"""
import argparse
import collections
import glob
import json
import math
import os

import albumentations as A
import timm
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import ttach as tta
from albumentations.pytorch import ToTensorV2
from torch.nn.utils.fusion import fuse_conv_bn_weights
from tqdm import tqdm

import coco_utils
import dataset as data
import images as imaging
import loss as losses
import model as models
import utils


# ---------------------------------------------------------------- command-line flags
DEFAULT_CHECKPOINTS = f"runs/*/{utils.BEST_CHECKPOINT}"  # every run's best checkpoint


def add_ensemble_args(p):
    """Flags shared by the scripts that predict with an ensemble (inference.py and pseudo_label.py)."""
    p.add_argument("--checkpoints", nargs="+", default=[DEFAULT_CHECKPOINTS],
                   help=f"checkpoint files, run folders (their {utils.BEST_CHECKPOINT}), ONNX files from export.py "
                        "or globs; probabilities are averaged")
    p.add_argument("--data-root", default=None,
                   help="dataset folder of --json (default: the one the checkpoints were trained on, else the demo set)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: horizontal flip")
    p.add_argument("--tta-vflip", action="store_true", help="with --tta, also vertical flip")
    p.add_argument("--tta-scales", type=utils.positive_float, nargs="+", default=[1.0], help="with --tta, also these scales")
    p.add_argument("--batch-size", type=utils.positive_int, default=4,
                   help="images per batch (images of different sizes are batched too); with --tile, windows per batch")
    p.add_argument("--tile", type=tile_size, nargs="?", const=NATIVE_TILE, default=None, metavar="SIZE",
                   help="predict each image window by window (device memory stays bounded by the window): alone, "
                        "windows as large as the photos the model was trained on, which it then sees at the scale "
                        "it learned (for photos of a wider scene than those); --tile SIZE: SIZE x SIZE photo pixels")
    p.add_argument("--tile-overlap", type=overlap_fraction, default=1 / 3,
                   help="with --tile, the share of a window its neighbour overlaps (0 <= f < 1)")
    p.add_argument("--max-image-pixels", type=utils.positive_int, default=imaging.MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels than this (a guard against decompression bombs)")
    p.add_argument("--workers", type=utils.non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="data loader worker processes")
    utils.add_device_args(p)


NATIVE_TILE = "native"  # --tile alone: windows of the training photos' size (native_window)


def tile_size(text):
    """argparse type of --tile: a positive integer, or NATIVE_TILE (what --tile alone gives)."""
    return NATIVE_TILE if text == NATIVE_TILE else utils.positive_int(text)


def overlap_fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


# ---------------------------------------------------------------- models
BAND_PIXELS = 2 ** 20  # pixels of an image resized, voted and summarised at once: 44 MB of 11 class probabilities


def resize_rows(x, size, start=0, end=None):
    """Rows start..end of x (N x C x h x w) resized bilinearly to `size`, as F.interpolate(align_corners=False).

    Only the source rows those rows read are taken (and made [0, 1] floats, as unit_range), so
    neither a uint8 photo nor a band of it is ever held as floats at its full size.
    """
    end = size[0] if end is None else end
    upper, lower, weight = source_rows(x.shape[-2], size[0], start, end, x.device)
    rows = torch.lerp(unit_range(x[..., upper, :]), unit_range(x[..., lower, :]), weight[:, None])
    # the height is kept, so this resizes the width alone
    return F.interpolate(rows, size=(end - start, size[1]), mode="bilinear", align_corners=False)


def source_rows(in_height, out_height, start, end, device):
    """The two source rows of output rows start..end of a bilinear resize from in_height to out_height, and
    the weight of the lower one: PyTorch's align_corners=False arithmetic, in float32 as its kernel."""
    scale = torch.tensor(in_height, dtype=torch.float32) / out_height
    position = (scale * (torch.arange(start, end, device=device, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0)
    upper = position.long().clamp_(max=in_height - 1)
    lower = (upper + 1).clamp_(max=in_height - 1)
    return upper, lower, (position - upper).clamp_(0, 1)


class Member(torch.nn.Module):
    """One checkpoint: uint8 or [0, 1] float images at any size -> class probabilities at each image's size.

    `images`: an N x 3 x H x W batch, or a list of 3 x H x W images of different sizes; the
    output takes the same form. Every image is resized to the checkpoint's training size, so a
    list is still predicted as one batch, and each prediction is resized back to its own image.
    A uint8 image stays uint8 when resized (resize_image), so a checkpoint sees the very pixels an
    ONNX export of it does. Test-time augmentation (scales included) applies at the training size,
    to those pixels.
    """

    class_weights = None  # the weights it learnt with, to divide its probabilities by (set by build_ensemble)

    def __init__(self, checkpoint, tta_transforms=None):
        super().__init__()
        net = models.create_model(checkpoint["model"], checkpoint["encoder"], checkpoint["num_classes"],
                                  **checkpoint["model_kwargs"])
        net.load_state_dict(checkpoint["state_dict"])
        self.size = checkpoint["image_size"]
        self.native_window = native_window(checkpoint.get("train_image_size"), checkpoint["image_size"], self.size)
        self.paint_order = checkpoint.get("args", {}).get("paint_order", "area")  # of the masks it learned from
        self.data_root = checkpoint.get("args", {}).get("data_root")  # of the images it learned from
        probs = NormalisedSoftmax(prepare_for_inference(net), checkpoint["mean"], checkpoint["std"])
        self.probs = with_tta(probs, tta_transforms)

    def forward(self, images):
        probs = self.square_probs(images)
        if torch.is_tensor(images):
            return resize_rows(probs, images.shape[-2:])
        return [resize_rows(prob[None], image.shape[-2:])[0] for prob, image in zip(probs, images)]

    def square_probs(self, images):
        """The probabilities at the training size: N x C x size x size, for a batch or a list of images."""
        square = (self.size, self.size)
        if torch.is_tensor(images):
            batch = resize_image(images, square)
        else:
            batch = torch.cat([resize_image(image[None], square) for image in images])
        probs = self.probs(unit_range(batch))
        return probs if self.class_weights is None else losses.undo_class_weights(probs, self.class_weights)


def resize_image(images, size):
    """Images (N x C x h x w) resized bilinearly to `size`; uint8 ones are rounded back to uint8.

    An ONNX model takes uint8 pixels, so a photo is rounded once, here, before any model: a
    checkpoint then normalises the same pixels its ONNX export does, and both label alike.
    """
    resized = resize_rows(images, size)
    return to_uint8(resized) if images.dtype == torch.uint8 else resized


def unit_range(images):
    """uint8 images (as the prediction datasets give them) -> [0, 1] floats; float images pass as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def to_uint8(images):
    """[0, 1] float images -> uint8 ones, each value rounded to the nearest of the 256 levels."""
    return (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def window_spans(length, tile, overlap):
    """(start, end) of the windows that cover one side, as MMSegmentation's slide inference places them.

    Stride tile - round(tile * overlap); the last window ends at the border; a side shorter than
    the tile is one window as long as the side. The windows of an image are every pair of a row
    span and a column span.
    """
    stride = max(1, tile - round(tile * overlap))
    count = max(length - tile + stride - 1, 0) // stride + 1
    starts = sorted({max(min(i * stride, length - tile), 0) for i in range(count)})
    return [(start, min(start + tile, length)) for start in starts]


def coverage(spans, length):
    """How many of the spans hold each position of a side of `length`."""
    count = torch.zeros(length)
    for start, end in spans:
        count[start:end] += 1
    return count


class BandSums:
    """Summed window probabilities of a band of an image's rows, [top, top + height), full width, on the CPU."""

    def __init__(self, height, width):
        self.top, self.height, self.width, self.sums = 0, height, width, None

    def add(self, probs, y0, x0):
        """C x h x w window probabilities whose top left pixel is (y0, x0) of the image."""
        if self.sums is None:
            self.sums = probs.new_zeros(probs.shape[0], self.height, self.width)
        self.sums[:, y0 - self.top:y0 - self.top + probs.shape[1], x0:x0 + probs.shape[2]] += probs

    def rows_until(self, end):
        """The sums of the rows top..end: a view, valid until drop_rows_until(end)."""
        return self.sums[:, :end - self.top]

    def drop_rows_until(self, end):
        """Forget the rows top..end: the band then begins at `end`, shifted in place (no second band)."""
        shift, kept = end - self.top, self.height - (end - self.top)
        for start in range(0, kept, shift):  # chunks no longer than the shift never overlap their source
            stop = min(start + shift, kept)
            self.sums[:, start:stop] = self.sums[:, start + shift:stop + shift]
        self.sums[:, kept:] = 0
        self.top = end

    def holds(self, tensor):
        return self.sums is not None and tensor.untyped_storage().data_ptr() == self.sums.untyped_storage().data_ptr()


Tiling = collections.namedtuple("Tiling", "size overlap batch_size device")


def build_tiling(args):
    """The window settings --tile asks for; None without --tile (images are resized whole).

    The size of --tile alone (NATIVE_TILE) is known once the members are: build_ensemble sets it (native_tiling).
    """
    return Tiling(args.tile, args.tile_overlap, args.batch_size, args.device) if args.tile else None


def native_window(train_image_size, image_size, input_size):
    """The side, in photo pixels, of a window that a model resizing it to `input_size` sees at the scale it
    learned: photos of train_image_size ([height, width]) resized to image_size x image_size. None when the
    model does not record its training photos' size (checkpoints from before it was recorded).

    A square resize of h x w photos scales the two sides by image_size / h and image_size / w, a square
    window by one factor: the window's side is their geometric mean, sqrt(h * w). Objects then cover as
    many model pixels as they did in training, each side off by the same factor sqrt(h / w), one narrower
    and one wider (max(h, w) would match the long side and shrink objects along the short one by h / w).
    An ONNX export at another input size than the training size takes a window as much larger.
    """
    if train_image_size is None:
        return None
    height, width = train_image_size
    return round(math.sqrt(height * width) * input_size / image_size)


def native_tiling(tiling, paths, members):
    """`tiling` with --tile alone (NATIVE_TILE) made the first member's native_window, said in one line.

    A first member without the record falls back to its training size, with a note. Members that would
    window differently (trained on photos of other sizes) are warned of once: there is one window per
    photo, so the first member's is used (--tile SIZE picks another).
    """
    if tiling is None or tiling.size != NATIVE_TILE:
        return tiling
    first = members[0]
    windows = {path: member.native_window for path, member in zip(paths, members)}
    if len(set(windows.values())) > 1:
        listed = ", ".join(f"{path}: {window or 'not recorded'}" for path, window in windows.items())
        print(f"warning: --tile: the models were trained on photos of different sizes, so they would window a "
              f"photo differently ({listed}); using {paths[0]}'s (pass --tile SIZE to choose)")
    if first.native_window is None:
        print(f"note: --tile: {paths[0]} does not record the size of its training photos (trained before it was "
              f"recorded), so windows are {first.size} photo pixels, its training size; pass --tile SIZE with the "
              f"size of the photos it was trained on")
        return tiling._replace(size=first.size)
    print(f"--tile: windows of {first.native_window} x {first.native_window} photo pixels, the size of the photos "
          f"{paths[0]} was trained on (--tile SIZE sets another)")
    return tiling._replace(size=first.native_window)


def with_tta(probs, tta_transforms):
    if tta_transforms is None:
        return probs
    return tta.SegmentationTTAWrapper(probs, tta_transforms, merge_mode="mean")


class NormalisedSoftmax(torch.nn.Module):
    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std).float().softmax(1)


class OnnxMember(Member):
    """An ONNX file from export.py run by onnxruntime, with Member's interface.

    Images are resized to the export size as for a checkpoint (a uint8 photo's pixels rounded
    there, resize_image) and given to the model as uint8, its input type.
    """

    def __init__(self, description, tta_transforms=None):
        torch.nn.Module.__init__(self)
        path = description["path"]
        if description["output"] != "probabilities":
            raise utils.UserError(f"{path} outputs {description['output']}, not probabilities: export it "
                                  f"again without --labels to predict with it here")
        if tta_transforms is not None and any(isinstance(t, tta.Scale) for t in tta_transforms.aug_transforms):
            raise utils.UserError(f"{path} takes {description['input_size']} inputs only, so --tta-scales "
                                  f"cannot run on it: use --tta without scales, or the checkpoint")
        height, width = description["input_size"]
        if height != width:
            raise utils.UserError(f"{path} takes {height}x{width} inputs; export.py writes square ones: export again")
        self.size = height
        self.native_window = native_window(description.get("train_image_size"), description.get("image_size"), height)
        self.paint_order = description["paint_order"]
        self.data_root = description.get("data_root")
        self.probs = with_tta(OnnxProbabilities(description["session"]), tta_transforms)


class OnnxProbabilities(torch.nn.Module):
    """[0, 1] float images at the export size -> the ONNX model's probabilities, on the images' device.

    The images are rounded to uint8: exactly the pixels they came from when they were uint8 ones.
    """

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x):
        images = to_uint8(x).cpu().numpy()
        probs = self.session.run(None, {self.input_name: images})[0]
        return torch.from_numpy(probs).to(x.device)


def onnx_metadata(description):
    """A model description as ONNX metadata: one entry per field, its value as JSON."""
    return {key: json.dumps(value) for key, value in description.items()}


def open_onnx(path, device="cpu"):
    """An onnxruntime session for an export.py file and its description (+ "path" and "session")."""
    import onnxruntime as ort  # only ONNX files need it

    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(path, providers=providers)
    except Exception as err:  # onnxruntime raises its own types for truncated or foreign files
        raise utils.UserError(f"{path} cannot be loaded by onnxruntime (truncated or not an ONNX model): "
                              f"{err}") from None
    metadata = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("class_names", "input_size", "output") if key not in metadata]
    if missing:
        raise utils.UserError(f"{path} lacks the metadata {missing}: it was not written by export.py; export "
                              f"the checkpoint with export.py")
    description = {key: json.loads(value) for key, value in metadata.items()}
    return {**description, "path": path, "session": session}


def load_model_file(path, device="cpu"):
    """A checkpoint, or the description of an ONNX file (Member or OnnxMember takes either)."""
    if path.lower().endswith(".onnx"):
        return open_onnx(path, device)
    return utils.load_checkpoint(path, required_keys=utils.MODEL_KEYS)


def expand_checkpoints(patterns):
    """Files, run folders (-> their best.pt) and globs -> sorted checkpoint paths."""
    paths = []
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)) or [pattern]:
            paths.append(os.path.join(match, utils.BEST_CHECKPOINT) if os.path.isdir(match) else match)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise utils.UserError(f"no checkpoint at {', '.join(missing)}: train first (python train.py --output "
                              f"runs/NAME), or pass --checkpoints with checkpoint files, run folders or globs")
    return paths


def run_data_root(given, trained_on):
    """The data root a script reads its json from: --data-root when given; else the one the checkpoints
    were trained on (`trained_on`, one per member; None where unknown); else the demo set.

    So a run trained on the user's own data never sends a script to the demo set.
    """
    if given is not None:
        return given
    roots = sorted({root for root in trained_on if root})
    if not roots:
        return data.DEFAULT_DATA_ROOT
    if len(roots) > 1:
        raise utils.UserError(f"the checkpoints were trained on different data roots ({', '.join(roots)}): "
                              f"pass --data-root with the one whose json to read")
    if not os.path.isdir(roots[0]):
        raise utils.UserError(f"the checkpoints were trained on the data root {roots[0]}, which does not exist here: "
                              f"pass --data-root with the folder that holds the jsons and images")
    if roots[0] != data.DEFAULT_DATA_ROOT:
        print(f"data root {roots[0]}, the checkpoints' own (--data-root overrides it)")
    return roots[0]


def load_ensemble(patterns, device, tta_transforms=None, vote="soft", tiling=None, undo_class_weights=False):
    """(model combining all members' probabilities by `vote`, class names)."""
    paths = expand_checkpoints(patterns)
    checkpoints = [load_model_file(p, device) for p in paths]
    return build_ensemble(paths, checkpoints, device, tta_transforms, vote, tiling, undo_class_weights)


def build_ensemble(paths, checkpoints, device, tta_transforms=None, vote="soft", tiling=None,
                   undo_class_weights=False):
    """Loaded checkpoints or ONNX descriptions (all predicting the same classes) -> (ensemble, class names).

    undo_class_weights: each member's probabilities without the class weights it learnt with
    (loss.undo_class_weights), for thresholds on confidence; predictions keep them by default.
    """
    class_names = checkpoints[0]["class_names"]
    for path, checkpoint in zip(paths, checkpoints):
        coco_utils.check_same_classes(path, checkpoint["class_names"], paths[0], class_names)
    members = [OnnxMember(c, tta_transforms) if "session" in c else Member(c, tta_transforms) for c in checkpoints]
    if undo_class_weights:
        for path, checkpoint, member in zip(paths, checkpoints, members):
            member.class_weights = recorded_class_weights(path, checkpoint)
    ensemble = Ensemble(members, vote, native_tiling(tiling, paths, members)).to(device).eval()
    print(f"ensemble of {len(paths)} checkpoint(s): {', '.join(paths)}")
    return ensemble, class_names


def recorded_class_weights(path, checkpoint):
    """A checkpoint's or ONNX file's class weights as a tensor; None (with a warning when it learnt with
    weights it does not record) otherwise."""
    weights = checkpoint.get("class_weights")
    if weights is None and checkpoint.get("args", {}).get("class_weights") not in (None, "none"):
        print(f"warning: {path} learnt with class weights but does not record them (it predates that): its "
              f"probabilities understate the common classes, so fewer of their pixels reach a threshold; "
              f"train it again to have them taken out")
    return None if weights is None else torch.tensor(weights)


VOTES = ("soft", "hard")


class Ensemble(torch.nn.Module):
    """Members' class probabilities combined per pixel: averaged (soft vote) or by majority (hard vote).

    The hard vote returns (votes + mean probability) / (members + 1): still a distribution over
    the classes, whose argmax is the majority class, ties going to the highest mean probability
    (vote counts differ by whole numbers, mean probabilities by less than 1).

    Images come in the form Member takes (a batch tensor or a list of images of different sizes)
    and probabilities go out in the same form, each at its image's size. `summarise_images` keeps
    only per-pixel maps of them, made band by band; `slide` predicts one image window by window,
    with the `tiling` settings.
    """

    def __init__(self, members, vote="soft", tiling=None):
        super().__init__()
        if vote not in VOTES:
            raise ValueError(f"unknown vote {vote!r}; use one of {', '.join(VOTES)}")
        self.members = torch.nn.ModuleList(members)
        self.vote = vote
        self.tiling = tiling

    def forward(self, images):
        outputs = [m(images) for m in self.members]
        if torch.is_tensor(outputs[0]):
            return self.combine(outputs)
        return [self.combine(per_member) for per_member in zip(*outputs)]

    def summarise_images(self, images, summarise):
        """Images in the form Member takes -> [summarise(each image's C x H x W probabilities)], band by band.

        Each member's probabilities stay at its training size (TTA merged there); bands of about
        BAND_PIXELS pixels of an image's rows are resized from them, voted and summarised one at a time,
        so no float map of a photo's size is built (11 probabilities of a 7000 x 7000 photo: 2.2 GB).
        Each band's rows are those forward() gives, so the maps are summarise(forward(images)) row for row.
        """
        squares = [member.square_probs(images) for member in self.members]
        maps = []
        for index, image in enumerate(images):
            (height, width), pieces = image.shape[-2:], []
            step = max(1, BAND_PIXELS // width)
            for top in range(0, height, step):
                rows = (top, min(top + step, height))
                band = [resize_rows(square[index:index + 1], (height, width), *rows)[0] for square in squares]
                pieces.append(summarise(self.combine(band).float()))
            maps.append(join_rows(pieces))
        return maps

    def slide(self, image, summarise):
        """One 3 x H x W image (on any device) -> summarise(its C x H x W probabilities), window by window.

        MMSegmentation's slide inference: tiling.size x tiling.size windows of photo pixels cover the
        image, the last one of each row and column aligned to the border; each window is predicted
        as forward() predicts an image, and each member's overlapping probabilities are averaged
        before the vote. Rows of windows go top to bottom, and the rows no later window reaches
        are voted and summarised at once, so the probabilities held are a band of rows as high as
        a window (per member, on the CPU), never the photo's; at most tiling.batch_size windows are
        on tiling.device at once. `summarise` maps C x h x W probabilities to per-pixel maps (an
        h x W tensor or a tuple of them); its bands are joined row-wise.
        """
        tiling, (height, width) = self.tiling, image.shape[-2:]
        rows = window_spans(height, tiling.size, tiling.overlap)
        columns = window_spans(width, tiling.size, tiling.overlap)
        row_count, column_count = coverage(rows, height), coverage(columns, width)
        bands = [BandSums(rows[0][1] - rows[0][0], width) for _ in self.members]
        pieces = []

        def owned(map_):  # a map may be a view of a band (one class's probabilities, say), which later rows reuse
            return map_.clone() if any(band.holds(map_) for band in bands) else map_

        def summarise_rows(end):
            count = row_count[bands[0].top:end, None] * column_count
            maps = summarise(self.combine([band.rows_until(end).div_(count) for band in bands]))
            pieces.append(owned(maps) if torch.is_tensor(maps) else tuple(owned(m) for m in maps))
            for band in bands:
                band.drop_rows_until(end)

        for y0, y1 in rows:
            if y0 > bands[0].top:
                summarise_rows(y0)
            for start in range(0, len(columns), tiling.batch_size):
                chunk = columns[start:start + tiling.batch_size]
                windows = torch.stack([image[:, y0:y1, x0:x1] for x0, x1 in chunk]).to(tiling.device)
                for member, band in zip(self.members, bands):
                    for (x0, _), probs in zip(chunk, member(windows).float().cpu()):
                        band.add(probs, y0, x0)
        summarise_rows(height)
        return join_rows(pieces)

    def combine(self, member_probs):
        """The members' probabilities of one batch (N x C x H x W each) or one image (C x H x W) -> the vote's."""
        if self.vote == "soft" and len(member_probs) == 1:
            return member_probs[0]  # no stacked copy
        probs = torch.stack(member_probs)
        mean = probs.mean(0)
        if self.vote == "soft":
            return mean
        votes = F.one_hot(probs.argmax(-3), probs.shape[-3]).sum(0).movedim(-1, -3)
        return (votes + mean) / (len(self.members) + 1)


def join_rows(pieces):
    """summarise's maps of consecutive bands of rows (tensors, or tuples of them) -> the image's maps."""
    if len(pieces) == 1:
        return pieces[0]
    if torch.is_tensor(pieces[0]):
        return torch.cat(pieces, -2)
    return tuple(torch.cat(maps, -2) for maps in zip(*pieces))


def build_tta(args):
    """The test-time augmentations the --tta flags ask for; None without --tta."""
    if not args.tta:
        return None
    steps = [tta.HorizontalFlip()]
    if args.tta_vflip:
        steps.append(tta.VerticalFlip())
    if list(args.tta_scales) != [1.0]:
        steps.append(tta.Scale(scales=list(args.tta_scales), interpolation="bilinear", align_corners=False))
    return tta.Compose(steps)


# ---------------------------------------------------------------- prediction
def image_tensor_transform():
    """Images as uint8 C x H x W tensors at their own size (a quarter of floats' memory); each member
    converts, resizes and normalises them."""
    return A.Compose([ToTensorV2()])


def labels_of(probs):
    """C x H x W class probabilities -> H x W uint8 labels (the most probable class)."""
    return probs.argmax(0).byte()


@torch.inference_mode()
def predict(ensemble, loader, device, amp="off", summarise=labels_of):
    """Yield (dataset index, summarise(float class probabilities C x H x W)) in loader order.

    The loader batches uint8 images with dataset.collate_mixed: a batch tensor, or a list of images
    of different sizes. Each image's probabilities are at its own size and `summarise` maps them
    to per-pixel maps (labels by default): only those are kept, and the probabilities held are a
    band of rows (Ensemble.summarise_images), or with tiling a window's (Ensemble.slide). The maps
    are on the device (on the CPU with tiling). An image a dataset could not read
    (ImageFolderDataset gives its UserError instead) is yielded as that UserError.
    """
    index = 0
    for images, _ in tqdm(loader, desc="predict", dynamic_ncols=True):
        errors = {}
        if not torch.is_tensor(images):
            errors = {i: image for i, image in enumerate(images) if isinstance(image, utils.UserError)}
            images = [image for image in images if not isinstance(image, utils.UserError)]
        batch_size = len(images) + len(errors)
        with utils.autocast(device, amp):
            if ensemble.tiling is not None:  # the windows go to the device a few at a time
                results = iter([ensemble.slide(image, summarise) for image in images])
            else:
                results = iter(ensemble.summarise_images(to_device(images, device), summarise) if len(images) else [])
        for position in range(batch_size):
            yield index, errors[position] if position in errors else next(results)
            index += 1


class DatasetPredictions:
    """Iterate (index, image info, summarise(probabilities)) over a dataset's images in order, as `predict` makes them.

    Images that cannot be read are reported and left out; `skipped` counts them, with the files
    the dataset refused up front (ImageFolderDataset's `skipped`). The flags say the batch size,
    workers, device and --amp.
    """

    def __init__(self, ensemble, dataset, args, summarise=labels_of):
        self.ensemble, self.dataset, self.args, self.summarise = ensemble, dataset, args, summarise
        self.skipped = len(getattr(dataset, "skipped", []))

    def __iter__(self):
        # sequential order: predict() maps batch positions back to dataset.images
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.args.batch_size,
                                             num_workers=self.args.workers, collate_fn=data.collate_mixed)
        for index, result in predict(self.ensemble, loader, self.args.device, self.args.amp, self.summarise):
            if isinstance(result, utils.UserError):
                print(f"skipped: {result}")
                self.skipped += 1
                continue
            yield index, self.dataset.images[index], result


def to_device(images, device):
    """A batch tensor or a list of image tensors, moved to the device."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


# ---------------------------------------------------------------- conv-BN fusion
class _ConvBnTracer(torch.fx.Tracer):
    """Keeps convs, BatchNorms (including subclasses with a fused activation) and the layers timm
    marks as untraceable (dynamic "same" padding, ...) as graph leaves."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(timm.layers.get_notrace_functions()))

    def is_leaf_module(self, module, qualified_name):
        return (
            isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
            or timm.layers.is_notrace_module(type(module))
            or super().is_leaf_module(module, qualified_name)
        )


def fuse_conv_bn(module):
    """Fold eval-mode BatchNorms into the conv that feeds them; returns how many were folded.

    The pairs come from an FX trace, so a conv is only fused when the BatchNorm is the sole
    consumer of its output. A module that cannot be traced (shape-dependent Python, list
    inputs) is handled child by child.
    """
    try:
        graph = _ConvBnTracer().trace(module)
    except Exception:  # any tracing failure: fall back to the children
        return sum(fuse_conv_bn(child) for child in module.children())
    modules = dict(module.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in graph.nodes:
        source = node.args[0] if node.args else None
        if node.op != "call_module" or not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        bn, conv = modules[node.target], modules[source.target]
        if not (isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and bn.running_mean is not None):
            continue
        if len(source.users) != 1 or calls[node.target] != 1 or calls[source.target] != 1:
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        # BatchNorm subclasses with a built-in activation (timm's BatchNormAct2d) keep it
        after = nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity()
        parent, _, name = node.target.rpartition(".")
        setattr(module.get_submodule(parent), name, after)
        fused += 1
    return fused


@torch.no_grad()
def prepare_for_inference(model):
    """Eval mode, BatchNorm folded into convs, channels_last weights. Same outputs, faster on CPU.

    Fused models cannot be trained any more: use this only on a copy meant for inference.
    """
    model.eval()
    fuse_conv_bn(model)
    return model.to(memory_format=torch.channels_last)
