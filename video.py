"""Videos: frames from a file or a camera labelled by an ensemble, smoothed over time, written as an overlay
video and a CSV of class shares (inference.py --video).

A frame is resized once to the models' input size and predicted there, so the class probabilities held
are those of one small square whatever the video's resolution; an exponential moving average of them
(reset at a scene cut) steadies labels that would flicker from frame to frame, and they are resized to
the frame band by band before the argmax, as a photo's are.
"""
import argparse
import contextlib
import csv
import os
import tempfile
import time

import cv2
import numpy as np
import torch

import ensemble as ensembles
import utils

FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}  # codecs every OpenCV build with FFmpeg writes
FALLBACK_FPS = 30.0  # cameras (and a few files) report no frame rate
SCENE_CUT = 30.0  # mean absolute difference of grey thumbnails (0-255) above which frames are of two scenes
CUT_THUMBNAIL = (32, 32)  # small enough that noise and small motion average out
PROGRESS_SECONDS = 2.0


def smoothing_weight(text):
    """argparse type: the weight of the past in the moving average, 0 (off) <= alpha < 1."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: no smoothing), got {text}")
    return value


# ---------------------------------------------------------------- reading
def video_source(text):
    """--video's value -> a file path, or a camera index (digits that name no file)."""
    if os.path.exists(text):
        if os.path.isdir(text):
            raise utils.UserError(f"--video {text} is a folder: pass a video file, or a camera index (0: the first)")
        return text
    if text.isdigit():
        return int(text)
    raise utils.UserError(f"--video {text} does not exist: pass a video file, or a camera index (0: the first camera)")


class Video:
    """A video file or a camera opened with OpenCV and its first frame read: refused with a UserError when
    OpenCV cannot open it or it holds no frame, before any other work."""

    def __init__(self, text):
        source = video_source(text)
        # FFmpeg prints its own lines about a file it cannot parse; the UserError below says it once.
        # Read when FFmpeg is first used in the process; a value the user set is kept.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        with opencv_log_level(cv2.utils.logging.LOG_LEVEL_SILENT):
            self.capture = cv2.VideoCapture(source)
            opened = self.capture.isOpened()
            ok, self.first = self.capture.read() if opened else (False, None)
        if not ok:
            self.capture.release()
            raise utils.UserError(unreadable_message(source, opened))
        self.name, self.camera, self.frame_size = text, isinstance(source, int), self.first.shape[:2]
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else FALLBACK_FPS  # NaN fails both
        self.rate_known = self.fps == fps
        count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count = count if count > 0 and not self.camera else None  # from the header: an estimate

    def describe(self):
        """Its name, size, frame rate and (for a file) its frame count, for one line of output."""
        height, width = self.frame_size
        rate = f"{self.fps:g} frames/s" if self.rate_known else f"no frame rate given: {self.fps:g} frames/s assumed"
        return f"{self.name}: {width}x{height}, {rate}" + (f", {self.frame_count} frames" if self.frame_count else "")

    def frames(self):
        """Yield the BGR uint8 frames in order, the first one included, until the video (or camera) ends."""
        frame, self.first = self.first, None
        while frame is not None:
            yield frame
            ok, frame = self.capture.read()
            frame = frame if ok else None

    def close(self):
        self.capture.release()


def unreadable_message(source, opened):
    if isinstance(source, int):
        return (f"--video {source}: no camera {source} can be opened (none at that index, or another program holds "
                f"it): pass another index, or a video file")
    if not opened:
        return (f"--video {source} cannot be opened as a video by OpenCV (not a video, truncated, or in a codec its "
                f"FFmpeg lacks): check that it plays, or convert it, e.g. ffmpeg -i {source} video.mp4")
    return f"--video {source} holds no frame OpenCV can decode: check that it plays, or convert it with ffmpeg"


@contextlib.contextmanager
def opencv_log_level(level):
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(level)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


