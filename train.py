"""Train a segmentation model; keep the best checkpoint by validation mIoU.

    python train.py --model unetpp --encoder effb4 --fold 0
    torchrun --nproc_per_node 2 train.py --model deeplabv3p --encoder r50

With no --data-root the synthetic demo dataset is used (built on first use).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import coco_utils
import copy_paste
import dataset as data
import images as imaging
import loss as losses
import model as models
import presets
import scheduler as schedulers
import semi
import utils

PANEL_IMAGES = 4  # fixed val images shown in TensorBoard
SAMPLERS = ("uniform", "repeat-factor")
# Arguments a resumed run may change without leaving the path of the uninterrupted run.
RESUME_FREE_ARGS = ("resume", "overwrite", "config", "output", "workers", "val_every", "save_every_steps", "cache_dir",
                    "preflight", "max_image_pixels")
# what a run writes in its folder
RUN_FILES = (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT, "metrics.json", "args.json", "tb")
DEFAULT_TRAIN_JSON, DEFAULT_VAL_JSON = "train.json", "val.json"
# what only last.pt keeps: best.pt is for predicting, and these would double its size
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "ema_state_dict")
RESUME_KEYS = utils.MODEL_KEYS + ("epoch", "step_in_epoch", "global_step", "best_miou", "skipped_steps",
                                  "optimizer", "scheduler", "scaler", "rng", "args")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=data.DEFAULT_DATA_ROOT,
                   help="dataset folder with the COCO jsons and images (default: the synthetic demo set)")
    g.add_argument("--train-json", default=DEFAULT_TRAIN_JSON, help="training json, relative to --data-root")
    g.add_argument("--val-json", default=DEFAULT_VAL_JSON, help="validation json, relative to --data-root")
    g.add_argument("--fold", type=int, default=None,
                   help="k-fold mode: train and validate on fold K of --all-json instead of the two jsons")
    g.add_argument("--n-folds", type=utils.positive_int, default=5, help="number of folds for --fold")
    g.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split (kept apart from --seed)")
    g.add_argument("--all-json", default="train_all.json", help="json split into folds by --fold")
    g.add_argument("--extra-json", nargs="*", default=[],
                   help="more labelled jsons for training (e.g. copy_paste.py output); images relative to each json's folder")
    g.add_argument("--strict", action="store_true",
                   help="refuse to train when validation images are also training images (default: warn)")
    g.add_argument("--paint-order", choices=coco_utils.PAINT_ORDERS, default="area",
                   help="overlap rule when painting annotations: area (larger first) or vertices (competition baseline)")
    g.add_argument("--cache-dir", default=imaging.DEFAULT_CACHE_DIR, help="where decoded masks are cached")
    g.add_argument("--cache-images", action="store_true",
                   help="cache decoded images and masks raw (H*W*4 bytes per image on disk) so epochs skip JPEG and PNG decoding")
    g.add_argument("--size", type=utils.positive_int, default=512, help="training and validation image side in pixels")
    g.add_argument("--max-image-pixels", type=utils.positive_int, default=imaging.MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels than this (a guard against decompression bombs)")
    g.add_argument("--aug", choices=presets.AUGMENTATIONS, default="light", help="augmentation preset")
    g.add_argument("--copy-paste-p", type=utils.probability, default=0.0,
                   help="probability of pasting rare objects into a training image (0 = off: beside the default "
                        "class weights it did not help, docs/rare-classes.md)")
    g.add_argument("--copy-paste-classes", default=None,
                   help="comma-separated class names to paste (default: the two rarest by annotation count)")
    g.add_argument("--copy-paste-max", type=utils.positive_int, default=3, help="most objects pasted into one image")
    g.add_argument("--pseudo", default=None, help="pseudo-label folder written by pseudo_label.py, mixed into training")
    g.add_argument("--pseudo-ratio", type=utils.non_negative_float, default=0.5,
                   help="pseudo-labelled images drawn per epoch, as a fraction of the labelled images")
    g.add_argument("--sampler", choices=SAMPLERS, default="uniform",
                   help="uniform: each training image once per epoch; repeat-factor: LVIS repeat-factor sampling, "
                        "images of rare classes repeated (an epoch grows by the mean repeat factor)")
    g.add_argument("--repeat-thresh", type=float, default=0.5,
                   help="repeat-factor threshold t: an image holding a class found in a fraction f < t of the "
                        "training images is drawn max(1, sqrt(t/f)) times per epoch on average")
    g.add_argument("--crop-rare", action="store_true",
                   help="random crops (light and strong presets) that no class fills beyond --crop-max-ratio "
                        "and that keep a rare class when the image has one")
    g.add_argument("--crop-max-ratio", type=float, default=0.75,
                   help="most of a crop's labelled pixels one class may cover (MMSegmentation's cat_max_ratio)")
    g.add_argument("--crop-rare-classes", default=None,
                   help="comma-separated class names --crop-rare keeps in crops (default: the two rarest by annotation count)")
    g.add_argument("--workers", type=utils.non_negative_int, default=min(8, os.cpu_count() or 1), help="data loader worker processes")
    g = p.add_argument_group("unlabelled photos (docs/semi-supervised.md)")
    g.add_argument("--unlabeled", nargs="+", default=None, metavar="PATH",
                   help="also learn from photos without labels: folders (recursively), globs, files, or COCO jsons "
                        "whose images are used (labels unread); validation images among them are dropped "
                        "(refused with --strict)")
    g.add_argument("--unlabeled-ratio", type=utils.positive_int, default=1,
                   help="unlabelled images per labelled image in each step")
    g.add_argument("--confidence", type=utils.probability, default=0.95,
                   help="the teacher's pseudo-label of a pixel is learned when its probability is at least this")
    g.add_argument("--unsup-weight", type=utils.non_negative_float, default=1.0, help="weight of the unlabelled loss")
    g.add_argument("--unsup-rampup", type=utils.non_negative_float, default=1.0,
                   help="epochs over which the unlabelled loss weight rises to --unsup-weight")
    g.add_argument("--ema", action="store_true",
                   help="keep an EMA of the weights (always on with --unlabeled, where it is the teacher); it is "
                        "validated beside the model and best.pt holds whichever scores higher")
    g.add_argument("--ema-decay", type=utils.number_in(0, 1, high_open=True), default=0.999, help="the EMA's decay per optimizer step, once warmed up")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.list_models(), default="unetpp", help="architecture (docs/models.md)")
    g.add_argument("--encoder", default="effb0",
                   help="timm encoder name or alias (" + ", ".join(f"{k}={v}" for k, v in models.ENCODER_ALIASES.items()) + ")")
    g.add_argument("--pretrained", action="store_true", help="start from the encoder's timm hub weights (needs internet)")
    g.add_argument("--weights", default=None, help="local encoder weights file (.pth state dict or .safetensors)")
    g.add_argument("--decoder-channels", type=utils.positive_int, nargs="+", default=None,
                   help="decoder width: one number (deeplabv3p, upernet, segformer) or five (unetpp, unet)")
    g.add_argument("--aux-weight", type=utils.non_negative_float, default=None,
                   help="loss weight of the auxiliary outputs: upernet's FCN head (default 0.4, 0 removes it), "
                        "unetpp's --deep-supervision heads (default 1)")
    g.add_argument("--deep-supervision", action="store_true",
                   help="unetpp: train 1x1 heads on the nested nodes too (the UNet++ paper's deep supervision)")
    g.add_argument("--attention", choices=("scse",), default=None, help="unetpp/unet: scSE attention in the decoder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", default="ce:1,dice:0.5",
                   help=f"weighted loss terms NAME:WEIGHT,... from {', '.join(losses.LOSS_NAMES)}")
    g.add_argument("--class-weights", default="auto",
                   help="'auto' (1/sqrt of each class's training pixel share, at most 10x the smallest, mean 1), "
                        "'none' (every class 1), or comma-separated weights, one per class")
    g.add_argument("--ohem-thresh", type=float, default=0.7,
                   help="ohem loss: keep pixels whose true-class probability is under this")
    g.add_argument("--ohem-min-kept", type=int, default=10000,
                   help="ohem loss: keep at least this many pixels per image (the least confident)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--optimizer", choices=schedulers.OPTIMIZER_NAMES, default="radam",
                   help="radam (decoupled weight decay), adamw or sgd (Nesterov, momentum 0.9)")
    g.add_argument("--lr", type=utils.positive_float, default=2e-3,
                   help="peak learning rate (the default suits random init; lower it, e.g. 5e-4, with pretrained weights)")
    g.add_argument("--weight-decay", type=utils.non_negative_float, default=1e-4,
                   help="weight decay of the weights (biases and norm scales are not decayed)")
    g.add_argument("--scheduler", choices=schedulers.SCHEDULER_NAMES, default="cosine",
                   help="learning rate per step after the warmup: cosine (with restarts: --cycle-epochs), poly "
                        "or constant")
    g.add_argument("--warmup-epochs", type=utils.non_negative_float, default=1.0, help="linear warmup length in epochs")
    g.add_argument("--cycle-epochs", type=utils.positive_float, default=None,
                   help="cosine restart period in epochs (default: one cycle over the whole run)")
    g.add_argument("--cycle-mult", type=utils.number_in(1), default=1.0, help="each cosine cycle is this many times longer")
    g.add_argument("--cycle-decay", type=utils.positive_float, default=1.0, help="each cosine cycle's peak lr is multiplied by this")
    g.add_argument("--epochs", type=utils.positive_int, default=30, help="training epochs (passes over the data)")
    g.add_argument("--batch-size", type=utils.positive_int, default=8, help="images per step and process")
    g.add_argument("--accum-steps", type=utils.positive_int, default=1,
                   help="gradient accumulation steps per optimizer step")
    g.add_argument("--clip-grad", type=utils.positive_float, default=None, help="clip the gradient norm to this value")
    g = p.add_argument_group("speed")
    utils.add_device_args(g, amp_help="mixed precision (fp16 uses a gradient scaler; bf16 also works on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun)")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="run folder (default: runs/MODEL-ENCODER[-foldK])")
    # these two act on the run folder, so a replayed args.json (--config) does not repeat them
    resume = g.add_argument("--resume", nargs="?", const="auto", default=None,
                            help="resume from a last.pt (default: the run folder's last.pt)")
    overwrite = g.add_argument("--overwrite", action="store_true",
                               help="start afresh in a run folder that holds a checkpoint: its run files "
                                    f"({', '.join(RUN_FILES)}) are deleted once the new run has passed its checks")
    utils.command_line_only(resume), utils.command_line_only(overwrite)
    g.add_argument("--val-every", type=utils.positive_int, default=1,
                   help="validate every N epochs (and after the last)")
    g.add_argument("--save-every-steps", type=int, default=0, help="also save last.pt every N optimizer steps")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights' init, the order of the images and their augmentation")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    g.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the check before training (one training batch, validation on two val batches)")
    return p


# ---------------------------------------------------------------- distributed
def init_distributed(device):
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.startswith("cuda") else "gloo"  # --device cpu on a GPU machine needs gloo
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


# ---------------------------------------------------------------- data
def build_datasets(args, mean, std):
    """(labelled train set, everything trained on, val set)."""
    train_tf = presets.build_transform(args.aug, args.size, mean, std)
    val_tf = presets.build_transform("eval", args.size, mean, std)
    common = dict(paint_order=args.paint_order, cache_dir=args.cache_dir, cache_images=args.cache_images,
                  max_pixels=args.max_image_pixels)
    if args.fold is None:
        train = data.SegmentationDataset(args.data_root, args.train_json, "train", train_tf, **common)
        val = data.SegmentationDataset(args.data_root, args.val_json, "val", val_tf, **common)
        coco_utils.check_same_classes(val.coco.path, val.coco.classes, train.coco.path, train.coco.classes)
    else:
        coco = coco_utils.Coco(os.path.join(args.data_root, args.all_json), args.data_root)
        train_ids, val_ids = data.fold_image_ids(coco, args.fold, args.n_folds, args.fold_seed)
        train = data.SegmentationDataset(args.data_root, args.all_json, "train", train_tf, image_ids=train_ids, **common)
        val = data.SegmentationDataset(args.data_root, args.all_json, "val", val_tf, image_ids=val_ids, **common)
    extra = [extra_dataset(path, val, train_tf, common) for path in args.extra_json]
    for part in extra:
        coco_utils.check_same_classes(part.coco.path, part.coco.classes, train.coco.path, train.coco.classes)
    check_no_val_images([train] + extra, val, args.strict)
    for part in [train, val] + extra:
        coco_utils.check_image_files(part.coco, part.images, args.max_image_pixels)
    if args.copy_paste_p > 0 or args.crop_rare:
        # the object bank comes from this run's own training images only
        pastes = copy_paste.copy_paste_transforms(train, args.copy_paste_classes, args.copy_paste_p,
                                                  args.copy_paste_max, args.cache_dir)
        train.transform = presets.build_transform(args.aug, args.size, mean, std, extra=pastes,
                                                  crop_rare=rare_crop_options(args, train))
        for part in extra:
            part.transform = train.transform
    for part in [train, val] + extra:
        part.coco.report_notes()
    if args.pseudo and args.pseudo_ratio > 0:
        pseudo = data.PseudoLabelDataset(args.pseudo, train.transform, exclude=val)
        coco_utils.check_same_classes(args.pseudo, pseudo.class_names, train.coco.path, train.class_names)
        extra.append(data.mix_ratio_dataset(pseudo, len(train), args.pseudo_ratio))
    parts = [train] + extra
    return train, data.SeededConcatDataset(parts), val


def extra_dataset(path, val, transform, common):
    """An --extra-json set, less the copy-paste images that show this run's validation images."""
    path = os.path.abspath(path)
    keep = copy_paste.images_not_from(path, val)
    return data.SegmentationDataset(os.path.dirname(path), path, "train", transform, image_ids=keep, **common)


