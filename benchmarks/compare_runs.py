"""Side-by-side validation scores of finished training runs, from each run folder's metrics.json.

    python benchmarks/compare_runs.py runs/tb-seed0 runs/tb-seed1 runs/tb-seed2
    python benchmarks/compare_runs.py runs/cp-off runs/cp-on --best
    python benchmarks/compare_runs.py runs/a runs/b --report reports/a-vs-b   # charts + index.html

Prints per-class IoU and mIoU of each run's last validation (or, with --best, its best one)
and, for several runs, their mean. With --report, also plots validation mIoU over epochs and
the per-class IoU side by side (docs/reports.md).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import as_number, write_run_comparison  # noqa: E402


def read_history(run):
    path = os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: is {run} a finished training run?")
    with open(path) as f:
        history = json.load(f)
    if not history:
        raise SystemExit(f"{path} holds no validation")
    return history


def pick_record(history, best):
    return max(history, key=lambda r: as_number(r["miou"])) if best else history[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--best", action="store_true", help="each run's best validation instead of its last")
    parser.add_argument("--report", default=None, metavar="DIR", help="also write charts and index.html here")
    args = parser.parse_args()
    histories = [read_history(run) for run in args.runs]
    records = [pick_record(history, args.best) for history in histories]
    names = list(records[0]["iou"])
    if any(list(r["iou"]) != names for r in records):
        raise SystemExit("the runs do not share one class list")
    rows = names + ["mIoU"]
    table = np.array([[as_number(r["iou"][n]) for n in names] + [r["miou"]] for r in records]).T
    labels = run_labels(args.runs)
    headers = list(labels)
    if len(records) > 1:
        headers.append("mean")
        table = np.concatenate([table, np.nanmean(table, axis=1, keepdims=True)], axis=1)
    width = max(len(n) for n in rows)
    print(f"{'run':<{width}}  " + "  ".join(f"{h:>12}" for h in headers))
    print(f"{'epoch':<{width}}  " + "  ".join(f"{r['epoch']:>12}" for r in records))
    for name, values in zip(rows, table):
        print(f"{name:<{width}}  " + "  ".join(f"{'-':>12}" if np.isnan(v) else f"{v:>12.4f}" for v in values))
    if args.report:
        print("wrote " + write_run_comparison(args.report, dict(zip(labels, histories)), dict(zip(labels, records))))


def run_labels(runs):
    """Run folder names, made unique with their parent folder when two share a name."""
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    return [os.path.normpath(run) if names.count(name) > 1 else name for run, name in zip(runs, names)]


if __name__ == "__main__":
    main()
