"""Speed and memory of our models against segmentation_models_pytorch, side by side on CPU.

    python benchmarks/bench_model.py                      # unetpp and deeplabv3p, EfficientNet-B4, 512x512, batch 2
    python benchmarks/bench_model.py --models unetpp --iters 3
    python benchmarks/bench_model.py --models upernet segformer --encoder convnext_tiny   # ConvNeXt-T heads
    python benchmarks/bench_model.py --models upernet --encoder convnext_tiny --iters 1 --profile 12

Both sides get the same timm encoder (random init), decoder settings, input, loss and optimizer.
Timed iterations alternate between the two models (and which one goes first), so load from other
processes hits both alike. Speeds are from the best (least disturbed) of the timed calls; the
last column is the ratio of the medians. Inference uses torch.inference_mode();
ours goes through ensemble.prepare_for_inference (conv+BN fusion, channels_last), the reference is
used as is. Peak memory is the most CPU memory held by tensors allocated during one call (the
gradients included: zero_grad sets them to None), from the profiler's memory events, measured
for each side in a fresh process after one warm-up call. UperNet runs without
its auxiliary FCN head (aux_weight=0), which smp's UPerNet does not have, and with 512 decoder
channels on both sides. With --profile N, each row is followed by the N operators that take the
most self CPU time on either side (mean of --iters profiled calls), side by side.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ensemble as ensembles  # noqa: E402
import model as ours  # noqa: E402


def reference_model(name, encoder, num_classes):
    import segmentation_models_pytorch as smp

    if name == "unetpp":
        return smp.UnetPlusPlus(f"tu-{encoder}", encoder_weights=None, classes=num_classes)
    if name == "deeplabv3p":
        return smp.DeepLabV3Plus(
            f"tu-{encoder}", encoder_weights=None, classes=num_classes, decoder_atrous_rates=(6, 12, 18)
        )
    if name == "upernet":
        return smp.UPerNet(f"tu-{encoder}", encoder_weights=None, classes=num_classes, decoder_channels=512)
    if name == "segformer":
        return smp.Segformer(f"tu-{encoder}", encoder_weights=None, classes=num_classes)
    raise ValueError(f"no reference for {name!r}")


OUR_OPTIONS = {"upernet": {"aux_weight": 0}}  # what the reference model lacks


def train_step(model, images, masks):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), masks).backward()
        optimizer.step()

    return step


def inference_step(model, images):
    model.eval()

    def step():
        with torch.inference_mode():
            model(images)

    return step


def time_steps(steps, warmup, iters):
    """Seconds per call of each step, `iters` calls each, alternating between steps in rotating order."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {key: [] for key in steps}
    keys = list(steps)
    for i in range(iters):
        for key in keys[i % len(keys):] + keys[: i % len(keys)]:
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    return times


def peak_memory_mib(step):
    """Most tensor memory allocated during one call of step, from the profiler's memory events.

    Only right in the first profile of a process (later ones count differently): call it once
    per process, as measure_memory does.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def build_step(name, mode, side, args):
    """One side's ('ref' or 'ours') train or inference step for one model, on a seeded input that
    is the same for both sides."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    masks = torch.randint(0, args.num_classes, (args.batch, args.size, args.size))
    if side == "ref":
        net = reference_model(name, args.encoder, args.num_classes)
    else:
        net = ours.create_model(name, args.encoder, args.num_classes, **OUR_OPTIONS.get(name, {}))
    if mode == "train":
        return train_step(net, images, masks)
    return inference_step(net if side == "ref" else ensembles.prepare_for_inference(net), images)


def _memory_in_this_process(name, mode, side, args):
    if args.threads:
        torch.set_num_threads(args.threads)
    step = build_step(name, mode, side, args)
    step()  # the optimizer's state and the first call's one-off allocations are not the step's
    return peak_memory_mib(step)


def measure_memory(name, mode, side, args):
    """peak_memory_mib of one side's step in a fresh process, so neither side's measurement
    depends on what ran before it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_memory_in_this_process, name, mode, side, args).result()


def operator_ms(step, calls):
    """{operator: self CPU ms per call}, averaged over `calls` calls of step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()}


def print_profile(steps, top, calls):
    """The `top` operators by self CPU time on either side, side by side."""
    ms = {key: operator_ms(step, calls) for key, step in steps.items()}
    names = sorted(set(ms["ref"]) | set(ms["ours"]), key=lambda n: -max(ms["ref"].get(n, 0), ms["ours"].get(n, 0)))
    print(f"  {'operator (self CPU ms per call)':<44}{'ref':>9}{'ours':>9}")
    for name in names[:top]:
        print(f"  {name[:44]:<44}{ms['ref'].get(name, 0):>9.0f}{ms['ours'].get(name, 0):>9.0f}")
    print(f"  {'all operators':<44}{sum(ms['ref'].values()):>9.0f}{sum(ms['ours'].values()):>9.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["unetpp", "deeplabv3p"])
    parser.add_argument("--encoder", default="efficientnet_b4", help="timm encoder name (random init)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per model and mode")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each row, the N operators taking the most time on either side")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, encoder {args.encoder}, "
          f"{args.batch}x3x{args.size}x{args.size}, fp32 CPU, best of {args.iters}")
    header = (f"{'model':<11}{'mode':<7}{'ref img/s':>10}{'ours img/s':>11}{'ratio':>7}{'ref MiB':>9}{'ours MiB':>9}"
              f"{'median ratio':>14}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        for mode in ("train", "infer"):
            steps = {side: build_step(name, mode, side, args) for side in ("ref", "ours")}
            times = time_steps(steps, args.warmup, args.iters)
            memory = {side: measure_memory(name, mode, side, args) for side in steps}
            speed = {key: args.batch / min(t) for key, t in times.items()}
            median_ratio = statistics.median(times["ref"]) / statistics.median(times["ours"])
            print(f"{name:<11}{mode:<7}{speed['ref']:>10.2f}{speed['ours']:>11.2f}{speed['ours'] / speed['ref']:>7.2f}"
                  f"{memory['ref']:>9.0f}{memory['ours']:>9.0f}{median_ratio:>14.2f}", flush=True)
            if args.profile:
                print_profile(steps, args.profile, args.iters)


if __name__ == "__main__":
    main()
