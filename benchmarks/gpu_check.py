"""GPU check: training images/s of the default model at 512 px with AMP off/bf16/fp16 x channels_last
off/on, 1 vs 2 processes (DDP) when the machine has 2+ GPUs, and a 2-process smoke run of train.py.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --model deeplabv3p --encoder r50 --batch-size 16

The timings are train.py's own training step (model, loss, optimizer, autocast, gradient scaler)
on one random batch reused, so they measure the GPU, not the data loader
(benchmarks/bench_throughput.py measures that). Without CUDA it says so and exits 0;
`--device cpu` runs every path on the CPU instead (slowly), to test this script.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from bench_throughput import train_images_per_second  # noqa: E402

NUM_CLASSES = len(demo.CATEGORY_NAMES) + 1  # the competition's classes and background
CONFIGS = [(amp, channels_last) for amp in ("off", "bf16", "fp16") for channels_last in (False, True)]
RESULT_TAG = "gpu_check result "  # marks the lines the 2-process run reports back
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def get_args_parser():
    defaults = train.get_args_parser().parse_args([])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--encoder", default=defaults.encoder)
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step and process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN picks its algorithms)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--compile", action="store_true", help="also torch.compile the model in every configuration")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # set in the torchrun processes
    return p


def recipe(opts, amp, channels_last, device):
    """train.py's arguments for one configuration."""
    argv = ["--model", opts.model, "--encoder", opts.encoder, "--size", str(opts.size),
            "--batch-size", str(opts.batch_size), "--amp", amp, "--device", device]
    return train.get_args_parser().parse_args(argv + ["--channels-last"] * channels_last + ["--compile"] * opts.compile)


def supported(amp, device):
    return not (amp == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported())


def measure(opts, amp, channels_last, device, rank=0, local_rank=0, world_size=1):
    """This process's training images/s in one configuration."""
    args = recipe(opts, amp, channels_last, device)
    torch.manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, args.size, args.size, device=device),
             torch.randint(0, NUM_CLASSES, (args.batch_size, args.size, args.size), device=device))
    try:
        return train_images_per_second(args, [batch] * (opts.warmup + opts.steps), NUM_CLASSES, opts.steps,
                                       warmup=opts.warmup, rank=rank, local_rank=local_rank, world_size=world_size)
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- 2 processes
def torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def measure_distributed(opts):
    """In each torchrun process: every configuration; rank 0 prints the images/s summed over processes."""
    rank, world_size, local_rank = train.init_distributed(opts.device)
    device = f"cuda:{local_rank}" if opts.device == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True
    for amp, channels_last in CONFIGS:
        if not supported(amp, opts.device):
            continue
        total = torch.tensor(measure(opts, amp, channels_last, device, rank, local_rank, world_size), device=device)
        dist.all_reduce(total)
        if rank == 0:
            print(RESULT_TAG + json.dumps({"amp": amp, "channels_last": channels_last, "images_s": total.item()}),
                  flush=True)
    dist.destroy_process_group()


def two_process_results(opts):
    """{(amp, channels_last): images/s} of a 2-process torchrun of this script, and its output."""
    result = subprocess.run(torchrun(2) + [os.path.abspath(__file__), *sys.argv[1:], "--measure"],
                            capture_output=True, text=True)
    rows = [json.loads(line[len(RESULT_TAG):]) for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    return {(row["amp"], row["channels_last"]): row["images_s"] for row in rows}, result


# ---------------------------------------------------------------- smoke
def ddp_smoke(device):
    """train.py for two epochs under torchrun, 2 processes, on a tiny demo set; (passed, output).

    On CUDA it also turns on the flags that only matter there (SyncBatchNorm, AMP, channels_last).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.make_demo(os.path.join(tmp, "data"), size=64, n_train=8, n_val=4, n_test=2)
        run = os.path.join(tmp, "run")
        cuda_flags = ["--sync-bn", "--channels-last", "--amp", "bf16" if supported("bf16", device) else "fp16"]
        result = subprocess.run(torchrun(2) + [
            TRAIN_SCRIPT, "--data-root", root, "--cache-dir", os.path.join(tmp, "cache"), "--output", run,
            "--model", "unet", "--encoder", "test_resnet", "--size", "64", "--epochs", "2", "--batch-size", "2",
            "--workers", "1", "--device", device, *(cuda_flags if device == "cuda" else [])],
            capture_output=True, text=True)
        passed = result.returncode == 0 and os.path.isfile(os.path.join(run, utils.LAST_CHECKPOINT))
        return passed, result.stdout + result.stderr


# ---------------------------------------------------------------- main
def describe_device(opts):
    if opts.device == "cpu":
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{names[0]} x{len(names)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}")


def print_table(opts, single, double):
    print(f"\nmodel {opts.model}/{opts.encoder}, {opts.size} px, batch {opts.batch_size} per process, "
          f"{opts.steps} timed steps after {opts.warmup}{', compiled' if opts.compile else ''}; training images/s")
    print(f"{'amp':<6}{'channels_last':<15}{'1 process':>11}{'2 processes':>13}{'scaling':>9}")
    for amp, channels_last in CONFIGS:
        one, two = single.get((amp, channels_last)), double.get((amp, channels_last))
        print(f"{amp:<6}{'on' if channels_last else 'off':<15}"
              f"{format_rate(one):>11}{format_rate(two):>13}{f'{two / one:.2f}x' if one and two else '-':>9}")


def format_rate(value):
    return "-" if value is None else f"{value:.1f}"


def main(opts):
    if opts.measure:
        return measure_distributed(opts)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this on a GPU machine; --device cpu tests the script)")
        return 0
    print(describe_device(opts))
    torch.backends.cudnn.benchmark = True
    single = {(amp, cl): measure(opts, amp, cl, opts.device) for amp, cl in CONFIGS if supported(amp, opts.device)}
    double, failed = {}, False
    if opts.device == "cpu" or torch.cuda.device_count() >= 2:
        double, result = two_process_results(opts)
        if result.returncode != 0:
            failed = True
            print(f"2-process timing FAILED:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    print_table(opts, single, double)
    if not double:
        print("one GPU: the 2-process column needs two or more")
    smoke_device = "cuda" if opts.device == "cuda" and torch.cuda.device_count() >= 2 else "cpu"
    passed, output = ddp_smoke(smoke_device)
    print(f"DDP smoke, train.py under torchrun, 2 processes ({'nccl' if smoke_device == 'cuda' else 'gloo'} "
          f"on {smoke_device}): {'ok' if passed else 'FAILED'}")
    if not passed:
        print(output[-5000:])
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
