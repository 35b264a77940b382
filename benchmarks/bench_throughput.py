"""Training throughput of a recipe (default: train.py's, 512 px): does the data loader or the model limit?

    python benchmarks/bench_throughput.py                                  # the demo set (built on first use)
    python benchmarks/bench_throughput.py --data-root ../shared/data/trashbags
    flock /tmp/cpu.lock python benchmarks/bench_throughput.py              # on a machine shared with others

Every train.py option is accepted and means the same here (--size, --aug, --copy-paste-p, --batch-size,
--model, --amp, --channels-last, ...): the datasets, sampler, loaders, model and training step are
train.py's own. Printed:

1. where one loader worker's time goes, per image: JPEG decode, mask read, copy-paste, the other
   augmentations, the rest of __getitem__, collate. CPU time of one thread (what a DataLoader
   worker gets), so it does not depend on what else runs on the machine;
2. images/s of the training DataLoader alone (no model) with 0, 1 and 2 workers (wall clock);
3. images/s of the training step alone (one batch, reused) and end to end (loader + step).
"""
import argparse
import collections
import copy
import itertools
import os
import sys
import time

import albumentations as A
import cv2
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import copy_paste  # noqa: E402
import dataset as data  # noqa: E402
import model as models  # noqa: E402
import train  # noqa: E402

DECODE, MASK, COPY_PASTE, REST, COLLATE = "JPEG decode", "mask read", "copy-paste", "rest of __getitem__", "collate"


def get_args_parser():
    p = train.get_args_parser()
    p.description = __doc__
    g = p.add_argument_group("benchmark")
    g.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time")
    g.add_argument("--loader-batches", type=int, default=30, help="batches timed per worker count")
    g.add_argument("--stage-images", type=int, default=120, help="images in the per-stage breakdown")
    g.add_argument("--train-steps", type=int, default=1, help="timed training steps (after one warm-up step)")
    return p


# ---------------------------------------------------------------- 1. per-stage CPU time
class TimedTransform(A.BasicTransform):
    """Stands in for one transform of a Compose: runs it and adds its CPU time to `totals[name]`."""

    def __init__(self, transform, totals, name):  # no super().__init__(): other attributes are the wrapped one's
        self.transform, self.totals, self.name = transform, totals, name

    def __getattr__(self, attribute):
        return getattr(self.transform, attribute)

    def set_random_seed(self, seed):
        self.transform.set_random_seed(seed)

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        out = self.transform(*args, **kwargs)
        self.totals[self.name] += time.process_time() - start
        return out


def timed(function, totals, name):
    def run(*args, **kwargs):
        start = time.process_time()
        out = function(*args, **kwargs)
        totals[name] += time.process_time() - start
        return out

    return run


def instrumented(dataset, totals):
    """A copy of `dataset` whose image reads, mask reads and transforms add their CPU time to `totals`."""
    copied = copy.copy(dataset)
    copied.read_image = timed(dataset.read_image, totals, DECODE)
    copied.masks = copy.copy(dataset.masks)
    copied.masks.get = timed(dataset.masks.get, totals, MASK)
    copied.transform = copy.copy(dataset.transform)  # a preset: its albumentations Compose is `transforms`
    copied.transform.transforms = copy.copy(dataset.transform.transforms)
    copied.transform.transforms.transforms = [
        TimedTransform(t, totals, COPY_PASTE if isinstance(t, copy_paste.CopyPaste) else type(t).__name__)
        for t in dataset.transform.transforms.transforms]
    return copied


def stage_ms_per_image(train_set, keys, batch_size, collate):
    """CPU ms per image of each stage of the train set's __getitem__, and of collating its batches."""
    totals = collections.Counter()
    dataset = instrumented(train_set, totals)
    items = []
    start = time.process_time()
    for key in keys:
        items.append(dataset[key])
    whole = time.process_time() - start
    totals[REST] = whole - sum(totals.values())  # seeding, shape checks, the int64 mask
    for first in range(0, len(items) - batch_size + 1, batch_size):
        batch = items[first:first + batch_size]
        start = time.process_time()
        collate(batch)
        totals[COLLATE] += time.process_time() - start
    return {stage: 1000 * seconds / len(keys) for stage, seconds in totals.items()}


