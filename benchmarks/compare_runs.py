"""Side-by-side validation scores of finished training runs, from each run folder's metrics.json.

    python benchmarks/compare_runs.py runs/tb-seed0 runs/tb-seed1 runs/tb-seed2
    python benchmarks/compare_runs.py runs/cp-off runs/cp-on --best

Prints per-class IoU and mIoU of each run's last validation (or, with --best, its best one)
and, for several runs, their mean.
"""
import argparse
import json
import os

import numpy as np


def read_record(run, best):
    path = os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: is {run} a finished training run?")
    with open(path) as f:
        history = json.load(f)
    if not history:
        raise SystemExit(f"{path} holds no validation")
    return max(history, key=lambda r: r["miou"]) if best else history[-1]


def as_number(value):
    return float("nan") if value is None else value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--best", action="store_true", help="each run's best validation instead of its last")
    args = parser.parse_args()
    records = [read_record(run, args.best) for run in args.runs]
    names = list(records[0]["iou"])
    if any(list(r["iou"]) != names for r in records):
        raise SystemExit("the runs do not share one class list")
    rows = names + ["mIoU"]
    table = np.array([[as_number(r["iou"][n]) for n in names] + [r["miou"]] for r in records]).T
    headers = [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(records) > 1:
        headers.append("mean")
        table = np.concatenate([table, np.nanmean(table, axis=1, keepdims=True)], axis=1)
    width = max(len(n) for n in rows)
    print(f"{'run':<{width}}  " + "  ".join(f"{h:>12}" for h in headers))
    print(f"{'epoch':<{width}}  " + "  ".join(f"{r['epoch']:>12}" for r in records))
    for name, values in zip(rows, table):
        print(f"{name:<{width}}  " + "  ".join(f"{'-':>12}" if np.isnan(v) else f"{v:>12.4f}" for v in values))


if __name__ == "__main__":
    main()
