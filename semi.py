"""Learning from unlabelled photos inside the training loop (weak-to-strong consistency).

Holds the pieces train.py composes for `--unlabeled` and `--ema`:
- the EMA teacher (timm's ModelEmaV3: weights and buffers, with a decay warm-up);
- the unlabelled photo stream: a dataset of weak views (crop, flip, resize) and a sampler that
  continues through reshuffled passes of the set, resumable mid-epoch and sharded across processes;
- the strong views: colour jitter, grey and blur per image, then CutMix between the batch's images;
- pseudo-labels: the teacher's class where its probability reaches the confidence threshold, 255 elsewhere;
- the unsupervised loss and its ramp-up, and the per-class share of confident pixels.

The method follows FixMatch (Sohn et al. 2020) as UniMatch (Yang et al. 2023) applies it to
segmentation: the teacher labels the weak view, the student learns those labels on a strong view
whose CutMix boxes carry their pseudo-labels with them.
"""
import contextlib
import math

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from timm.utils import ModelEmaV3
from torchvision.transforms import v2

import coco_utils
import dataset as data
import images as imaging
import loss as losses
import utils

CUTMIX_P = 0.5  # share of unlabelled images that get a box of another image pasted in
CUTMIX_AREA = (0.02, 0.4)  # the box's share of the image, drawn uniformly (UniMatch's range)


# ---------------------------------------------------------------- EMA teacher
def ema_teacher(model, decay):
    """timm's EMA of the student's weights and buffers: e <- d * e + (1 - d) * w after each optimizer step.

    d warms up as 1 - (1 + step)^(-2/3), capped at `decay`, so a short run's teacher follows the
    student closely at first instead of staying near its random start; update(model, step) takes
    the global step, so a resumed run needs no state beyond the teacher's weights.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=True)


# ---------------------------------------------------------------- unlabelled stream
def weak_view_transform(size):
    """The teacher's view of an unlabelled photo: a random crop and flip at `size`, uint8 C x H x W."""
    return A.Compose([A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0)), A.HorizontalFlip(), ToTensorV2()])


def find_unlabeled(paths, max_pixels):
    """(image records, reasons skipped) of the photos that folders (recursively), globs, files and
    COCO jsons (their images; labels, if any, unread) name; unreadable headers skipped and counted."""
    return imaging.readable_images(coco_utils.find_photos(paths), max_pixels, paths)


class UnlabeledDataset(torch.utils.data.Dataset):
    """Photos without labels as weak views, indexed by `(index, augmentation seed)` like the training sets.

    A photo that fails to decode during training is replaced by the next readable one, so one bad
    file among thousands does not stop a run; the header scan has already skipped most of them.
    """

    def __init__(self, images, size, max_pixels):
        self.images, self.max_pixels = images, max_pixels
        self.transform = weak_view_transform(size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index = data.seeded_index(key, self.transform)
        for offset in range(len(self)):
            path = self.images[(index + offset) % len(self)]["path"]
            try:
                image = imaging.read_image(path, max_pixels=self.max_pixels)
            except utils.UserError as err:
                print(f"skipped: {err}")
                continue
            return self.transform(image=image)["image"]
        raise utils.UserError("none of the --unlabeled photos can be read any more")


class UnlabeledStreamSampler(torch.utils.data.Sampler):
    """`per_epoch` unlabelled keys per process and labelled epoch, continuing through reshuffled passes.

    Position p of the whole run's stream (all processes interleaved: p * replicas + rank) falls in
    pass p // n, which has its own permutation; so the stream depends only on (seed, epoch, skip),
    resumes mid-epoch exactly, and processes draw disjoint images within a pass.
    """

    def __init__(self, size, per_epoch, num_replicas=1, rank=0, seed=0):
        self.size, self.per_epoch = size, per_epoch
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        permutations = {}
        for position in range(self.epoch * self.per_epoch + self.skip, (self.epoch + 1) * self.per_epoch):
            passes, offset = divmod(position * self.num_replicas + self.rank, self.size)
            if passes not in permutations:
                permutations = {passes: np.random.default_rng([self.seed, passes]).permutation(self.size)}
            index = int(permutations[passes][offset])
            yield index, data.augmentation_seed(self.seed, passes, index, 1)

    def __len__(self):
        return self.per_epoch - self.skip


# ---------------------------------------------------------------- strong views
# Hue moves as little as the labelled presets' (0.03): colour tells classes apart (brown paper, green
# glass), and UniMatch's 0.25 turns one class's colour into another's.
STRONG_PHOTOMETRIC = v2.Compose([
    v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.03)], p=0.8),
    v2.RandomGrayscale(p=0.2),
    v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
])