def check_fold_flags(args):
    """--fold reads --all-json alone: a --train-json or --val-json given with it would be ignored."""
    given = [f"{flag} {value}" for flag, value, default in (("--train-json", args.train_json, DEFAULT_TRAIN_JSON),
                                                           ("--val-json", args.val_json, DEFAULT_VAL_JSON))
             if value != default]
    if args.fold is not None and given:
        raise utils.UserError(f"--fold splits --all-json ({args.all_json}) into training and validation images, so "
                              f"{' and '.join(given)} would be ignored: drop --train-json/--val-json to train on "
                              f"the fold, or drop --fold to train on those jsons")


def check_copy_paste_flags(args):
    """--copy-paste-classes names what to paste; with copy-paste off (the default) it would do nothing."""
    if args.copy_paste_classes and args.copy_paste_p == 0:
        raise utils.UserError(f"--copy-paste-classes {args.copy_paste_classes} pastes nothing with --copy-paste-p 0 "
                              f"(the default): add --copy-paste-p 0.5")


def check_loss_flags(args):
    """A bad --loss or --class-weights stops the run before any data is read (the class count needs the data)."""
    losses.parse_loss_spec(args.loss)
    parse_class_weights(args.class_weights)


def check_jsons(args):
    """Stop with the flag to fix when a json this run reads is missing."""
    if args.fold is None:
        coco_utils.require_json(args.data_root, args.train_json, "--train-json")
        coco_utils.require_json(args.data_root, args.val_json, "--val-json")
    else:
        coco_utils.require_json(args.data_root, args.all_json, "--all-json")
    for path in args.extra_json:
        coco_utils.require_json(args.data_root, os.path.abspath(path), "--extra-json")


