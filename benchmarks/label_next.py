"""What to label next: retrain with N photos picked by `inference.py --rank-uncertain` vs N at random.

    python dataset_tool.py subset --json train.json --n 40 --seed 0 --unlabeled-rest
    python benchmarks/label_next.py --out runs/label-next -- \\
        --model unet --encoder r18 --size 128 --epochs 75 --val-every 15 --workers 0

For each seed S: train the recipe on --labeled (OUT/start/seedS); rank the --pool photos with that
run and take the --add least certain (OUT/uncertain/seedS.csv, .json, .png); draw as many from the
pool at random (numpy seed S); give each pick its labels from --full (the labeller's work, done
already for a benchmark) and train the recipe again on the labelled set plus the picks
(OUT/uncertain/seedS, OUT/random/seedS). Finished runs are not trained again. Printed: a markdown
table of each class's IoU at the last validation, mean ± sample std over the seeds.
"""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import utils  # noqa: E402
from compare_runs import pick_record, read_history  # noqa: E402
from rare_classes import markdown_table, train_once  # noqa: E402
import train  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs and picks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=os.path.join(REPO, "data", "demo"), help="data root of the jsons")
    p.add_argument("--labeled", default="train_40.json", help="the labelled start, relative to --root")
    p.add_argument("--pool", default="train_40_unlabeled.json", help="the photos to pick from, relative to --root")
    p.add_argument("--full", default="train.json", help="the pool's labels, relative to --root")
    p.add_argument("--add", type=int, default=20, help="photos picked per seed and way")
    p.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then the train.py options shared by all runs")
    return p


def read_json(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


def with_labels_of(labeled, full, file_names):
    """The labelled set plus the named photos with their annotations from `full` (ids kept, as both come from it)."""
    picked = {image["id"] for image in full["images"] if image["file_name"] in file_names}
    if len(picked) != len(file_names):
        raise SystemExit(f"{len(file_names) - len(picked)} picked photos are not in the full json")
    return {**labeled, "images": labeled["images"] + [i for i in full["images"] if i["id"] in picked],
            "annotations": labeled["annotations"] + [a for a in full["annotations"] if a["image_id"] in picked]}


def rank_uncertain(run, pool_paths, add, csv_path):
    """The real paths of the `add` photos that inference.py ranks least certain (its CSV's path column)."""
    if not os.path.isfile(csv_path):
        command = [sys.executable, os.path.join(REPO, "inference.py"), "--checkpoints", run, "--images", *pool_paths,
                   "--rank-uncertain", str(add), "--output", csv_path]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    with open(csv_path, newline="") as f:
        return {os.path.realpath(row["path"]) for row in csv.DictReader(f)}


def main(args):
    recipe = args.recipe[1:] if args.recipe[:1] == ["--"] else args.recipe
    root = os.path.abspath(args.root)
    epochs = train.get_args_parser().parse_args([*recipe, "--data-root", root]).epochs
    labeled, full, pool = (read_json(root, name) for name in (args.labeled, args.full, args.pool))
    by_path = {os.path.realpath(os.path.join(root, image["file_name"])): image["file_name"] for image in pool["images"]}
    out = os.path.abspath(args.out)
    records = {"start": [], "random": [], "uncertain": []}
    for seed in args.seeds:
        common = [*recipe, "--data-root", root, "--seed", str(seed)]
        start = os.path.join(out, "start", f"seed{seed}")
        train_once([*common, "--train-json", args.labeled], start, epochs)
        for way in ("uncertain", "random"):
            os.makedirs(os.path.join(out, way), exist_ok=True)
        chosen = rank_uncertain(start, sorted(by_path), args.add, os.path.join(out, "uncertain", f"seed{seed}.csv"))
        picks = {"uncertain": sorted(by_path[path] for path in chosen),
                 "random": sorted(np.random.default_rng(seed).choice(sorted(by_path.values()), args.add, replace=False))}
        records["start"].append(pick_record(read_history(start), best=False))
        for way, file_names in picks.items():
            json_path = os.path.join(out, way, f"seed{seed}_train.json")
            utils.atomic_write_json(json_path, with_labels_of(labeled, full, set(file_names)))
            run = os.path.join(out, way, f"seed{seed}")
            train_once([*common, "--train-json", json_path], run, epochs)
            records[way].append(pick_record(read_history(run), best=False))
    print(f"\nIoU at the last validation, mean ± std over seeds {args.seeds}; recipe: {shlex.join(recipe)}")
    print(f"start: {args.labeled}; random and uncertain: it plus {args.add} photos of {args.pool}")
    print("\n" + markdown_table(records))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
