"""Side-by-side validation scores of finished training runs, from each run folder's metrics.json.

    python compare_runs.py runs/tb-seed0 runs/tb-seed1 runs/tb-seed2
    python compare_runs.py runs/cp-off runs/cp-on --best
    python compare_runs.py runs/a runs/b --report reports/a-vs-b   # charts + index.html

Prints per-class IoU and mIoU of each run's last validation (or, with --best, its best one)
and, for several runs, their mean. With --report, also plots validation mIoU over epochs and
the per-class IoU side by side (docs/reports.md).
"""
import argparse
import json
import os

import numpy as np

import coco_utils
import utils
from report import as_number, write_run_comparison


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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--best", action="store_true", help="each run's best validation instead of its last")
    parser.add_argument("--report", default=None, metavar="DIR", help="also write charts and index.html here")
    return parser


def compare(args):
    histories = [read_history(run) for run in args.runs]
    records = [pick_record(history, args.best) for history in histories]
    names, first = list(records[0]["iou"]), os.path.join(args.runs[0], "metrics.json")
    for run, record in zip(args.runs, records):
        coco_utils.check_same_classes(os.path.join(run, "metrics.json"), record["iou"], first, names,
                                      fix="compare runs trained on the same classes")
    rows = names + ["mIoU"]
    table = np.array([[as_number(r["iou"][n]) for n in names] + [r["miou"]] for r in records]).T
    labels = run_labels(args.runs)
    headers = list(labels)
    if len(records) > 1:
        headers.append("mean")
        table = np.concatenate([table, np.nanmean(table, axis=1, keepdims=True)], axis=1)
    epochs = [r["epoch"] for r in records] + ([""] if len(records) > 1 else [])
    columns = [(header, [epoch, *values]) for header, epoch, values in zip(headers, epochs, table.T)]
    print(utils.format_class_table(["epoch"] + rows, columns, first="run"))
    if args.report:
        print("wrote " + write_run_comparison(args.report, dict(zip(labels, histories)), dict(zip(labels, records))))


def main(argv=None):
    utils.run_main(compare, get_args_parser(), argv)


def run_labels(runs):
    """Run folder names, made unique with their parent folder when two share a name."""
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    return [os.path.normpath(run) if names.count(name) > 1 else name for run, name in zip(runs, names)]


if __name__ == "__main__":
    main()
