"""End-to-end speed of inference.py --video: decode, predict, overlay, encode, in frames per second.

    python benchmarks/bench_video.py                        # Quickstart model, 640x480, 2 threads, 30 frames
    python benchmarks/bench_video.py --frames 300 --every 3 --smooth 0.8 --device cuda

A synthetic clip (moving rectangles over a ramp, mp4v) is written to a temporary folder, then labelled
by video.label_video as inference.py runs it, writing the overlay video (mp4v) and the shares CSV.
A second pass times the model alone on the same frames (the labeller: resize, ensemble, upsample, argmax)
to say how much of a frame's time is the model's. Weights are random: speed does not depend on them.
"""
import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ensemble as ensembles  # noqa: E402
import model as models  # noqa: E402
import video  # noqa: E402

NUM_CLASSES = 11


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet")
    p.add_argument("--encoder", default="r18")
    p.add_argument("--size", type=int, default=256, help="the checkpoint's training size (the Quickstart's: 256)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--smooth", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    p.add_argument("--device", default="cpu")
    return p


def random_ensemble(args):
    torch.manual_seed(0)
    encoder = models.resolve_encoder(args.encoder)
    mean, std = models.encoder_normalization(encoder)
    checkpoint = {"model": args.model, "encoder": encoder, "model_kwargs": {}, "num_classes": NUM_CLASSES,
                  "class_names": ["Background", *(f"class {i}" for i in range(1, NUM_CLASSES))],
                  "image_size": args.size, "mean": list(mean), "std": list(std),
                  "state_dict": models.create_model(args.model, encoder, NUM_CLASSES).state_dict()}
    return ensembles.build_ensemble(["random"], [checkpoint], args.device)


def write_clip(path, args):
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (args.width, args.height))
    ramp = cv2.cvtColor(np.tile(np.linspace(30, 220, args.width, dtype=np.uint8), (args.height, 1)), cv2.COLOR_GRAY2BGR)
    for t in range(args.frames):
        frame = ramp.copy()
        x = 7 * t % (args.width - 120)
        cv2.rectangle(frame, (x, 60), (x + 119, 179), (0, 0, 255), -1)
        cv2.circle(frame, (args.width - 1 - x - 60, 340), 60, (255, 128, 0), -1)
        writer.write(frame)
    writer.release()


def main(args):
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    ensemble, class_names = random_ensemble(args)
    with tempfile.TemporaryDirectory() as folder:
        clip_path = os.path.join(folder, "clip.mp4")
        write_clip(clip_path, args)
        labeller = video.FrameLabeller(ensemble, args.device, smooth=args.smooth)
        labeller(np.zeros((args.height, args.width, 3), np.uint8))  # warm-up: the first call allocates
        clip = video.Video(clip_path)
        start = time.perf_counter()
        progress = video.label_video(clip, labeller, class_names, args.every, os.path.join(folder, "overlay.mp4"),
                                     os.path.join(folder, "shares.csv"))
        total = time.perf_counter() - start
        clip.close()
        clip = video.Video(clip_path)
        frames = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in clip.frames()][::args.every]
        clip.close()
    start = time.perf_counter()
    for frame in frames:
        labeller(frame)
    model = (time.perf_counter() - start) / len(frames)
    print(f"{args.model}/{args.encoder} at {args.size}, {args.width}x{args.height}, {args.threads} threads, "
          f"{args.device}, --every {args.every}, --smooth {args.smooth}")
    print(f"end to end (decode, predict, overlay, encode): {progress.frames} frames in {total:.2f} s = "
          f"{progress.frames / total:.2f} frames/s")
    print(f"the model alone (resize, ensemble, upsample, argmax): {1000 * model:.0f} ms per predicted frame "
          f"({len(frames) * model / total:.0%} of the time)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