def print_stages(ms):
    augmentations = [stage for stage in ms if stage not in (DECODE, MASK, COPY_PASTE, REST, COLLATE)]
    total = sum(ms.values())
    print(f"\none loader worker, per image (CPU time of one thread)\n{'stage':<32}{'ms/image':>10}{'share':>8}")
    for stage in (DECODE, MASK, COPY_PASTE):
        print(f"{stage:<32}{ms.get(stage, 0.0):>10.2f}{ms.get(stage, 0.0) / total:>8.0%}")
    augmentation = sum(ms[stage] for stage in augmentations)
    print(f"{'augmentation':<32}{augmentation:>10.2f}{augmentation / total:>8.0%}")
    for stage in augmentations:
        print(f"{'  ' + stage:<32}{ms[stage]:>10.2f}")
    for stage in (REST, COLLATE):
        print(f"{stage:<32}{ms[stage]:>10.2f}{ms[stage] / total:>8.0%}")
    print(f"{'total':<32}{total:>10.2f}{'':>8}  = {1000 / total:.0f} images/s per core")


# ---------------------------------------------------------------- 2. the loader alone
def with_changes(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def loader_images_per_second(args, train_mix, val_set, workers, batches):
    """Wall-clock images/s of the training DataLoader, from its first batch (worker start-up left out)."""
    loader, _ = train.build_loaders(with_changes(args, workers=workers), train_mix, val_set, rank=0, world_size=1)
    received, start = 0, None
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        for images, _ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            received += 1
            if received == batches:
                return batches * len(images) / (time.perf_counter() - start)


# ---------------------------------------------------------------- 3. training steps
def train_images_per_second(args, batches, num_classes, steps, warmup=1, rank=0, local_rank=0, world_size=1):
    """Images/s of this process's train.py training steps over `batches`: `warmup` steps, then `steps` timed."""
    model = train.build_model(args, num_classes, local_rank, world_size)
    state = train.build_state(args, model, None, num_classes, warmup + steps, models.encoder_normalization(
        models.resolve_encoder(args.encoder)))
    times = []  # after each step; the step reads its loss, so GPU work is finished by then
    train.train_one_epoch(state, itertools.islice(batches, warmup + steps), 0, 0, warmup + steps, args, rank,
                          lambda *_: times.append(time.perf_counter()))
    return args.batch_size * steps / (times[-1] - times[warmup - 1])


# ---------------------------------------------------------------- main
def print_header(args, train_set, train_mix):
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{len(train_mix)} training images of {train_set.coco.path}; size {args.size}, aug {args.aug}, "
          f"copy-paste p {args.copy_paste_p}, batch {args.batch_size}; model {args.model}/{args.encoder} on "
          f"{args.device}, amp {args.amp}, channels_last {args.channels_last}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load} (other work slows the wall-clock rows)")


def print_throughput(rows, limit):
    print(f"\n{'throughput':<32}{'images/s':>10}")
    for name, value in rows.items():
        print(f"{name:<32}{value:>10.1f}")
    print(limit)


def verdict(loader_one_worker, model_alone):
    if loader_one_worker >= model_alone:
        return (f"the model limits: one loader worker delivers {loader_one_worker / model_alone:.1f}x "
                f"the images/s the training step consumes")
    return (f"the loader limits: the training step consumes {model_alone / loader_one_worker:.1f}x what one "
            f"worker delivers; use at least that many workers")


def main(args):
    torch.manual_seed(args.seed)
    data.prepare_data_root(args.data_root)
    mean, std = models.encoder_normalization(models.resolve_encoder(args.encoder))
    train_set, train_mix, val_set = train.build_datasets(args, mean, std)
    num_classes = len(train_set.class_names)
    print_header(args, train_set, train_mix)

    sampler = data.ResumableSampler(train_mix, seed=args.seed)
    sampler.set_epoch(0)
    keys = [key for key in sampler if key[0] < len(train_set)][:args.stage_images]
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    # a first pass fills the mask cache and the OS file cache, as the first epoch of a run does
    stage_ms_per_image(train_set, keys, args.batch_size, torch.utils.data.default_collate)
    stages = stage_ms_per_image(train_set, keys, args.batch_size, torch.utils.data.default_collate)
    torch.set_num_threads(threads[0])
    cv2.setNumThreads(threads[1])
    print_stages(stages)

    rows = {}
    for workers in args.loader_workers:
        rows[f"loader, {workers} worker{'s' * (workers != 1)}"] = loader_images_per_second(
            args, train_mix, val_set, workers, args.loader_batches)
    loader, _ = train.build_loaders(args, train_mix, val_set, rank=0, world_size=1)
    loader.sampler.set_epoch(0)
    rows["train step alone"] = model_alone = train_images_per_second(
        args, itertools.repeat(next(iter(loader))), num_classes, args.train_steps)
    rows[f"end to end, {args.workers} workers"] = train_images_per_second(args, iter(loader), num_classes,
                                                                          args.train_steps)
    one_worker = rows.get("loader, 1 worker", 1000 / sum(stages.values()))
    print_throughput(rows, verdict(one_worker, model_alone))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
