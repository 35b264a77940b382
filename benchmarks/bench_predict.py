"""Prediction speed and memory: same-size speed new vs old, and huge photos with --tile.

    python benchmarks/bench_predict.py                                   # full run (GPU if present)
    python benchmarks/bench_predict.py --size 64 --photo 400x300 --tile 64 --rounds 1 --images 6   # smoke

1. Same-size speed: the demo test set (all one size) predicted by this tree's ensemble.predict and
   by the one at git revision --old (default: main), loaded side by side from `git show` into a
   temporary folder, in alternating rounds; prints images/s of each and the ratio new/old.
2. Huge photos: peak memory of predicting one WxH photo (--photo, default 4000x3000) with
   --tile, --tile-batch-size windows at a time, against one tile-sized photo, each in its own
   process (CUDA: max allocated; CPU: peak resident memory growth, sampled every millisecond),
   and the time per megapixel.

Weights are random (speed and memory do not depend on them); --model/--encoder/--size choose the net.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import dataset as data  # noqa: E402
import ensemble as ensembles  # noqa: E402
import model as models  # noqa: E402

OLD_MODULES = ("utils", "model", "dataset", "ensemble", "inference")  # in import order; ensemble.py is newer


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unetpp")
    p.add_argument("--encoder", default="effb0")
    p.add_argument("--size", type=int, default=512, help="training size of the checkpoint; demo photos are this size")
    p.add_argument("--images", type=int, default=30, help="demo test photos predicted per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating old/new rounds (the median is reported)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--old", default="main", help="git revision to compare against")
    p.add_argument("--photo", default="4000x3000", help="huge photo size WxH")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tile-batch-size", type=int, default=1,
                   help="windows per batch in the huge-photo case (1: each batch is the model work of one tile-sized photo)")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: one photo in a child process
    return p


def random_checkpoint(args):
    torch.manual_seed(0)
    encoder = models.resolve_encoder(args.encoder)
    net = models.create_model(args.model, encoder, 11)
    mean, std = models.encoder_normalization(encoder)
    return {"model": args.model, "encoder": encoder, "model_kwargs": {}, "num_classes": 11,
            "class_names": [str(i) for i in range(11)], "image_size": args.size, "mean": list(mean),
            "std": list(std), "state_dict": net.state_dict()}


# ---------------------------------------------------------------- same-size speed, old vs new
def load_old_modules(revision, folder):
    """This repository's modules at `revision` (those it has), imported under their own names into a dict."""
    saved = {name: sys.modules.get(name) for name in OLD_MODULES}
    old, present = {}, []
    try:
        for name in OLD_MODULES:
            shown = subprocess.run(["git", "show", f"{revision}:{name}.py"], cwd=REPO, capture_output=True, text=True)
            if shown.returncode == 0:
                present.append(name)
                with open(os.path.join(folder, f"{name}.py"), "w") as f:
                    f.write(shown.stdout)
        for name in present:  # each old module sees the old modules it imports
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            old[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return old


def prediction_pass(modules, ensemble, root, args, collate_fn):
    """Seconds to predict the demo test images and bring each mask to the CPU, as inference.main does."""
    inf, dset = predictor(modules), modules["dataset"]
    # older trees give [0, 1] float images and yield probabilities; this one uint8 images and labels
    transform = inf.image_tensor_transform() if hasattr(inf, "image_tensor_transform") else inf.unit_range_transform()
    dataset = dset.SegmentationDataset(root, "test.json", "test", transform=transform)
    dataset.images = dataset.images[:args.images]
    kwargs = {"collate_fn": collate_fn} if collate_fn else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, **kwargs)
    synchronize(args.device)
    start = time.perf_counter()
    for _, result in inf.predict(ensemble, loader, args.device):
        (result.argmax(0).byte() if result.ndim == 3 else result).cpu()
    synchronize(args.device)
    return time.perf_counter() - start


