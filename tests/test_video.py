"""inference.py --video (video.py): every frame labelled into an overlay video, a CSV row of class shares per
predicted frame, probabilities smoothed over time and restarted at scene cuts, Ctrl-C leaving valid files,
unreadable videos refused in one line before any work."""
import csv
import os
import runpy
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
import torch

import ensemble as ensembles
import inference
import utils
import video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS, WIDTH, HEIGHT, FRAMES = 10, 64, 48, 12
LABEL = 3  # what the constant checkpoint predicts everywhere
CPU = ["--workers", "0", "--device", "cpu"]


def write_clip(path, frames=FRAMES, size=(WIDTH, HEIGHT)):
    """Two rectangles moving over a grey ramp, `frames` frames at FPS, mp4v in .mp4."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, size)
    assert writer.isOpened()
    ramp = np.tile(np.linspace(40, 200, width, dtype=np.uint8), (height, 1))
    for t in range(frames):
        frame = cv2.cvtColor(ramp, cv2.COLOR_GRAY2BGR)
        x = 2 * t % (width - 16)
        cv2.rectangle(frame, (x, 8), (x + 15, 23), (0, 0, 255), -1)
        cv2.rectangle(frame, (width - 1 - x - 11, 30), (width - 1 - x, 41), (255, 128, 0), -1)
        writer.write(frame)
    writer.release()
    return path


def read_frames(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")
    assert len(read_frames(path)) == FRAMES  # this OpenCV writes and reads mp4v
    return path


@pytest.fixture(scope="module")
def constant(constant_checkpoint, tmp_path_factory):
    return constant_checkpoint(tmp_path_factory.mktemp("constant") / "constant.pt", LABEL)


def class_names(checkpoint):
    return utils.load_checkpoint(checkpoint)["class_names"]


# ---------------------------------------------------------------- the outputs
@pytest.mark.slow
def test_the_overlay_has_every_frame_and_the_csv_a_row_per_predicted_frame(clip, constant, tmp_path,
                                                                          run_inference, capsys):
    out = tmp_path / "out"
    run_inference("--checkpoints", constant, "--video", clip, "--save-vis", out / "overlay.mp4",
                  "--save-shares", out / "shares.csv")
    assert sorted(os.listdir(out)) == ["overlay.mp4", "shares.csv"]  # no temporary file left
    printed = capsys.readouterr().out
    assert f"--video {clip}: {WIDTH}x{HEIGHT}, {FPS} frames/s, {FRAMES} frames" in printed
    assert f"labelled {FRAMES} frames ({FRAMES} predicted)" in printed

    overlay, frames = read_frames(out / "overlay.mp4"), read_frames(clip)
    assert len(overlay) == FRAMES
    names = class_names(constant)
    legend = utils.legend_strip(names, WIDTH)
    assert overlay[0].shape == (HEIGHT + len(legend) + (HEIGHT + len(legend)) % 2, WIDTH, 3)
    colour = utils.class_palette(len(names))[LABEL][::-1].astype(np.float32)  # BGR
    for shown, frame in zip(overlay, frames):  # every pixel is the frame blended half and half with LABEL's colour
        expected = frame.astype(np.float32) * 0.5 + colour * 0.5
        assert np.abs(shown[:HEIGHT].astype(np.float32) - expected).mean() < 4  # mp4v is lossy
        assert np.abs(shown[HEIGHT:HEIGHT + len(legend)].astype(np.float32) - legend[..., ::-1]).mean() < 8

    rows = read_csv(out / "shares.csv")
    assert rows[0] == ["frame", "time_s", *names]
    assert [row[:2] for row in rows[1:]] == [[str(i), f"{i / FPS:.3f}"] for i in range(FRAMES)]
    for row in rows[1:]:
        shares = [float(v) for v in row[2:]]
        assert shares == [1.0 if label == LABEL else 0.0 for label in range(len(names))]


@pytest.mark.slow
def test_every_n_predicts_every_n_th_frame(clip, constant, tmp_path, run_inference, capsys):
    run_inference("--checkpoints", constant, "--video", clip, "--every", 3, "--save-vis", tmp_path / "o.avi",
                  "--save-shares", tmp_path / "s.csv")
    assert len(read_frames(tmp_path / "o.avi")) == FRAMES  # MJPG in .avi too; frames in between are shown
    rows = read_csv(tmp_path / "s.csv")[1:]
    assert [int(row[0]) for row in rows] == list(range(0, FRAMES, 3))  # 4 of 12
    assert f"labelled {FRAMES} frames (4 predicted)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_frame_is_labelled_as_inference_labels_it_as_a_photo(tiny_run):
    """Without smoothing, the probabilities predicted at the model's size and resized to the frame give the
    labels Ensemble.summarise_images gives the frame as a photo."""
    ensemble, _ = ensembles.load_ensemble([str(tiny_run)], "cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    labels = video.FrameLabeller(ensemble)(rgb)
    with torch.inference_mode():
        photo = ensemble.summarise_images(torch.from_numpy(rgb).permute(2, 0, 1)[None], ensembles.labels_of)[0]
    assert labels.shape == (HEIGHT, WIDTH) and np.array_equal(labels, photo.numpy())


# ---------------------------------------------------------------- smoothing
class NoisyModel:
    """A static scene's two-class probabilities, class 1 more likely left to right, with fresh (seeded)
    noise on every call: labels flicker where the classes are close."""

    members = [types.SimpleNamespace(size=16)]

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, images):
        n, _, h, w = images.shape
        logits = torch.linspace(-2, 2, w).expand(n, 1, h, w) + 1.5 * torch.randn(n, 1, h, w, generator=self.generator)
        return torch.cat([1 - logits.sigmoid(), logits.sigmoid()], 1)


class BrightnessModel:
    """Two classes; class 1's probability is the frame's mean brightness (0-1)."""

    members = [types.SimpleNamespace(size=8)]

    def __call__(self, images):  # uint8 frames resized as a photo's are, or [0, 1] floats
        bright = ensembles.unit_range(images).mean((1, 2, 3), keepdim=True).expand(-1, 1, *images.shape[-2:])
        return torch.cat([1 - bright, bright], 1)


def flicker(labeller, frames=30):
    """The share of pixels whose label changes between consecutive frames of a still scene."""
    still = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    labels = [labeller(still) for _ in range(frames)]
    return np.mean([(a != b).mean() for a, b in zip(labels, labels[1:])])


def test_smoothing_steadies_flickering_labels():
    raw, smoothed = flicker(video.FrameLabeller(NoisyModel())), flicker(video.FrameLabeller(NoisyModel(), smooth=0.8))
    assert raw > 0.2 and smoothed < 0.5 * raw  # about 0.28 and 0.10


def grey_frames(*levels):
    return [np.full((HEIGHT, WIDTH, 3), level, np.uint8) for level in levels]


def test_the_average_restarts_at_a_scene_cut():
    frames = grey_frames(0, 26, 230)  # 26 grey levels apart: one scene; then 204: a cut
    cuts = video.SceneCuts()
    assert [cuts(frame) for frame in frames] == [False, False, True]
    labeller = video.FrameLabeller(BrightnessModel(), smooth=0.8)
    for frame, cut, expected in zip(frames, [False, False, True], [0, 0.2 * 26 / 255, 230 / 255]):
        labeller(frame, restart=cut)
        assert labeller.ema.state[1].mean().item() == pytest.approx(expected)  # p = 0.8 p_prev + 0.2 p_frame


@pytest.mark.parametrize("scene_cut, last_label", [(video.SCENE_CUT, 1), (255, 0)])
def test_the_loop_restarts_the_average_at_a_scene_cut(scene_cut, last_label, tmp_path):
    """Through label_video's loop: the bright frame after a cut is labelled 1 from its own probabilities (0.9);
    without the cut (threshold 255) the average holds 0.2 * 0.9 + 0.8 * ~0 and it stays 0."""
    frames = grey_frames(0, 0, 26, 230)
    clip = types.SimpleNamespace(frames=lambda: iter(frames), fps=FPS, frame_count=None, frame_size=(HEIGHT, WIDTH))
    labeller = video.FrameLabeller(BrightnessModel(), smooth=0.8)
    video.label_video(clip, labeller, ["Background", "bright"], shares_path=tmp_path / "s.csv", scene_cut=scene_cut)
    assert [row[2:] for row in read_csv(tmp_path / "s.csv")[1:]] == [
        ["1.000000", "0.000000"]] * 3 + [[f"{1 - last_label:.6f}", f"{last_label:.6f}"]]


def test_smooth_reaches_the_labeller_from_the_command_line(clip, tmp_path, run_inference, monkeypatch):
    """A noisy scene's class shares change less from frame to frame with --smooth 0.8."""
    monkeypatch.setattr(inference, "load_ensemble", lambda args: (NoisyModel(), ["Background", "thing"]))
    change = {}
    for smooth in ("0", "0.8"):
        run_inference("--video", clip, "--smooth", smooth, "--scene-cut", 255, "--save-shares", tmp_path / "s.csv")
        change[smooth] = np.abs(np.diff([float(row[3]) for row in read_csv(tmp_path / "s.csv")[1:]])).mean()
    assert change["0.8"] < 0.6 * change["0"]  # about 0.011 and 0.025