class SceneCuts:
    """Is each frame of another scene than the one before: the mean absolute difference of their grey
    thumbnails, in grey levels, above `threshold`."""

    def __init__(self, threshold=SCENE_CUT):
        self.threshold, self.previous = threshold, None

    def __call__(self, bgr):
        thumbnail = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), CUT_THUMBNAIL, interpolation=cv2.INTER_AREA)
        cut = self.previous is not None and cv2.absdiff(thumbnail, self.previous).mean() > self.threshold
        self.previous = thumbnail
        return bool(cut)


# ---------------------------------------------------------------- labelling
class ProbabilityEma:
    """p_t = alpha * p_(t-1) + (1 - alpha) * p_new over the predicted frames; alpha is the weight of the past
    (0: no smoothing). It starts again from p_new at the first frame and at a scene cut (`restart`)."""

    def __init__(self, alpha):
        self.alpha, self.state = alpha, None

    def __call__(self, probs, restart=False):
        if self.state is None or restart or self.alpha == 0:
            self.state = probs
        else:
            self.state = self.state.mul_(self.alpha).add_(probs, alpha=1 - self.alpha)
        return self.state


class FrameLabeller:
    """RGB uint8 frames -> H x W uint8 label maps at each frame's size, predicted by an ensemble and smoothed
    over time with ProbabilityEma(smooth).

    Each frame is resized once to size x size, the largest member's input size (every member resizes
    its input to its own size, as for any photo), so the probabilities predicted, smoothed and held
    are C x size x size whatever the video's resolution. They are resized to the frame band by band
    before the argmax, as Ensemble.summarise_images resizes a photo's: without smoothing, a frame's
    labels are those inference.py gives the frame saved as a photo (one member, or a soft vote of
    members of one size).
    """

    def __init__(self, ensemble, device="cpu", amp="off", smooth=0.0):
        self.ensemble, self.device, self.amp = ensemble, device, amp
        self.size = max(member.size for member in ensemble.members)
        self.ema = ProbabilityEma(smooth)

    @torch.inference_mode()
    def __call__(self, rgb, restart=False):
        frame = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device)
        square = ensembles.resize_image(frame, (self.size, self.size))  # rounded to uint8, as a photo's is
        with utils.autocast(self.device, self.amp):
            probs = self.ensemble(square)[0].float()
        return labels_at(self.ema(probs, restart), rgb.shape[:2])


