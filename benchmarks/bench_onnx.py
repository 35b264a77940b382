"""PyTorch against onnxruntime: inference images/s on CPU, side by side in one run.

    python benchmarks/bench_onnx.py                      # UNet++/EfficientNet-B0 and DeepLabV3+/ResNet-18, 512x512
    python benchmarks/bench_onnx.py --size 64 --iters 2 --models unetpp:test_efficientnet   # smoke run

Both sides run the same exported module (random init): uint8 images in, softmax probabilities
out, normalisation inside. PyTorch runs it after ensemble.prepare_for_inference (conv+BN fusion,
channels_last) under inference_mode; onnxruntime runs export.py's ONNX graph of it. Both use
--threads threads. Timed calls alternate between the two (and which goes first), so load from
other processes hits both alike; speeds are from the best call, the ratio from the medians.
"""
import argparse
import os
import statistics
import sys
import time

import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ensemble as ensembles  # noqa: E402
import export  # noqa: E402
import model as models  # noqa: E402
from utils import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["unetpp:effb0", "deeplabv3p:r18"], help="MODEL:ENCODER pairs")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7, help="timed calls per side")
    return p


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def bench(name, encoder, args):
    torch.manual_seed(0)
    net = ensembles.prepare_for_inference(models.create_model(name, encoder, args.num_classes))
    module = export.ExportedModel(net, IMAGENET_MEAN, IMAGENET_STD).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(export.export_onnx(module, args.size).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    feed = {session.get_inputs()[0].name: images.numpy()}

    def pytorch():
        with torch.inference_mode():
            module(images)

    steps = {"pytorch": pytorch, "onnxruntime": lambda: session.run(None, feed)}
    for step in steps.values():  # warm-up: allocations, oneDNN primitives, onnxruntime's arenas
        step()
    times = {side: [] for side in steps}
    for i in range(args.iters):
        for side in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            times[side].append(timed(steps[side]))
    speed = {side: args.batch_size / min(t) for side, t in times.items()}
    ratio = statistics.median(times["pytorch"]) / statistics.median(times["onnxruntime"])
    return speed["pytorch"], speed["onnxruntime"], ratio


def main(args):
    torch.set_num_threads(args.threads)
    print(f"{args.size}x{args.size}, batch {args.batch_size}, {args.threads} CPU threads, best of {args.iters}; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| model | encoder | PyTorch img/s | onnxruntime img/s | ratio (ort / PyTorch) |")
    print("|---|---|---:|---:|---:|")
    for spec in args.models:
        name, _, encoder = spec.partition(":")
        pytorch, onnxruntime, ratio = bench(name, encoder, args)
        print(f"| {name} | {models.resolve_encoder(encoder)} | {pytorch:.2f} | {onnxruntime:.2f} | **{ratio:.2f}** |",
              flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