def predictor(modules):
    """The module holding Member, Ensemble and predict: ensemble.py, or inference.py in older trees."""
    return modules.get("ensemble") or modules["inference"]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def same_size_speed(args, checkpoint, tmp):
    root = os.path.join(tmp, "demo")
    data.ensure_demo(root, size=args.size, n_train=1, n_val=1, n_test=args.images)
    old = load_old_modules(args.old, tmp)
    new = {"ensemble": ensembles, "dataset": data}
    trees = {name: predictor(modules).Ensemble([predictor(modules).Member(checkpoint)]).to(args.device).eval()
             for name, modules in (("old", old), ("new", new))}
    runs = {"old": (old, None), "new": (new, data.collate_mixed)}
    for name in runs:  # warm-up: cudnn autotuning, worker start-up, file cache
        prediction_pass(*runs[name][:1], trees[name], root, args, runs[name][1])
    times = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            times[name].append(prediction_pass(runs[name][0], trees[name], root, args, runs[name][1]))
    rate = {name: args.images / statistics.median(t) for name, t in times.items()}
    print(f"same-size prediction, {args.images} demo photos {args.size}x{args.size}, {args.model}/{args.encoder}, "
          f"batch {args.batch_size}, {args.device}, median of {args.rounds} alternating rounds")
    print(f"{'tree':<24}{'images/s':>10}")
    for name, label in (("old", f"old ({args.old})"), ("new", "new (this tree)")):
        print(f"{label:<24}{rate[name]:>10.2f}")
    print(f"ratio new/old {rate['new'] / rate['old']:.3f}  (goal >= 0.97)")


# ---------------------------------------------------------------- huge photos with --tile
def write_photo(path, width, height):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (max(height // 32, 1), max(width // 32, 1), 3), dtype=np.uint8)
    cv2.imwrite(path, cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))
    return path


class ResidentPeak:
    """Highest resident memory of this process while in the `with` block, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = self.now()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    @staticmethod
    def now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_case(args):
    """Child process: predict one photo with --tile; print peak memory and seconds as JSON."""
    ensemble = ensembles.Ensemble([ensembles.Member(random_checkpoint(args))],
                                  tiling=ensembles.Tiling(args.tile, 1 / 3, args.batch_size, args.device))
    ensemble = ensemble.to(args.device).eval()
    dataset = data.ImageFolderDataset([args.memory_case], ensembles.image_tensor_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=data.collate_mixed)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with ResidentPeak() as resident:
        for _ in ensembles.predict(ensemble, loader, args.device):  # warm-up (cudnn autotuning); its peak counts
            pass
        synchronize(args.device)
        start = time.perf_counter()
        for _ in ensembles.predict(ensemble, loader, args.device):  # labels, as inference.py keeps them
            pass
        synchronize(args.device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else resident.peak - resident.start
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def tiled_memory(args, tmp):
    width, height = (int(v) for v in args.photo.lower().split("x"))
    cases = {f"{width}x{height}": write_photo(os.path.join(tmp, "huge.jpg"), width, height),
             f"{args.tile}x{args.tile}": write_photo(os.path.join(tmp, "tile.jpg"), args.tile, args.tile)}
    flags = ["--model", args.model, "--encoder", args.encoder, "--size", str(args.size), "--tile", str(args.tile),
             "--batch-size", str(args.tile_batch_size), "--device", args.device]
    results = {}
    for name, path in cases.items():
        out = subprocess.run([sys.executable, __file__, *flags, "--memory-case", path], check=True,
                             capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    kind = "CUDA max allocated" if args.device.startswith("cuda") else "peak resident memory growth"
    print(f"\n--tile {args.tile}, {args.tile_batch_size} window(s) per batch, {args.model}/{args.encoder} "
          f"trained at {args.size}, {args.device} ({kind})")
    print(f"{'photo':<12}{'megapixels':>11}{'peak MiB':>10}{'seconds':>9}{'s / MP':>8}")
    for name, result in results.items():
        w, h = (int(v) for v in name.split("x"))
        mp = w * h / 1e6
        print(f"{name:<12}{mp:>11.2f}{result['peak_bytes'] / 2**20:>10.1f}{result['seconds']:>9.2f}"
              f"{result['seconds'] / mp:>8.2f}")
    huge, small = results[f"{width}x{height}"], results[f"{args.tile}x{args.tile}"]
    print(f"peak memory ratio {huge['peak_bytes'] / max(small['peak_bytes'], 1):.2f}  (goal < 2)")


def main(args):
    if args.memory_case:
        return memory_case(args)
    checkpoint = random_checkpoint(args)
    with tempfile.TemporaryDirectory() as tmp:
        same_size_speed(args, checkpoint, tmp)
        tiled_memory(args, tmp)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