def labels_at(probs, size):
    """C x h x w probabilities -> labels at `size` (H, W): resized bilinearly a band of rows at a time, so a
    frame's probabilities are never held at its full size."""
    height, width = size
    step = max(1, ensembles.BAND_PIXELS // width)
    bands = [ensembles.labels_of(ensembles.resize_rows(probs[None], size, top, min(top + step, height))[0])
             for top in range(0, height, step)]
    return torch.cat(bands).cpu().numpy()


# ---------------------------------------------------------------- writing
def check_video_output(path):
    """Refuse, before any work, a --save-vis video path OpenCV could not write: a folder, or another container."""
    if os.path.isdir(path):
        raise utils.UserError(f"--save-vis {path} is a folder: with --video, pass the overlay video's file, e.g. "
                              f"{os.path.join(path, 'overlay.mp4')}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FOURCC:
        raise utils.UserError(f"--save-vis {path}: the overlay video must end in {' or '.join(FOURCC)} (codec "
                              f"{', '.join(FOURCC.values())}), not {extension or 'no extension'}")


@contextlib.contextmanager
def atomic_video_writer(path, fps, size):
    """A cv2.VideoWriter of `size` (width, height) frames for `path`, as utils.atomic_open writes a file.

    OpenCV picks the container from the name, so the temporary file beside `path` keeps its extension
    (.<name>.XXXXXXXX.tmp.mp4); it replaces `path` when the block ends, or is removed on an exception.
    """
    folder, name = os.path.split(os.path.abspath(path))
    extension = os.path.splitext(name)[1].lower()
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp" + extension)
    os.close(fd)
    writer = cv2.VideoWriter(temporary, cv2.VideoWriter_fourcc(*FOURCC[extension]), fps, size)
    try:
        if not writer.isOpened():
            raise utils.UserError(f"--save-vis {path}: this OpenCV cannot write {FOURCC[extension]} video; "
                                  f"try another of {', '.join(FOURCC)}")
        yield writer
        writer.release()
        os.chmod(temporary, utils.NEW_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        writer.release()
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@contextlib.contextmanager
def overlay_video(path, fps, frame_size, class_names):
    """Yield write(rgb, labels): the frame with its labels' colours (utils.overlay) above the legend strip,
    encoded to `path` (atomic_video_writer)."""
    height, width = frame_size
    legend = utils.legend_strip(class_names, width)
    if (height + len(legend)) % 2:  # 4:2:0 encoders drop an odd last row: let it be a row of the legend's
        legend = np.pad(legend, ((0, 1), (0, 0), (0, 0)), mode="edge")
    with atomic_video_writer(path, fps, (width, height + len(legend))) as writer:
        def write(rgb, labels):
            panel = np.concatenate([utils.overlay(rgb, labels, len(class_names)), legend])
            writer.write(cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))

        yield write


@contextlib.contextmanager
def shares_csv(path, class_names, fps):
    """Yield write(frame index, labels): a CSV row of the frame, its time in seconds (index / fps) and the
    share of its pixels each class covers. Rows are written as frames come, to a temporary file that
    replaces `path` when the block ends (utils.atomic_open)."""
    with utils.atomic_open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["frame", "time_s", *class_names])

        def write(index, labels):
            shares = np.bincount(labels.ravel(), minlength=len(class_names)) / labels.size
            writer.writerow([index, f"{index / fps:.3f}", *(f"{share:.6f}" for share in shares)])

        yield write


class Progress:
    """Counts the frames done; prints the frames/s so far every PROGRESS_SECONDS, one line."""

    def __init__(self, total=None):
        self.total, self.frames = total, 0
        self.start = self.printed = time.monotonic()

    def update(self):
        self.frames += 1
        now = time.monotonic()
        if now - self.printed >= PROGRESS_SECONDS:
            self.printed = now
            of = f"/{self.total}" if self.total else ""
            print(f"frame {self.frames}{of}: {self.rate():.1f} frames/s", flush=True)

    def rate(self):
        return self.frames / max(time.monotonic() - self.start, 1e-9)


# ---------------------------------------------------------------- the loop
def label_video(video, labeller, class_names, every=1, overlay_path=None, shares_path=None, scene_cut=SCENE_CUT):
    """Label every `every`-th frame of `video` with `labeller` (a FrameLabeller); write the overlay video
    (every frame; frames between predictions show the last labels) and the shares CSV (a row per
    predicted frame). Ctrl-C stops at once, the frame in hand left out: the frames done so far are
    finished and renamed into place, valid files. Returns the Progress (frames done, rate)."""
    cuts, progress = SceneCuts(scene_cut), Progress(video.frame_count)
    with contextlib.ExitStack() as outputs:
        shares = outputs.enter_context(shares_csv(shares_path, class_names, video.fps)) if shares_path else None
        overlay = None
        if overlay_path:
            overlay = outputs.enter_context(overlay_video(overlay_path, video.fps, video.frame_size, class_names))
        labels, cut = None, False
        try:
            for index, bgr in enumerate(video.frames()):
                cut |= cuts(bgr)  # a cut between two predicted frames restarts the average too
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                if index % every == 0:
                    labels, cut = labeller(rgb, restart=cut), False
                    if shares:
                        shares(index, labels)
                if overlay:
                    overlay(rgb, labels)
                progress.update()
        except KeyboardInterrupt:
            if not progress.frames:
                raise  # nothing to keep: the outputs' temporary files are removed on the way out
            print(f"stopped by Ctrl-C after {progress.frames} frames; finishing what was written")
    return progress
