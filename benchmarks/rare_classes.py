"""Rare-class levers over seeds: per-class IoU (mean ± std) of one recipe with each lever off and on.

    python benchmarks/rare_classes.py --out runs/rare-demo -- \\
        --model unet --encoder r18 --size 256 --epochs 25 --val-every 5 --class-weights none
    python benchmarks/rare_classes.py --out runs/rare-tb --configs baseline all -- \\
        --data-root ../shared/data/trashbags --model deeplabv3p --encoder r18 --size 256 --epochs 20 --class-weights none
    python benchmarks/rare_classes.py --out runs/rare-demo --config "rf+ohem=--sampler repeat-factor --loss ohem:1,dice:0.5" \\
        --configs baseline rf+ohem -- --model unet --encoder r18 --size 256 --epochs 25 --class-weights none

Everything after `--` is the train.py recipe. Each configuration adds its options to it (later
options win, so a configuration can turn a recipe's option back) and is trained once per seed
(`--seed S`) by train.py in a subprocess, into OUT/CONFIG/seedS, its log beside it. A run whose
metrics.json already holds the last epoch is not trained again: run the same command again to
finish an interrupted benchmark or to print the table (--finished-only prints the finished
runs' table and trains nothing). Printed: a markdown table of each class's
IoU at the last validation, mean ± sample standard deviation over the seeds, then mIoU.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402
from compare_runs import pick_record, read_history  # noqa: E402
from report import as_number  # noqa: E402

LEVERS = {
    "repeat-factor": ["--sampler", "repeat-factor", "--repeat-thresh", "0.5"],
    "crop-rare": ["--crop-rare"],
    "ohem": ["--loss", "ohem:1,dice:0.5"],
    "class-weights": ["--class-weights", "auto"],
}
CONFIGS = {"baseline": [], "copy-paste": ["--copy-paste-p", "0.5"], **LEVERS,
           "all": [option for options in LEVERS.values() for option in options]}


def parse_config(text):
    """'NAME=OPTIONS' -> (NAME, [options])."""
    name, has_equals, options = text.partition("=")
    if not has_equals or not name.strip():
        raise argparse.ArgumentTypeError(f"write a configuration as NAME=OPTIONS, got {text!r}")
    return name.strip(), shlex.split(options)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs: OUT/CONFIG/seedS")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", type=parse_config, action="append", default=[],
                   help="an extra configuration NAME=OPTIONS (e.g. 'rf+crop=--sampler repeat-factor --crop-rare')")
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"configurations to run, in this order (default: {' '.join(CONFIGS)} and every --config)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: print the table of the runs finished so far (the seeds each has are named)")
    p.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then the train.py options shared by all runs")
    return p


def last_epoch_done(output, epochs):
    path = os.path.join(output, "metrics.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        history = json.load(f)
    return bool(history) and history[-1]["epoch"] == epochs  # epochs are numbered from 1


def train_once(options, output, epochs):
    """train.py with `options` into `output`, unless that run is finished already."""
    if last_epoch_done(output, epochs):
        print(f"{output}: done already")
        return
    os.makedirs(os.path.dirname(output), exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "train.py"), *options, "--output", output]
    print(f"{output}: {shlex.join(command[1:])}", flush=True)
    with open(output + ".log", "w") as log:
        returncode = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if returncode != 0:
        with open(output + ".log") as log:
            tail = log.read()[-2000:]
        raise SystemExit(f"{output}: train.py failed with exit status {returncode}; its log {output}.log ends:\n{tail}")


def cell(values):
    values = np.array([as_number(v) for v in values], dtype=np.float64)
    if np.isnan(values).all():
        return "-"
    if np.count_nonzero(~np.isnan(values)) == 1:
        return f"{np.nanmean(values):.3f}"
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1):.3f}"


def markdown_table(records_by_config, column_names=None):
    """Rows: classes then mIoU; columns: configurations; cells: mean ± std over the seeds."""
    names = list(next(records[0] for records in records_by_config.values() if records)["iou"])
    columns = column_names or list(records_by_config)
    lines = ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names + ["mIoU"]:
        cells = [cell([r["miou"] if name == "mIoU" else r["iou"][name] for r in records] or [float("nan")])
                 for records in records_by_config.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    recipe = args.recipe[1:] if args.recipe[:1] == ["--"] else args.recipe
    configs = {**CONFIGS, **dict(args.config)}
    chosen = args.configs or list(configs)
    unknown = [name for name in chosen if name not in configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(configs)} (add one with --config NAME=OPTIONS)")
    records_by_config, seeds_by_config = {}, {}
    for name in chosen:
        records_by_config[name], seeds_by_config[name] = [], []
        for seed in args.seeds:
            options = [*recipe, *configs[name], "--seed", str(seed)]
            epochs = train.get_args_parser().parse_args(options).epochs  # a bad recipe stops here, before training
            output = os.path.join(os.path.abspath(args.out), name, f"seed{seed}")  # train.py runs in REPO
            if args.finished_only and not last_epoch_done(output, epochs):
                continue
            train_once(options, output, epochs)
            records_by_config[name].append(pick_record(read_history(output), best=False))
            seeds_by_config[name].append(seed)
    if not any(records_by_config.values()):
        raise SystemExit(f"no finished run in {args.out} for these configurations and seeds")
    print(f"\nIoU at the last validation, mean ± std over seeds {args.seeds}; recipe: {shlex.join(recipe)}")
    for name in chosen:
        print(f"- {name}: {shlex.join(configs[name]) or '(the recipe alone)'}")
    column_names = None
    if args.finished_only:
        column_names = [f"{name} (seeds {', '.join(map(str, seeds)) or 'none'})" for name, seeds in seeds_by_config.items()]
    print("\n" + markdown_table(records_by_config, column_names))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
