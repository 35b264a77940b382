"""PyTorch against onnxruntime, float32 and int8: inference images/s on CPU, side by side in one run.

    python benchmarks/bench_onnx.py                      # UNet/ResNet-18, UNet++/EfficientNet-B0, DeepLabV3+/ResNet-18
    python benchmarks/bench_onnx.py --size 64 --iters 2 --models unetpp:test_efficientnet   # smoke run
    python benchmarks/bench_onnx.py --models unet:r18 --profile     # + where onnxruntime spends its time

The three sides run the same exported module (random init): uint8 images in, softmax probabilities
out, normalisation inside. PyTorch runs it after ensemble.prepare_for_inference (conv+BN fusion,
channels_last) under inference_mode; onnxruntime runs export.py's ONNX graph of it, and that graph
quantized by export.quantize (export.py --int8; calibrated here on random images, which changes
the scales, not the speed). All use --threads threads. Timed calls rotate through the sides (and
which goes first), so load from other processes hits them alike; speeds are from the best call,
the ratios from the medians.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ensemble as ensembles  # noqa: E402
import export  # noqa: E402
import model as models  # noqa: E402
from utils import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["unet:r18", "unetpp:effb0", "deeplabv3p:r18"],
                   help="MODEL:ENCODER pairs")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7, help="timed calls per side")
    p.add_argument("--calibration-images", type=int, default=4, help="random images that calibrate the int8 graph")
    p.add_argument("--profile", action="store_true", help="also print onnxruntime's time per operator type")
    return p


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def onnx_files(module, args, folder):
    """{"float32": the module's ONNX graph, "int8": its quantization}, as files in `folder`."""
    float_path, int8_path = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
    onnx.save(export.export_onnx(module, args.size), float_path)
    calibration = torch.randint(0, 256, (args.calibration_images, 3, args.size, args.size), dtype=torch.uint8)
    export.quantize(float_path, int8_path, calibration.numpy(), folder)
    return {"float32": float_path, "int8": int8_path}


def session(path, threads, profiling=False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profiling
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def operator_times(path, feed, threads, calls=3):
    """{operator type: share of onnxruntime's kernel time} over a few calls, largest first."""
    profiled = session(path, threads, profiling=True)
    for _ in range(calls):
        profiled.run(None, feed)
    with open(profiled.end_profiling()) as f:
        events = json.load(f)
    os.remove(f.name)
    times = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values())
    return {op: duration / total for op, duration in times.most_common()}


def bench(name, encoder, args):
    torch.manual_seed(0)
    net = ensembles.prepare_for_inference(models.create_model(name, encoder, args.num_classes))
    module = export.ExportedModel(net, IMAGENET_MEAN, IMAGENET_STD).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as folder:
        files = onnx_files(module, args, folder)
        onnx_sessions = {side: session(path, args.threads) for side, path in files.items()}
        feed = {"images": images.numpy()}

        def pytorch():
            with torch.inference_mode():
                module(images)

        steps = {"pytorch": pytorch, **{side: (lambda s=s: s.run(None, feed)) for side, s in onnx_sessions.items()}}
        for step in steps.values():  # warm-up: allocations, oneDNN primitives, onnxruntime's arenas
            step()
        times = {side: [] for side in steps}
        order = list(steps)
        for i in range(args.iters):
            for side in order[i % len(order):] + order[:i % len(order)]:
                times[side].append(timed(steps[side]))
        profiles = {side: operator_times(path, feed, args.threads) for side, path in files.items()} if args.profile else {}
    speed = {side: args.batch_size / min(t) for side, t in times.items()}
    median = {side: statistics.median(t) for side, t in times.items()}
    return speed, median, profiles


def main(args):
    torch.set_num_threads(args.threads)
    print(f"{args.size}x{args.size}, batch {args.batch_size}, {args.threads} CPU threads, best of {args.iters}; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| model | encoder | PyTorch fp32 img/s | onnxruntime fp32 img/s | onnxruntime int8 img/s "
          "| ort fp32 / PyTorch | ort int8 / ort fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    profiles = {}
    for spec in args.models:
        name, _, encoder = spec.partition(":")
        speed, median, profiles[spec] = bench(name, encoder, args)
        print(f"| {name} | {models.resolve_encoder(encoder)} | {speed['pytorch']:.2f} | {speed['float32']:.2f} "
              f"| {speed['int8']:.2f} | {median['pytorch'] / median['float32']:.2f} "
              f"| **{median['float32'] / median['int8']:.2f}** |", flush=True)
    for spec, sides in profiles.items():
        for side, shares in sides.items():
            top = ", ".join(f"{op} {100 * share:.0f} %" for op, share in list(shares.items())[:6])
            print(f"{spec} onnxruntime {side}: {top}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
