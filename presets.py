"""Augmentation presets, one small class each, as torchvision's references/segmentation/presets.py has them.

Holds: Preset (the shared tail: `extra` transforms first, the preset's steps, then LutNormalize and a
tensor, in one albumentations Compose that is called and seeded like one), EvalPreset (resize only:
validation, inference and --aug none), LightPreset, StrongPreset, build_transform (a preset by its
--aug name), and the transforms they use that albumentations lacks: RareClassCrop (a random crop that
keeps rare classes) and LutNormalize (A.Normalize through one lookup table).
"""
import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from utils import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, UserError

AUGMENTATIONS = ("none", "light", "strong")
CROP_SCALE = (0.35, 1.0)  # share of the image a random crop covers


def build_transform(preset, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, extra=(), crop_rare=None):
    """The preset named `preset` (one of AUGMENTATIONS, or "eval": the deterministic resize of validation
    and inference); `size=None` keeps the image size. `extra`: transforms run first (copy-paste).
    `crop_rare`: RareClassCrop options (rare_labels, max_ratio); light and strong then crop with it
    (light instead of its plain resize)."""
    if preset not in AUGMENTATIONS + ("eval",):
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {AUGMENTATIONS}")
    if preset in ("none", "eval"):
        if crop_rare is not None:
            raise UserError(f"--crop-rare crops with the light or strong augmentation, not --aug {preset}: pass "
                            f"--aug light or --aug strong, or drop --crop-rare")
        return EvalPreset(size, mean, std, extra)
    return (LightPreset if preset == "light" else StrongPreset)(size, mean, std, extra, crop_rare)


class Preset:
    """`steps` between the `extra` transforms and the normalisation, as one albumentations Compose.

    Called like the Compose (`image=`, `mask=`) and seeded like it (`set_random_seed`), so a dataset
    that draws an augmentation seed per item repeats the same stream for the same seeds.
    """

    def __init__(self, steps, mean, std, extra=()):
        self.transforms = A.Compose([*extra, *steps, LutNormalize(mean=mean, std=std), ToTensorV2()])

    def __call__(self, **data):
        return self.transforms(**data)

    def set_random_seed(self, seed):
        self.transforms.set_random_seed(seed)


class EvalPreset(Preset):
    """A resize to size x size (none when `size` is None), then normalisation."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, extra=()):
        super().__init__(resize(size), mean, std, extra)


class LightPreset(Preset):
    """A resize (or a rare-class crop), a horizontal flip, a mild affine warp, brightness and contrast."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, extra=(), crop_rare=None):
        first = resize(size) if crop_rare is None else [random_crop(size, crop_rare)]
        super().__init__([
            *first,
            A.HorizontalFlip(),
            A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-15, 15), fill_mask=IGNORE_INDEX, p=0.5),
            A.RandomBrightnessContrast(p=0.5),
        ], mean, std, extra)


class StrongPreset(Preset):
    """A random crop (or a rare-class crop), flips and quarter turns, colour jitter, blur or noise."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, extra=(), crop_rare=None):
        super().__init__([
            random_crop(size, crop_rare),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.RandomRotate90(),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        ], mean, std, extra)


def resize(size):
    return [] if size is None else [A.Resize(size, size)]


def random_crop(size, crop_rare=None):
    """A random size x size crop covering CROP_SCALE of the image; a RareClassCrop with `crop_rare`, its options."""
    if crop_rare is None:
        return A.RandomResizedCrop(size=(size, size), scale=CROP_SCALE)
    return RareClassCrop(size=(size, size), scale=CROP_SCALE, **crop_rare)


class RareClassCrop(A.RandomResizedCrop):
    """RandomResizedCrop that retries so that the crop is not one class and keeps a rare class.

    Up to `tries` candidate crops are drawn; the first is taken in which no class covers more
    than `max_ratio` of the labelled pixels (MMSegmentation's cat_max_ratio; 255 not counted)
    and which holds a pixel of `rare_labels` whenever the image does. If none qualifies, the
    candidate holding a rare class with the smallest largest-class share is taken. All draws
    come from the transform's own generators, so `Compose.set_random_seed` makes it repeatable.
    """

    def __init__(self, size, scale=(0.35, 1.0), rare_labels=(), max_ratio=0.75, tries=10, p=1.0):
        super().__init__(size=size, scale=scale, p=p)
        if not 0 < max_ratio <= 1:
            raise UserError(f"--crop-max-ratio must be above 0 and at most 1, not {max_ratio}: it is the largest "
                            f"share of a crop's labelled pixels one class may cover (e.g. 0.75)")
        if tries < 1:
            raise ValueError(f"RareClassCrop needs tries >= 1, got {tries}")
        self.rare_labels, self.max_ratio, self.tries = np.array(sorted(rare_labels), dtype=np.int64), max_ratio, tries

    def get_params_dependent_on_data(self, params, data):
        mask = data.get("mask")
        if mask is None:
            return super().get_params_dependent_on_data(params, data)
        has_rare = self._holds_rare(np.bincount(mask.ravel(), minlength=256))
        best = None
        for _ in range(self.tries):
            crop = super().get_params_dependent_on_data(params, data)
            x_min, y_min, x_max, y_max = crop["crop_coords"]
            counts = np.bincount(mask[y_min:y_max, x_min:x_max].ravel(), minlength=256)
            score = (self._holds_rare(counts) or not has_rare, -self._largest_share(counts))
            if score[0] and -score[1] <= self.max_ratio:
                return crop
            if best is None or score > best[0]:
                best = score, crop
        return best[1]

    def _holds_rare(self, counts):
        return bool(counts[self.rare_labels].any())

    @staticmethod
    def _largest_share(counts):
        labelled = counts[:IGNORE_INDEX]
        return labelled.max() / max(labelled.sum(), 1)




class LutNormalize(A.Normalize):
    """A.Normalize with one multi-channel lookup table for uint8 colour images.

    The table is A.Normalize's own output on the 256 levels, so values are
    identical; one cv2.LUT call replaces a LUT per channel plus a merge (several times faster).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tables = {}  # channel count -> (256, 1, channels) float32 table

    def apply(self, img, **params):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] == 1 or self.normalization != "standard":
            return super().apply(img, **params)
        channels = img.shape[2]
        if channels not in self._tables:
            levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), channels, axis=2)
            self._tables[channels] = super().apply(levels, **params)
        return cv2.LUT(img, self._tables[channels])

