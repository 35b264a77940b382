"""What `--unlabeled` costs: seconds per epoch and peak memory of one recipe, supervised and
semi-supervised, side by side in one run.

    python dataset_tool.py subset --json train.json --n 40 --seed 0 --unlabeled-rest   # once
    python benchmarks/bench_semi.py -- --model unet --encoder r18 --size 256 --train-json train_40.json
    python benchmarks/bench_semi.py --ratios 1 2 -- --model unet --encoder r18 --size 256 --train-json train_40.json

Everything after `--` is the train.py recipe (default: the demo set's train_40.json split, as
above). Each configuration trains `--epochs` epochs in a fresh process (so peak memory is its
own): supervised, then `--unlabeled POOL --unlabeled-ratio R` for each ratio. Printed: seconds
per epoch (the mean over the epochs after the first, which warms up), its ratio to the supervised
one, and the process's peak resident memory (and the GPU's peak allocation on CUDA).
Validation runs only after the last epoch and is not timed. Run it on a quiet machine.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import train  # noqa: E402
import utils  # noqa: E402

RESULT = "bench_semi result: "  # the child's last line


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--unlabeled", default="train_40_unlabeled.json",
                   help="the unlabelled pool (a json relative to the recipe's --data-root, a folder or a glob)")
    p.add_argument("--ratios", type=utils.positive_int, nargs="+", default=[1], help="--unlabeled-ratio values")
    p.add_argument("--epochs", type=utils.positive_int, default=3, help="epochs per configuration (at least 2)")
    p.add_argument("--threads", type=utils.positive_int, default=2, help="torch threads of each run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one configuration, in this process
    p.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then the train.py options")
    return p


def run_child(recipe):
    """Train `recipe` here, timing each epoch; print the timings and this process's peak memory."""
    epoch_seconds, train_one_epoch = [], train.train_one_epoch

    def timed_epoch(*args, **kwargs):
        start = time.perf_counter()
        train_one_epoch(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - start)

    train.train_one_epoch = timed_epoch
    train.main(utils.parse_args(train.get_args_parser(), recipe))
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(RESULT + json.dumps({"epoch_seconds": epoch_seconds, "peak_rss_kb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss, "peak_gpu_bytes": peak_gpu}))


def pool_path(unlabeled, recipe):
    """--unlabeled as train.py resolves it: a json name relative to the recipe's data root."""
    if unlabeled.endswith(".json") and not os.path.isabs(unlabeled):
        return os.path.join(train.get_args_parser().parse_args(recipe).data_root, unlabeled)
    return unlabeled


def measure(name, options, args, folder):
    recipe = [*args.recipe, "--epochs", str(args.epochs), "--val-every", str(args.epochs), "--no-preflight",
              "--output", os.path.join(folder, name), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--", *recipe], env=env,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def main(args):
    if args.epochs < 2:
        raise utils.UserError("--epochs must be 2 or more: the first epoch warms up and is not timed")
    args.recipe = args.recipe[1:] if args.recipe[:1] == ["--"] else args.recipe
    if args.child:
        return run_child(args.recipe)
    args.recipe = args.recipe or ["--train-json", "train_40.json"]
    pool = pool_path(args.unlabeled, args.recipe)
    configs = {"supervised": []}
    configs.update({f"--unlabeled, ratio {r}": ["--unlabeled", pool, "--unlabeled-ratio", str(r)] for r in args.ratios})
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, options in configs.items():
            result = measure(name.replace(" ", "").replace(",", "-"), options, args, folder)
            seconds = sum(result["epoch_seconds"][1:]) / (len(result["epoch_seconds"]) - 1)
            rows.append((name, seconds, result["peak_rss_kb"] / 1024, result["peak_gpu_bytes"]))
            print(f"{name}: {seconds:.1f} s/epoch", flush=True)
    print(f"\nrecipe: {' '.join(args.recipe)}; {args.epochs} epochs each, {args.threads} threads\n")
    print("| configuration | s/epoch | vs supervised | peak RSS (MB) | peak GPU (MB) |")
    print("|---|---|---|---|---|")
    for name, seconds, rss_mb, gpu in rows:
        gpu_mb = f"{gpu / 2 ** 20:.0f}" if gpu is not None else "-"
        print(f"| {name} | {seconds:.1f} | {seconds / rows[0][1]:.2f}x | {rss_mb:.0f} | {gpu_mb} |")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