# ---------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_leaves_a_valid_video_and_csv_of_the_frames_done(clip, constant, tmp_path, run_inference,
                                                                monkeypatch, capsys):
    done, label = 5, video.FrameLabeller.__call__

    def interrupted(self, rgb, restart=False):
        interrupted.calls += 1
        if interrupted.calls > done:
            raise KeyboardInterrupt
        return label(self, rgb, restart)

    interrupted.calls = 0
    monkeypatch.setattr(video.FrameLabeller, "__call__", interrupted)
    out = tmp_path / "out"
    run_inference("--checkpoints", constant, "--video", clip, "--save-vis", out / "o.mp4", "--save-shares",
                  out / "s.csv")
    assert len(read_frames(out / "o.mp4")) == done
    assert [row[0] for row in read_csv(out / "s.csv")] == ["frame", *map(str, range(done))]
    assert sorted(os.listdir(out)) == ["o.mp4", "s.csv"]
    printed = capsys.readouterr().out
    assert f"stopped by Ctrl-C after {done} frames" in printed and f"wrote {out / 'o.mp4'} ({done} frames)" in printed


# ---------------------------------------------------------------- refusals
def unreadable(path):
    return (f"--video {path} cannot be opened as a video by OpenCV (not a video, truncated, or in a codec its "
            f"FFmpeg lacks): check that it plays, or convert it, e.g. ffmpeg -i {path} video.mp4")