def strong_photometric(images):
    """Each float [0, 1] N x 3 x H x W image jittered on its own (torch's RNG, saved by checkpoints)."""
    return torch.stack([STRONG_PHOTOMETRIC(image) for image in images])


def cutmix_boxes(n, height, width, generator=None, p=CUTMIX_P, area=CUTMIX_AREA):
    """N x H x W bool: for each image with probability p, a box of a random share `area` of it, any aspect."""
    boxes = torch.zeros(n, height, width, dtype=torch.bool)
    for box in boxes:
        if torch.rand((), generator=generator) >= p:
            continue
        share = float(torch.empty(()).uniform_(*area, generator=generator))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)))
        h = min(height, max(1, round(math.sqrt(share * height * width / aspect))))
        w = min(width, max(1, round(math.sqrt(share * height * width * aspect))))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        box[top:top + h, left:left + w] = True
    return boxes


def cutmix(images, labels, boxes):
    """Paste into image i, inside its box, image i+1 (the last takes the first) and its labels alike.

    images N x C x H x W, labels N x H x W (pseudo-labels or confidences), boxes N x H x W bool.
    """
    boxes = boxes.to(images.device)
    mixed_images = torch.where(boxes[:, None], images.roll(-1, dims=0), images)
    mixed_labels = torch.where(boxes, labels.roll(-1, dims=0), labels)
    return mixed_images, mixed_labels


@contextlib.contextmanager
def running_stats_frozen(model):
    """BatchNorm layers normalise by the batch's statistics but leave their running ones unchanged.

    The running statistics are what evaluation and the EMA teacher normalise by: they should describe
    photos as they come, not the strong views' jittered, greyed and blurred ones.
    """
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(layer.momentum, layer.num_batches_tracked.clone()) for layer in layers]
    for layer in layers:
        layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for layer, (momentum, tracked) in zip(layers, saved):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)  # read by momentum=None layers


# ---------------------------------------------------------------- pseudo-labels and their loss
def pseudo_labels(logits, threshold, class_weights=None):
    """N x C x H x W teacher logits -> (N x H x W labels, 255 where the top probability < threshold; the labels before the mask).

    With the class weights the teacher learnt with, its probabilities are taken without them
    (loss.undo_class_weights), so the threshold means the same for every class.
    """
    probs = logits.float().softmax(1)
    if class_weights is not None:
        probs = losses.undo_class_weights(probs, class_weights)
    confidence, labels = probs.max(1)
    return labels.masked_fill(confidence < threshold, utils.IGNORE_INDEX), labels


def unsupervised_loss(logits, targets, class_weights=None):
    """Cross-entropy on the confident pixels, summed and divided by all pixels.

    Dividing by every pixel, not the confident ones, makes the term grow as the teacher grows
    sure of more pixels instead of letting a few confident pixels weigh as much as a whole image.
    """
    loss = F.cross_entropy(logits.float(), targets, weight=class_weights, ignore_index=utils.IGNORE_INDEX,
                           reduction="sum")
    return loss / targets.numel()


def rampup(step, rampup_steps):
    """exp(-5 (1 - t)^2) for t = step / rampup_steps up to 1 (Laine and Aila's sigmoid ramp-up)."""
    if rampup_steps <= 0:
        return 1.0
    t = min(1.0, step / rampup_steps)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class ConfidentShare:
    """Per class: pixels the teacher predicts as it, and those of them at or above the threshold."""

    def __init__(self, num_classes, device=None):
        self.counts = torch.zeros(2, num_classes, dtype=torch.int64, device=device)

    def update(self, masked, labels):
        n = self.counts.shape[1]
        self.counts[0] += torch.bincount(labels.reshape(-1), minlength=n)[:n]
        kept = masked[masked != utils.IGNORE_INDEX]
        self.counts[1] += torch.bincount(kept.reshape(-1), minlength=n)[:n]

    def shares(self):
        """Confident share per class (NaN where the teacher never predicted the class)."""
        predicted, confident = self.counts.double().cpu().numpy()
        with np.errstate(invalid="ignore"):
            return confident / predicted

    def reset(self):
        self.counts.zero_()