def check_no_val_images(train_sets, val_set, strict):
    """Warn (refuse with --strict) when validation images are also trained on: val scores would flatter the model."""
    overlap = data.image_overlap(train_sets, val_set)
    if not any(overlap.values()):
        return
    found = (f"validation images of {val_set.coco.path} also in the training data: {overlap['same file']} of "
             f"{len(val_set)} are the same file or identical bytes ({overlap['resolved path']} by resolved path, "
             f"{overlap['content']} by content), {overlap['file name']} have a training image's file name")
    if strict and overlap["same file"]:
        raise utils.UserError(f"{found}; remove them from one side (--strict refuses this)")
    print(f"warning: {found}; validation scores will be too high (--strict refuses this)")


def rare_crop_options(args, train):
    """presets.RareClassCrop's options for --crop-rare (None when off): the rare labels and the largest class share."""
    if not args.crop_rare:
        return None
    names = data.parse_classes(args.crop_rare_classes) or data.rarest_classes(train)
    unknown = [name for name in names if name not in train.class_names[1:]]
    if unknown:
        raise utils.UserError(f"--crop-rare-classes: unknown classes {unknown}; {train.coco.path} has "
                              f"{train.class_names[1:]}")
    return dict(rare_labels=[train.class_names.index(name) for name in names], max_ratio=args.crop_max_ratio)


def build_train_sampler(args, train_set, rank, world_size):
    if args.sampler == "uniform":
        return data.ResumableSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    factors = data.concat_repeat_factors(train_set.datasets, args.repeat_thresh)
    sampler = data.RepeatFactorSampler(train_set, factors, num_replicas=world_size, rank=rank, seed=args.seed)
    if rank == 0:
        print(f"repeat-factor sampling (t={args.repeat_thresh}): {len(train_set)} images, {sampler.epoch_length} "
              f"draws per epoch; {int((factors > 1).sum())} images repeated, up to {factors.max():.2f} times")
    return sampler


def build_loaders(args, train_set, val_set, rank, world_size):
    sampler = build_train_sampler(args, train_set, rank, world_size)
    # the loaders draw their workers' seeds from their own generator: a draw from the global RNG,
    # which checkpoints save and restore, would shift dropout after a mid-epoch resume
    loader_kwargs = dict(num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                         persistent_workers=args.workers > 0, worker_init_fn=utils.seed_worker,
                         generator=torch.Generator().manual_seed(args.seed))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=len(train_set) >= args.batch_size * world_size,
                                               **loader_kwargs)
    # each rank scores a disjoint share of the val images, no padding, so the summed matrix is exact
    if len(val_set) < world_size:  # a rank without val images would miss DDP's buffer broadcast in evaluate()
        raise utils.UserError(f"{len(val_set)} validation images cannot be shared among {world_size} processes, "
                              f"each of which scores its own share: start at most {len(val_set)} (torchrun "
                              f"--nproc-per-node), or validate on more images (--val-json, or fewer --n-folds)")
    val_indices = list(range(rank, len(val_set), world_size))
    # val masks keep each image's size: collate_mixed lists them when sizes differ
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, sampler=val_indices,
                                             collate_fn=data.collate_mixed, **loader_kwargs)
    return train_loader, val_loader