REFUSALS = {  # (the arguments after --video, given the test's folder, the clip and a --save-shares; the message)
    "text file named .mp4": (lambda t, clip, out: [t / "x.mp4", *out], unreadable("{t}/x.mp4")),
    "no frames": (lambda t, clip, out: [t / "empty.avi", *out],
                  "--video {t}/empty.avi holds no frame OpenCV can decode: check that it plays, or convert it with "
                  "ffmpeg"),
    "missing camera": (lambda t, clip, out: ["99", *out], "--video 99: no camera 99 can be opened (none at that "
                                                          "index, or another program holds it): pass another index, "
                                                          "or a video file"),
    "missing file": (lambda t, clip, out: [t / "none.mp4", *out],
                     "--video {t}/none.mp4 does not exist: pass a video file, or a camera index (0: the first camera)"),
    "with --images and --eval": (lambda t, clip, out: [clip, *out, "--images", t, "--eval"],
                                 "--video labels a video's frames: drop --images, --eval (for photos); its outputs "
                                 "are --save-vis VIDEO and --save-shares CSV"),
    "with --json": (lambda t, clip, out: [clip, *out, "--json", "test.json"],
                    "--video labels a video's frames: drop --json (for photos); its outputs are --save-vis VIDEO and "
                    "--save-shares CSV"),
    "nothing to write": (lambda t, clip, out: [clip], "--video alone writes nothing: add --save-vis overlay.mp4, "
                                                      "--save-shares shares.csv or both"),
    "another container": (lambda t, clip, out: [clip, *out, "--save-vis", t / "o.mkv"],
                          "--save-vis {t}/o.mkv: the overlay video must end in .mp4 or .avi (codec mp4v, MJPG), "
                          "not .mkv"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unusable_videos_and_flags_are_refused_in_one_line_before_any_work(case, clip, tmp_path, monkeypatch,
                                                                           capsys):
    """Through the script's own __main__ line; the checkpoint does not exist, so each refusal comes before
    the ensemble is loaded, and no output is begun."""
    (tmp_path / "x.mp4").write_text("not a video\n")
    cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT)).release()
    argv, expected = REFUSALS[case]
    argv = argv(tmp_path, clip, ["--save-shares", tmp_path / "s.csv"])
    monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoints", str(tmp_path / "none.pt"), "--video",
                                      *map(str, argv), *CPU])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(REPO, "inference.py"), run_name="__main__")
    stderr = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and stderr == "error: " + expected.format(t=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["empty.avi", "x.mp4"]  # no output begun


def test_video_flags_without_video_are_refused(run_inference):
    with pytest.raises(utils.UserError, match=r"^--every, --smooth apply to --video only: add --video PATH, or "
                                              r"drop them$"):
        run_inference("--every", 2, "--smooth", 0.5)


@pytest.mark.slow
def test_an_unreadable_video_in_a_fresh_interpreter_prints_one_line(tmp_path):
    """OpenCV and FFmpeg print their own lines from C (unseen by capsys): only the error may reach stderr."""
    (tmp_path / "x.mp4").write_text("not a video\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "inference.py"), "--video", "x.mp4",
                             "--save-shares", "s.csv", *CPU], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == ["error: " + unreadable("x.mp4")]
