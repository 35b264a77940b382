"""Summarise a dataset, chart it, or split off a subset (`python demo.py` builds the demo set):

    python dataset_tool.py summary --root data/demo --json train_all.json
    python dataset_tool.py summary --root data/demo --json train_all.json --report reports/demo --fold 0   # charts
    python dataset_tool.py subset --root data/demo --json train.json --n 30   # train_30.json + train_30_rest.json
"""
import argparse

import coco_utils
import dataset as data
from utils import HelpFormatter, UserError, format_class_table, run_main


def summarise(root, json_name, paint_order="area"):
    """Print the json's notes and its annotations and pixel share per class; returns its dataset."""
    dataset = data.SegmentationDataset(root, json_name, mode="val", paint_order=paint_order)
    dataset.coco.report_notes()
    pixels = data.pixel_counts(dataset)
    print(f"{json_name}: {len(dataset)} images")
    annotations = ["-"] + coco_utils.label_counts(dataset.coco)[1:].tolist()
    shares = pixels / pixels.sum()
    print(format_class_table(dataset.class_names, [("annotations", annotations), ("pixel share", shares)]))
    return dataset


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="annotation and pixel counts per class",
                                  formatter_class=HelpFormatter)
    summary.add_argument("--root", default=data.DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    summary.add_argument("--json", default="train_all.json", help="json file, relative to the root")
    summary.add_argument("--paint-order", choices=coco_utils.PAINT_ORDERS, default="area",
                         help="overlap rule when painting annotations (as train.py's)")
    summary.add_argument("--report", default=None, metavar="DIR",
                         help="also write charts, report.json and index.html to this folder (see docs/reports.md)")
    summary.add_argument("--fold", type=int, default=None,
                         help="with --report: chart the per-fold class balance of train.py's k-fold split")
    summary.add_argument("--n-folds", type=int, default=5, help="with --fold: number of folds (as train.py's)")
    summary.add_argument("--fold-seed", type=int, default=0, help="with --fold: seed of the split (as train.py's)")
    subset = commands.add_parser("subset", help="split a json into N random images and the rest",
                                 formatter_class=HelpFormatter)
    subset.add_argument("--root", default=data.DEFAULT_DATA_ROOT, help="data root (the demo set is built if missing)")
    subset.add_argument("--json", default="train.json", help="json file, relative to the root")
    subset.add_argument("--n", type=int, required=True, help="images in the subset")
    subset.add_argument("--seed", type=int, default=0, help="seed of the random choice of images")
    subset.add_argument("--unlabeled-rest", action="store_true",
                        help="write the rest without annotations, as STEM_N_unlabeled.json (for train.py --unlabeled)")
    subset.add_argument("--overwrite", action="store_true",
                        help="replace subset files of the same names that hold another subset")
    return parser


def main(args):
    if args.command == "summary" and args.fold is not None:
        check_summary_fold(args)
    data.prepare_data_root(args.root)
    coco_utils.require_json(args.root, args.json, "--json")
    if args.command == "subset":
        print("wrote " + " and ".join(data.write_subset(args.root, args.json, args.n, args.seed, args.unlabeled_rest,
                                                          args.overwrite)))
        return
    dataset = summarise(args.root, args.json, args.paint_order)
    if args.report:
        import report  # matplotlib is loaded only when a report is asked for

        print("wrote " + report.write_dataset_report(dataset, args.report, args.fold, args.n_folds, args.fold_seed))


def check_summary_fold(args):
    """summary --fold charts a fold of the split in the --report: nothing else shows it."""
    if not args.report:
        raise UserError("summary --fold charts that fold's class balance in the report: add --report DIR, or drop "
                        "--fold")
    data.check_fold(args.fold, args.n_folds)


if __name__ == "__main__":
    run_main(main, get_args_parser())