def build_unlabeled_loader(args, val_set, batches_per_epoch, rank, world_size):
    """The --unlabeled photos' weak views: as many batches of batch_size * ratio per epoch and process
    as the labelled loader gives (None without --unlabeled)."""
    if not args.unlabeled:
        return None
    images, skipped = semi.find_unlabeled(args.unlabeled, args.max_image_pixels)
    images = drop_val_photos(images, val_set, args.strict)
    batch_size = args.batch_size * args.unlabeled_ratio
    if rank == 0:
        print(f"unlabelled photos: {len(images)}" + (f" ({len(skipped)} unreadable skipped)" if skipped else "")
              + f"; {batch_size} beside each batch of {args.batch_size} labelled images")
    sampler = semi.UnlabeledStreamSampler(len(images), batches_per_epoch * batch_size, num_replicas=world_size,
                                          rank=rank, seed=args.seed)
    return torch.utils.data.DataLoader(
        semi.UnlabeledDataset(images, args.size, args.max_image_pixels), batch_size=batch_size, sampler=sampler,
        num_workers=args.workers, pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0,
        worker_init_fn=utils.seed_worker, generator=torch.Generator().manual_seed(args.seed))


def drop_val_photos(images, val_set, strict):
    """The unlabelled photos less the validation images among them (same resolved path or bytes):
    learning their pseudo-labels would flatter the val scores. Refused with --strict."""
    index = data.FileIndex(val_set.coco.image_path(info) for info in val_set.images)
    kept = [info for info in images if not (index.holds_path(info["path"]) or index.holds_bytes(info["path"]))]
    if len(kept) == len(images):
        return images
    found = f"{len(images) - len(kept)} of the --unlabeled photos are validation images of {val_set.coco.path}"
    if strict:
        raise utils.UserError(f"{found}: remove them from --unlabeled (--strict refuses this)")
    if not kept:
        raise utils.UserError(f"{found}, and so are all of them: pass photos that are not validation images")
    print(f"warning: {found}; they are left out")
    return kept


def parse_class_weights(spec):
    """--class-weights: None (for 'none'), 'auto', or its weights (numbers, each finite and >= 0)."""
    if spec in (None, "none"):
        return None
    if spec == "auto":
        return spec
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise utils.UserError(f"--class-weights {spec}: not a comma-separated list of numbers: pass one weight per "
                              f"class (e.g. 0.5,1,2), or --class-weights auto") from None
    losses.check_class_weights(weights)
    return weights


def resolve_class_weights(spec, train_set, num_classes):
    weights = parse_class_weights(spec)
    if weights is None:
        return None
    if weights == "auto":
        return losses.auto_class_weights(torch.as_tensor(data.pixel_counts(train_set)))
    if len(weights) != num_classes:
        raise utils.UserError(f"--class-weights has {len(weights)} values, the dataset has {num_classes} classes "
                              f"{train_set.class_names}: pass one weight per class, or --class-weights auto")
    return torch.tensor(weights)


# ---------------------------------------------------------------- steps
def to_device(images, masks, args):
    """Images as one batch tensor; masks as a batch tensor, or a list when val images differ in size."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.to(args.device, non_blocking=True).contiguous(memory_format=memory_format)
    if torch.is_tensor(masks):
        return images, masks.to(args.device, non_blocking=True)
    return images, [mask.to(args.device, non_blocking=True) for mask in masks]


class NonFiniteTraining(RuntimeError):
    """The loss or the weights became NaN/inf: training cannot go on from here."""


def describe_position(epoch, step_in_epoch):
    """A checkpoint's position (epochs done, or epoch index and steps done in it) as the console counts: from 1."""
    return f"epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"


def check_finite_weights(model, epoch, step_in_epoch):
    """Called before every checkpoint write, so that last.pt always holds usable weights."""
    tensors = [t for t in unwrap(model).state_dict().values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        raise NonFiniteTraining(f"the weights hold NaN/inf at {describe_position(epoch, step_in_epoch)}")


def train_one_epoch(state, loader, epoch, start_step, batches_per_epoch, args, rank, on_step, unlabeled=None):
    """One epoch of optimizer steps; with `unlabeled` (a loader of weak views), each step also learns
    the teacher's pseudo-labels on strong views of as many batches of unlabelled photos."""
    model, optimizer, criterion = state["model"], state["optimizer"], state["criterion"]
    model.train()
    batches = zip(loader, unlabeled) if unlabeled is not None else ((batch, None) for batch in loader)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", initial=start_step, total=batches_per_epoch,
               disable=rank != 0, dynamic_ncols=True)
    for step, ((images, masks), weak) in enumerate(bar, start=start_step):
        images, masks = to_device(images, masks, args)
        if weak is None:
            with utils.autocast(args.device, args.amp):
                loss = criterion(model(images), masks)
        else:
            loss = consistency_loss(state, images, masks, weak, args)
        if not finite_everywhere(loss):
            where = " (here or on another process)" if dist.is_initialized() else ""
            raise NonFiniteTraining(f"loss is {loss.item()}{where} at {describe_position(epoch, step + 1)}")
        state["scaler"].scale(loss / args.accum_steps).backward()
        if (step + 1) % args.accum_steps == 0 or step + 1 == batches_per_epoch:
            optimizer_step(state, args)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        on_step(epoch, step + 1, loss.item())


def consistency_loss(state, images, masks, weak, args):
    """The labelled loss plus the ramped-up unlabelled one (FixMatch as UniMatch applies it).

    The EMA teacher labels the weak views; the student sees strong views of them (colour jitter, grey,
    blur, then CutMix carrying the pseudo-labels along) in a forward of their own, whose BatchNorm
    statistics stay out of the running ones: one forward of both batches normalised the labelled
    photos by jittered ones and cost 0.07 mIoU on the demo set (docs/semi-supervised.md).
    """
    model, teacher = state["model"], state["teacher"]
    mean, std = state["normalization"]
    weak = weak.to(args.device, non_blocking=True).float().div_(255)
    strong = (semi.strong_photometric(weak) - mean) / std
    weak = (weak - mean) / std
    with torch.no_grad(), utils.autocast(args.device, args.amp):
        teacher_logits = teacher.module(weak)
    pseudo, labels = semi.pseudo_labels(teacher_logits, args.confidence, state["class_weights"])
    state["confident"].update(pseudo, labels)
    strong, pseudo = semi.cutmix(strong, pseudo, semi.cutmix_boxes(len(strong), *strong.shape[-2:]))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    with utils.autocast(args.device, args.amp):
        labelled = model(images)
        with semi.running_stats_frozen(model):
            outputs = model(strong.contiguous(memory_format=memory_format))
    student_logits = outputs if torch.is_tensor(outputs) else outputs[0]
    weight = args.unsup_weight * semi.rampup(state["global_step"], state["rampup_steps"])
    return (state["criterion"](labelled, masks)
            + weight * semi.unsupervised_loss(student_logits, pseudo, state["class_weights"]))


def finite_everywhere(loss):
    """Whether the loss is finite on every process; all of them must stop together, or the others would hang."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def optimizer_step(state, args):
    model, optimizer, scaler = state["model"], state["optimizer"], state["scaler"]
    if args.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    if scaler.is_enabled() and scaler.get_scale() < scale_before:
        state["skipped_steps"] += 1  # fp16 overflow: the scaler skipped this update
    optimizer.zero_grad(set_to_none=True)
    state["scheduler"].step()
    state["global_step"] += 1
    if state["teacher"] is not None:
        state["teacher"].update(unwrap(model), step=state["global_step"])


@torch.inference_mode()
def evaluate(model, loader, criterion, num_classes, args, rank=0, panels=None):
    """Loss and dataset-level scores at the masks' own resolution, summed over processes."""
    model.eval()
    confusion = utils.ConfusionMatrix(num_classes, device=args.device)
    loss_sum = torch.zeros(2, device=args.device, dtype=torch.float64)
    for images, masks in tqdm(loader, desc="val", disable=rank != 0, dynamic_ncols=True, leave=False):
        images, masks = to_device(images, masks, args)
        with utils.autocast(args.device, args.amp):
            logits = model(images)
        for images, logits, masks in same_size_groups(images, logits.float(), masks):
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            loss_sum += torch.stack([criterion(logits, masks).double() * len(images), loss_sum.new_tensor(len(images))])
            preds = logits.argmax(1)
            confusion.update(masks, preds)
            if panels is not None and len(panels) < PANEL_IMAGES:
                panels.extend(zip(images.cpu(), masks.cpu(), preds.cpu()))
    confusion.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    scores = confusion.compute()
    scores["loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    return scores


def same_size_groups(images, logits, masks):
    """(images, logits, masks) to score together: the whole batch when the masks are one tensor,
    else one image at a time, each at its own mask's size."""
    if torch.is_tensor(masks):
        return [(images, logits, masks)]
    return [(image[None], logit[None], mask[None]) for image, logit, mask in zip(images, logits, masks)]


def preflight(model, train_set, val_set, criterion, num_classes, args, rank, world_size):
    """Read one training batch and validate on two val batches before training starts, so a data,
    shape or class-list problem surfaces in seconds, not after the first epoch."""
    start = time.time()
    # the same number on every process, as evaluate()'s collectives need
    val_indices = list(range(rank, len(val_set), world_size))[:min(2 * args.batch_size, len(val_set) // world_size)]
    try:
        batch = [train_set[(index, 0)] for index in range(min(args.batch_size, len(train_set)))]
        torch.utils.data.default_collate(batch)
        # its own generator: a loader without one draws its seed from the global RNG, which resume restores
        loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, sampler=val_indices,
                                             collate_fn=data.collate_mixed, generator=torch.Generator())
        evaluate(model, loader, criterion, num_classes, args, rank)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not out_of_memory(err):
            raise
        raise utils.UserError(f"out of memory on {args.device} in the preflight at --size {args.size} with "
                              f"--batch-size {args.batch_size}: pass a smaller --size or --batch-size (--accum-steps "
                              f"N keeps the batch per optimizer step)") from None
    if rank == 0:
        print(f"preflight passed in {time.time() - start:.1f} s: one training batch read, "
              f"{len(val_indices)} val image(s) validated (--no-preflight skips this)")


CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def out_of_memory(err):
    """Whether `err` is an accelerator's or the CPU allocator's out-of-memory error."""
    return isinstance(err, torch.OutOfMemoryError) or any(text in str(err) for text in CPU_OUT_OF_MEMORY)


# ---------------------------------------------------------------- checkpoints
def unwrap(model):
    """The plain model inside torch.compile and DistributedDataParallel wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def model_options(args):
    """The model options set on the command line, as create_model keywords (the checkpoint's model_kwargs)."""
    channels = args.decoder_channels
    options = {
        "decoder_channels": channels[0] if channels and len(channels) == 1 else channels,
        "aux_weight": args.aux_weight,
        "deep_supervision": args.deep_supervision or None,
        "attention": args.attention,
    }
    return {key: value for key, value in options.items() if value is not None}


def train_image_size(train_mix):
    """[height, width] of the labelled photos trained on, as their jsons list them: each side's median.

    Each photo is resized to --size to train, so this says at what scale the model learned the scenes:
    inference.py's --tile alone cuts windows of as many photo pixels (ensemble.native_window).
    """
    photos = [info for part in train_mix.datasets if isinstance(part, data.SegmentationDataset) for info in part.images]
    return [round(float(np.median([info[side] for info in photos]))) for side in ("height", "width")]


def checkpoint_state(state, args, class_names, mean, std, epoch, step_in_epoch, native_size, weights=None):
    """Everything a resumed run needs; `weights` (default: the model's) is the state dict to predict with.

    `native_size`: train_image_size of the photos trained on.
    """
    model = unwrap(state["model"])
    teacher = state["teacher"]
    return {
        "model": args.model, "encoder": models.resolve_encoder(args.encoder), "model_kwargs": model_options(args),
        "class_names": list(class_names), "num_classes": len(class_names), "image_size": args.size,
        "train_image_size": native_size,
        "class_weights": None if state["class_weights"] is None else state["class_weights"].tolist(),
        "mean": list(mean), "std": list(std), "args": vars(args),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": state["global_step"],
        "best_miou": state["best_miou"], "skipped_steps": state["skipped_steps"],
        "state_dict": model.state_dict() if weights is None else weights,
        "ema_state_dict": None if teacher is None else teacher.module.state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "scheduler": state["scheduler"].state_dict(), "scaler": state["scaler"].state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def prediction_checkpoint(checkpoint):
    """best.pt: the checkpoint less its training state (TRAINING_STATE_KEYS), which only resuming needs."""
    return {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE_KEYS}


def load_resume_checkpoint(path):
    """The checkpoint --resume continues from; a best.pt (weights without training state) is refused."""
    checkpoint = utils.load_checkpoint(path, required_keys=utils.MODEL_KEYS)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if "optimizer" in missing:
        raise utils.UserError(f"--resume {path}: this checkpoint holds the weights to predict with (a best.pt) but no "
                              f"training state (optimizer, scheduler, RNG): pass the run's "
                              f"{utils.LAST_CHECKPOINT} ({os.path.join(os.path.dirname(path), utils.LAST_CHECKPOINT)})")
    if missing:
        raise utils.UserError(f"--resume {path} lacks {missing}: pass a {utils.LAST_CHECKPOINT} that train.py wrote")
    return checkpoint


def check_resumable(checkpoint, args, source="checkpoint"):
    """Before anything is built: another model, model options or optimizer is an error naming both,
    since the checkpoint's weights or optimizer state would not fit this run's."""
    if (checkpoint["model"], checkpoint["encoder"]) != (args.model, models.resolve_encoder(args.encoder)):
        raise utils.UserError(f"{source} is {checkpoint['model']}/{checkpoint['encoder']}, this run is "
                              f"{args.model}/{models.resolve_encoder(args.encoder)}: resume with the run's own "
                              f"--model and --encoder")
    if checkpoint["model_kwargs"] != model_options(args):
        raise utils.UserError(f"{source} has model options {checkpoint['model_kwargs']}, this run "
                              f"{model_options(args)}: resume with the run's own model flags")
    optimizer = checkpoint["args"].get("optimizer", args.optimizer)
    if optimizer != args.optimizer:
        raise utils.UserError(f"{source} was trained with --optimizer {optimizer}, this run asks for "
                              f"--optimizer {args.optimizer}, whose state the checkpoint lacks: resume with "
                              f"--optimizer {optimizer}, or drop --resume and pass another --output")


def restore(state, checkpoint, class_names, source="checkpoint"):
    """Continue from `checkpoint` (check_resumable passed); another class list is an error naming both."""
    coco_utils.check_same_classes(source, checkpoint["class_names"], "the dataset", class_names,
                            fix="resume with the run's own --data-root, or drop --resume and pass another --output")
    unwrap(state["model"]).load_state_dict(checkpoint["state_dict"])
    if state["teacher"] is not None:  # a run that gains --ema on resume starts its EMA from the weights
        state["teacher"].module.load_state_dict(checkpoint.get("ema_state_dict") or checkpoint["state_dict"])
    for key in ("optimizer", "scheduler", "scaler"):
        state[key].load_state_dict(checkpoint[key])
    for key in ("global_step", "best_miou", "skipped_steps"):
        state[key] = checkpoint[key]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["epoch"], checkpoint["step_in_epoch"]


def changed_args(saved, args):
    """'name: saved -> now' for each argument that differs from the checkpoint's run and changes its course."""
    return [f"{name}: {saved[name]!r} -> {value!r}" for name, value in vars(args).items()
            if name in saved and name not in RESUME_FREE_ARGS and saved[name] != value]


# ---------------------------------------------------------------- logging
PRECISION = {"off": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler"}


def startup_summary(args, train_set, train_mix, val_set, unlabeled_loader, model, world_size):
    """What the run learns from, with which model, on what, and where it writes: a few lines to read
    before the preflight and the epochs start."""
    extra = [part for part in train_mix.datasets[1:] if not isinstance(part, data.RatioMix)]
    pseudo = [part for part in train_mix.datasets[1:] if isinstance(part, data.RatioMix)]
    more = [f"+ {sum(len(part) for part in extra)} extra (--extra-json)"] if extra else []
    more += [f"+ {len(part)} pseudo-labelled per epoch, drawn from {len(part.pseudo)}" for part in pseudo]
    if unlabeled_loader is not None:
        more.append(f"+ {len(unlabeled_loader.dataset)} unlabelled")
    sizes = sorted({(info["width"], info["height"]) for part in [train_set, *extra, val_set] for info in part.images},
                   key=lambda size: (size[0] * size[1], size))  # by pixels
    native = [f"{width}x{height}" for width, height in (sizes[0], sizes[-1])]
    native = f"all {native[0]}" if len(sizes) == 1 else f"{native[0]} to {native[1]}"
    parameters = sum(p.numel() for p in unwrap(model).parameters())
    names = train_set.class_names
    processes = f" x {world_size} processes" if world_size > 1 else ""
    return "\n".join([
        f"data:   {len(train_set)} training images" + (f" ({', '.join(more)})" if more else "")
        + f", {len(val_set)} validation images",
        f"        {len(names)} classes: {', '.join(names)}",
        f"        trained at {args.size} x {args.size} px; the photos are {native} px (width x height)",
        f"model:  {args.model} on {models.resolve_encoder(args.encoder)}, {parameters / 1e6:.2f} M parameters"
        + (", pretrained" if args.pretrained or args.weights else ""),
        f"device: {args.device}{processes}; precision {PRECISION[args.amp]}; "
        f"channels-last {'on' if args.channels_last else 'off'}",
        f"output: {args.output}",
    ])


def score_record(scores, class_names, epoch):
    """One validation as plain JSON values (absent classes as null)."""
    def plain(value):
        return None if np.isnan(value) else round(float(value), 6)
    return {"epoch": epoch, "loss": plain(scores["loss"]), "miou": plain(scores["miou"]),
            "iou": {name: plain(value) for name, value in zip(class_names, scores["iou"])},
            "pixel_acc": plain(scores["acc"]), "class_acc": plain(scores["acc_cls"]), "fwiou": plain(scores["fwiou"])}


def earlier_history(path, start_epoch):
    """Validation records of a resumed run from before its resume point: those of the `start_epoch` epochs
    done (records number the epochs from 1)."""
    if start_epoch == 0 or not os.path.isfile(path):
        return []
    with open(path) as f:
        return [record for record in json.load(f) if record["epoch"] <= start_epoch]


def validate(state, loader, class_names, epoch, args, rank, writer, history, mean, std):
    """Score the model and its EMA (when kept) after epoch number `epoch` (from 1), log and record both;
    return the better mIoU and the weights that scored it (None: the model's own)."""
    panels = []
    scores = evaluate(state["model"], loader, state["criterion"], len(class_names), args, rank, panels)
    record, best = score_record(scores, class_names, epoch), (scores["miou"], None)
    teacher = state["teacher"]
    if teacher is not None:
        ema_scores = evaluate(teacher.module, loader, state["criterion"], len(class_names), args, rank)
        record["ema"] = score_record(ema_scores, class_names, epoch)
        if ema_scores["miou"] > scores["miou"]:
            best = (ema_scores["miou"], teacher.module.state_dict())
    if rank == 0:
        log_validation(writer, scores, class_names, epoch, panels, args, mean, std)
        if teacher is not None:
            print(f"EMA of the weights: mIoU {ema_scores['miou']:.4f}")
            writer.add_scalar("val/mIoU_ema", ema_scores["miou"], epoch)
        history.append(record)
    return best


def log_confident_share(confident, class_names, writer, epoch):
    """The share of each class's teacher pixels confident enough to learn from, over the epoch (all processes)."""
    if dist.is_initialized():
        dist.all_reduce(confident.counts)
    shares = confident.shares()
    if writer is not None:
        print("unlabelled pixels the teacher is confident of, by its class:\n"
              + utils.format_class_table(class_names, [("confident", shares)]))
        for name, share in zip(class_names, shares):
            if not np.isnan(share):
                writer.add_scalar(f"unlabeled_confident/{name}", share, epoch)
    confident.reset()


def log_validation(writer, scores, class_names, epoch, panels, args, mean, std):
    print(f"\nepoch {epoch} val loss {scores['loss']:.4f}\n" + utils.format_iou_table(class_names, scores))
    if writer is None:
        return
    writer.add_scalar("val/loss", scores["loss"], epoch)
    writer.add_scalar("val/mIoU", scores["miou"], epoch)
    for name, value in zip(class_names, scores["iou"]):
        if not np.isnan(value):
            writer.add_scalar(f"val_iou/{name}", value, epoch)
    for i, (image, mask, pred) in enumerate(panels[:PANEL_IMAGES]):
        writer.add_image(f"val_panel/{i}", panel(image, mask, pred, len(class_names), mean, std), epoch, dataformats="HWC")


def panel(image, mask, pred, num_classes, mean, std):
    """Image | ground truth overlay | prediction overlay, side by side at the mask's size."""
    rgb = image.float().permute(1, 2, 0).numpy() * np.array(std) + np.array(mean)
    rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    rgb = np.asarray(F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=mask.shape,
                                   mode="bilinear")[0].permute(1, 2, 0).byte())
    return utils.overlay_panel(rgb, [mask.numpy().astype(np.uint8), pred.numpy().astype(np.uint8)], num_classes)


# ---------------------------------------------------------------- main
def default_output(args):
    name = f"{args.model}-{args.encoder}" + (f"-fold{args.fold}" if args.fold is not None else "")
    return os.path.join("runs", name)


def build_model(args, num_classes, local_rank, world_size):
    model = models.create_model(args.model, models.resolve_encoder(args.encoder), num_classes,
                                pretrained=args.pretrained, weights=args.weights, **model_options(args))
    if args.sync_bn and world_size > 1:
        if not args.device.startswith("cuda"):
            raise utils.UserError(f"--sync-bn needs CUDA devices, not --device {args.device}: PyTorch's SyncBatchNorm "
                                  f"has no CPU implementation; drop --sync-bn, or train on GPUs (--device cuda)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(args.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if world_size > 1:
        device_ids = [local_rank] if args.device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if args.compile else model


def build_state(args, model, train_set, num_classes, steps_per_epoch, normalization):
    """What the training steps read and change: model, optimizer, schedule, gradient scaler, loss, counters."""
    optimizer = schedulers.build_optimizer(args.optimizer, model, args.lr, args.weight_decay)
    class_weights = resolve_class_weights(args.class_weights, train_set, num_classes)
    mean, std = (torch.tensor(v, device=args.device).view(1, -1, 1, 1) for v in normalization)
    return {
        "model": model, "optimizer": optimizer, "global_step": 0, "best_miou": -1.0, "skipped_steps": 0,
        # the EMA of the weights: --ema, and the teacher of --unlabeled
        "teacher": semi.ema_teacher(unwrap(model), args.ema_decay) if args.ema or args.unlabeled else None,
        "class_weights": None if class_weights is None else class_weights.to(args.device),
        "normalization": (mean, std), "rampup_steps": round(args.unsup_rampup * steps_per_epoch),
        "confident": semi.ConfidentShare(num_classes, device=args.device),
        "scheduler": schedulers.build_scheduler(
            args.scheduler, optimizer, total_steps=args.epochs * steps_per_epoch,
            warmup_steps=round(args.warmup_epochs * steps_per_epoch),
            cycle_steps=round(args.cycle_epochs * steps_per_epoch) if args.cycle_epochs else None,
            cycle_mult=args.cycle_mult, cycle_decay=args.cycle_decay),
        "scaler": torch.amp.GradScaler(torch.device(args.device).type, enabled=args.amp == "fp16"),
        "criterion": losses.AuxiliaryLoss(
            losses.build_loss(args.loss, num_classes,
                              class_weights=class_weights,
                              label_smoothing=args.label_smoothing, ohem_thresh=args.ohem_thresh,
                              ohem_min_kept=args.ohem_min_kept),
            unwrap(model).aux_weights).to(args.device),
    }


@contextlib.contextmanager
def claim_output(args, rank, world_size):
    """Hold the run folder while the block runs; stop before anything is built when this run would replace
    a run's checkpoints unasked, or when another process writes the folder.

    Rank 0 locks the folder and looks at it (checkpoints live on its disk); every rank stops with its verdict.
    """
    with contextlib.ExitStack() as lock:
        verdict = [None]
        if rank == 0:
            try:
                lock.enter_context(utils.run_folder_lock(args.output))
                verdict[0] = output_refusal(args)
            except utils.UserError as err:  # told to every rank, so none waits for rank 0
                verdict[0] = str(err)
        if world_size > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise utils.UserError(verdict[0])
        yield


def output_refusal(args):
    """Why this run may not start in args.output, or None."""
    if args.resume and args.overwrite:
        return "--resume continues the run in --output and --overwrite deletes it: pass one of them"
    held = [name for name in (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT) if os.path.isfile(os.path.join(args.output, name))]
    if held and not args.resume and not args.overwrite:
        return (f"the run folder {args.output} already holds a run ({', '.join(held)}), so nothing was started. "
                f"Continue it with --resume, replace it with --overwrite, or pass another --output")
    if args.resume == "auto" and utils.LAST_CHECKPOINT not in held:
        return f"--resume: {args.output} holds no last.pt to continue; drop --resume to start a new run there"
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        return f"--resume {args.resume}: no such checkpoint; pass a last.pt path, or --resume alone for {args.output}"
    # a run folder holds one run: a checkpoint of another folder may only start a branch in a folder without one
    if held and args.resume not in (None, "auto"):
        resumed_folder = os.path.dirname(os.path.abspath(args.resume))
        if not os.path.samefile(resumed_folder, args.output):
            return (f"--resume {args.resume} is a checkpoint of the run in {resumed_folder}, but --output "
                    f"{args.output} holds another run ({', '.join(held)}) whose checkpoints and metrics it would "
                    f"replace: pass --output {resumed_folder} to continue that run, or an --output without a run "
                    f"to branch off it")
    return None


def start_run_folder(args):
    """Once the run has passed its checks (rank 0): --overwrite's deletion of the old run's files, then
    args.json and the TensorBoard writer, so a run refused or failed before this leaves the folder as it was."""
    if args.overwrite:
        for name in RUN_FILES:
            path = os.path.join(args.output, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    utils.atomic_write_json(os.path.join(args.output, "args.json"), vars(args))
    return SummaryWriter(os.path.join(args.output, "tb"))


def main(args):
    check_fold_flags(args)
    check_copy_paste_flags(args)
    check_loss_flags(args)
    rank, world_size, local_rank = init_distributed(args.device)
    if args.device == "cuda" and world_size > 1:
        args.device = f"cuda:{local_rank}"
    args.output = args.output or default_output(args)
    with claim_output(args, rank, world_size):
        return run_training(args, rank, world_size, local_rank)


def run_training(args, rank, world_size, local_rank):
    """Checks, build, preflight, then the epochs, in a run folder claim_output holds."""
    checkpoint = None
    if args.resume:
        resume_path = os.path.join(args.output, utils.LAST_CHECKPOINT) if args.resume == "auto" else args.resume
        checkpoint = load_resume_checkpoint(resume_path)
        check_resumable(checkpoint, args, source=resume_path)
    utils.seed_everything(args.seed, args.deterministic)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = not args.deterministic
    if local_rank == 0:  # one demo build per node: nodes may not share disks
        data.prepare_data_root(args.data_root)
    if world_size > 1:
        dist.barrier()
    check_jsons(args)
    mean, std = models.encoder_normalization(models.resolve_encoder(args.encoder))
    train_set, train_mix, val_set = build_datasets(args, mean, std)
    class_names = train_set.class_names
    train_loader, val_loader = build_loaders(args, train_mix, val_set, rank, world_size)
    batches_per_epoch = len(train_loader)
    unlabeled_loader = build_unlabeled_loader(args, val_set, batches_per_epoch, rank, world_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accum_steps)
    model = build_model(args, len(class_names), local_rank, world_size)
    state = build_state(args, model, train_set, len(class_names), steps_per_epoch, (mean, std))
    optimizer = state["optimizer"]
    start_epoch, start_step = 0, 0
    if checkpoint is not None:
        start_epoch, start_step = restore(state, checkpoint, class_names, source=resume_path)
        if rank == 0:
            print(f"resumed from {resume_path} at {describe_position(start_epoch, start_step)}")
            changes = changed_args(checkpoint["args"], args)
            if changes:
                print("warning: these arguments differ from the interrupted run's, so the resumed run will not "
                      "match an uninterrupted one: " + "; ".join(changes))
    if rank == 0:
        print(startup_summary(args, train_set, train_mix, val_set, unlabeled_loader, model, world_size))
    if args.preflight:
        preflight(state["model"], train_mix, val_set, state["criterion"], len(class_names), args, rank, world_size)
    writer = start_run_folder(args) if rank == 0 else None
    history_path = os.path.join(args.output, "metrics.json")
    history = earlier_history(history_path, start_epoch) if rank == 0 else []
    native_size = train_image_size(train_mix)

    def save(name, epoch, step_in_epoch, weights=None):
        check_finite_weights(state["model"], epoch, step_in_epoch)  # on every rank, so all of them stop
        if rank == 0:
            checkpoint = checkpoint_state(state, args, class_names, mean, std, epoch, step_in_epoch, native_size,
                                          weights)
            if name == utils.BEST_CHECKPOINT:
                checkpoint = prediction_checkpoint(checkpoint)
            utils.save_checkpoint(checkpoint, os.path.join(args.output, name))

    def on_step(epoch, step, loss_value):
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, state["global_step"])
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state["global_step"])
        if args.save_every_steps and state["global_step"] % args.save_every_steps == 0 \
                and step % args.accum_steps == 0 and step < batches_per_epoch:
            save(utils.LAST_CHECKPOINT, epoch, step)

    start = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)
            if unlabeled_loader is not None:
                unlabeled_loader.sampler.set_epoch(epoch, skip=start_step * unlabeled_loader.batch_size)
            train_one_epoch(state, train_loader, epoch, start_step, batches_per_epoch, args, rank, on_step,
                            unlabeled_loader)
            if unlabeled_loader is not None:
                log_confident_share(state["confident"], class_names, writer, epoch + 1)
            start_step = 0
            save(utils.LAST_CHECKPOINT, epoch + 1, 0)  # before validating, so a failed validation keeps the epoch
            if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
                miou, weights = validate(state, val_loader, class_names, epoch + 1, args, rank, writer, history,
                                         mean, std)
                if rank == 0:
                    utils.atomic_write_json(history_path, history)
                if miou > state["best_miou"]:
                    state["best_miou"] = miou
                    save(utils.BEST_CHECKPOINT, epoch + 1, 0, weights)
                    save(utils.LAST_CHECKPOINT, epoch + 1, 0)  # the new best mIoU, which a resumed run compares with
    except NonFiniteTraining as err:
        last = os.path.join(args.output, utils.LAST_CHECKPOINT)
        kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was saved yet"
        raise SystemExit(f"stopped: {err}; {kept}. Try a lower --lr, --clip-grad or --amp off.")
    finally:
        if writer is not None:
            writer.close()
    if rank == 0:
        print(f"done in {time.time() - start:.0f} s; best val mIoU {state['best_miou']:.4f}; "
              f"checkpoints in {args.output}" + (f"; fp16 skipped steps {state['skipped_steps']}" if args.amp == "fp16" else ""))
    if world_size > 1:
        dist.destroy_process_group()
    return state["best_miou"]


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
