"""Segmentation losses and their weighted sums, chosen by a spec string such as "ce:1,dice:0.5".

Every loss takes logits (N, C, H, W) and a long target (N, H, W) and returns a scalar.
Pixels equal to `ignore_index` contribute nothing and get zero gradient; a batch in
which every pixel is ignored gives 0, never NaN.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

LOSS_NAMES = ("ce", "dice", "focal", "lovasz", "ohem")


def _one_hot(labels, num_classes, dim):
    """Boolean one-hot along a new axis `dim`; labels outside 0..C-1 (ignored pixels) get no class."""
    classes = torch.arange(num_classes, device=labels.device)
    shape = [1] * (labels.ndim + 1)
    shape[dim] = num_classes
    return labels.unsqueeze(dim) == classes.view(shape)


def _mean_weight(target, weight, ignore_index):
    """What torch's mean reduction divides by: the count of kept pixels, or their summed class weight.

    Where that is 0 the divisor is 1 instead, so an all-ignored batch gives 0 and finite gradients.
    """
    kept = target != ignore_index
    if weight is None:
        total = kept.sum()
    else:
        total = (weight[target.where(kept, 0)] * kept).sum()
    return torch.where(total > 0, total, 1)


def _mean_over_present(per_class, present):
    """Mean of per-class losses over the present classes; 0 when no class is present."""
    return (per_class * present).sum() / present.sum().clamp_min(1)


class CELoss(nn.Module):
    """Cross-entropy with class weights, label smoothing and ignored pixels, as F.cross_entropy computes it."""

    def __init__(self, weight=None, ignore_index=255, label_smoothing=0.0):
        super().__init__()
        if not 0 <= label_smoothing <= 1:
            raise UserError(f"--label-smoothing must be in [0, 1], not {label_smoothing}: it is the probability "
                            f"spread over the other classes (0: none, e.g. 0.1)")
        self.register_buffer("weight", weight, persistent=False)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits, target):
        # Summing then dividing equals torch's mean reduction, without its 0/0 on all-ignored batches.
        total = F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                                label_smoothing=self.label_smoothing, reduction="sum")
        return total / _mean_weight(target, self.weight, self.ignore_index)


class OhemCELoss(CELoss):
    """Cross-entropy over the hard pixels only: online hard example mining (MMSegmentation's OHEMPixelSampler).

    A pixel is kept when the softmax probability of its true class is under `thresh`; when fewer
    than `min_kept` per image (times the batch size) are, that many least confident pixels are
    kept instead (all of them when the batch has fewer). The loss is CELoss over the kept pixels
    (their weighted mean), so class weights and label smoothing apply as in ce. Unlike MMSeg,
    which averages over every pixel, the dropped ones do not dilute the mean.
    """

    def __init__(self, weight=None, ignore_index=255, label_smoothing=0.0, thresh=0.7, min_kept=10000):
        super().__init__(weight, ignore_index, label_smoothing)
        if not 0 < thresh <= 1 or min_kept < 0:
            raise UserError(f"--loss ohem needs --ohem-thresh in (0, 1] and --ohem-min-kept >= 0, not {thresh} and "
                            f"{min_kept}: it trains on pixels whose true-class probability is under --ohem-thresh")
        self.thresh, self.min_kept = thresh, min_kept

    def forward(self, logits, target):
        return super().forward(logits, self.hard_target(logits, target))

    @torch.no_grad()
    def hard_target(self, logits, target):
        """`target` with every pixel that is not kept set to ignore_index."""
        valid = target != self.ignore_index
        true_prob = logits.softmax(1).gather(1, target.where(valid, 0).unsqueeze(1)).squeeze(1)
        kept = valid & (true_prob < self.thresh)
        want = min(self.min_kept * len(target), int(valid.sum()))
        if kept.sum() < want:
            hardest = true_prob.where(valid, math.inf).flatten().topk(want, largest=False).indices
            kept = torch.zeros_like(kept).flatten().index_fill_(0, hardest, True).view_as(kept)
        return target.where(kept, self.ignore_index)


class FocalLoss(nn.Module):
    """Softmax focal loss -alpha[t] (1 - p_t)^gamma log p_t (Lin et al. 2017).

    Averaged like weighted cross-entropy (divided by the summed alpha of kept pixels), so
    gamma=0 gives exactly CELoss with weight=alpha.
    """

    def __init__(self, gamma=2.0, alpha=None, ignore_index=255):
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer("alpha", alpha, persistent=False)
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        log_probs = logits.log_softmax(1)
        # The floor keeps the gradient of x**gamma finite at x = 0 when 0 < gamma < 1.
        modulation = (1 - log_probs.exp()).clamp_min(torch.finfo(log_probs.dtype).tiny).pow(self.gamma)
        total = F.nll_loss(modulation * log_probs, target, weight=self.alpha,
                           ignore_index=self.ignore_index, reduction="sum")
        return total / _mean_weight(target, self.alpha, self.ignore_index)


class DiceLoss(nn.Module):
    """1 - soft Dice of the softmax probabilities, per class over the whole batch.

    Dice_c = (2 sum(p_c g_c) + smooth) / (sum(p_c) + sum(g_c) + smooth). The mean runs over
    classes present in the target or in the argmax prediction, so absent classes neither
    dilute the loss nor hide false positives. smooth=1 is negligible against batch-wide
    pixel sums and keeps every ratio defined. Class weights are not used.
    """

    def __init__(self, ignore_index=255, smooth=1.0):
        super().__init__()
        if not smooth > 0:
            raise ValueError(f"dice smooth must be > 0, got {smooth}")
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits, target):
        num_classes = logits.shape[1]
        kept = (target != self.ignore_index).unsqueeze(1)
        probs = logits.softmax(1) * kept
        truth = _one_hot(target, num_classes, dim=1)
        predicted = _one_hot(logits.argmax(1), num_classes, dim=1) & kept
        sum_dims = (0, 2, 3)
        truth_count = truth.sum(sum_dims)
        intersection = (probs * truth).sum(sum_dims)
        dice = (2 * intersection + self.smooth) / (probs.sum(sum_dims) + truth_count + self.smooth)
        present = (truth_count > 0) | (predicted.sum(sum_dims) > 0)
        return _mean_over_present(1 - dice, present)


def _lovasz_gradient(truth_sorted):
    """Per-position gradient of the Lovasz extension of the Jaccard loss, one class per row.

    Row entries are the ground truth (0/1) of pixels sorted by decreasing error.
    """
    positives = truth_sorted.sum(1, keepdim=True)
    intersection = positives - truth_sorted.cumsum(1)
    union = positives + (1 - truth_sorted).cumsum(1)
    jaccard = 1 - intersection / union
    return jaccard.diff(dim=1, prepend=jaccard.new_zeros(len(jaccard), 1))


class LovaszLoss(nn.Module):
    """Lovasz-softmax (Berman et al. 2018) over the whole batch, averaged over classes present in the target.

    Class weights are not used.
    """

    def __init__(self, ignore_index=255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        num_classes = logits.shape[1]
        probs = logits.softmax(1).movedim(1, -1).reshape(-1, num_classes)
        labels = target.reshape(-1)
        kept = labels != self.ignore_index
        probs, labels = probs[kept].T, labels[kept]
        truth = _one_hot(labels, num_classes, dim=0).to(probs.dtype)
        errors, order = (truth - probs).abs().sort(1, descending=True)
        truth_sorted = truth.gather(1, order)
        per_class = (errors * _lovasz_gradient(truth_sorted)).sum(1)
        return _mean_over_present(per_class, truth.sum(1) > 0)


class WeightedSumLoss(nn.Module):
    """Sum of named losses times their weights, computed in float32 whatever the autocast dtype."""

    def __init__(self, weighted_terms):
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, (_, term) in weighted_terms.items()})
        self.weights = {name: weight for name, (weight, _) in weighted_terms.items()}

    def forward(self, logits, target):
        logits = logits.float()
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())


class AuxiliaryLoss(nn.Module):
    """`loss` of the main logits plus weighted `loss` of the auxiliary outputs.

    Models with auxiliary heads (UperNet's FCN head, UNet++ deep supervision) return
    [logits, aux_1, ...] in train mode and the logits alone in eval mode, which get the
    main loss alone; `aux_weights` is the model's own list, one weight per aux output.
    """

    def __init__(self, loss, aux_weights=()):
        super().__init__()
        self.loss = loss
        self.aux_weights = tuple(aux_weights)

    def forward(self, outputs, target):
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        logits, *aux = outputs
        if len(aux) != len(self.aux_weights):
            raise ValueError(f"the model returned {len(aux)} auxiliary outputs, the loss has "
                             f"{len(self.aux_weights)} weights for them")
        return self.loss(logits, target) + sum(w * self.loss(a, target) for w, a in zip(self.aux_weights, aux))


def parse_loss_spec(spec):
    """'ce:1,dice:0.5' -> {'ce': 1.0, 'dice': 0.5}; a name without ':weight' has weight 1.

    A bad spec is a UserError naming train.py's --loss, the bad part and the valid names.
    """
    valid = f"valid names: {', '.join(LOSS_NAMES)}; write e.g. --loss ce:1,dice:0.5"
    weights = {}
    for part in spec.split(","):
        name, has_weight, weight_text = (s.strip() for s in part.partition(":"))
        if name not in LOSS_NAMES:
            raise UserError(f"--loss {spec!r}: unknown loss {name!r}; {valid}")
        if name in weights:
            raise UserError(f"--loss {spec!r}: loss {name!r} appears twice; {valid}")
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"--loss {spec!r}: bad weight in {part.strip()!r}, which must be a positive number; {valid}")
        weights[name] = weight
    return weights


def check_class_weights(class_weights):
    """A UserError naming --class-weights unless every weight is a finite number >= 0."""
    weight = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if not (torch.isfinite(weight).all() and (weight >= 0).all()):
        raise UserError(f"--class-weights: class weights must be finite and >= 0, not {weight.tolist()}: pass one "
                        f"weight per class (e.g. 0.5,1,2), or --class-weights auto")
    return weight


def _class_weight_tensor(class_weights, num_classes):
    if class_weights is None:
        return None
    weight = check_class_weights(class_weights)
    if len(weight) != num_classes:
        raise ValueError(f"got {len(weight)} class weights for {num_classes} classes")
    return weight


def build_loss(spec, num_classes, class_weights=None, ignore_index=255, label_smoothing=0.0, focal_gamma=2.0,
               ohem_thresh=0.7, ohem_min_kept=10000):
    """The weighted sum of losses named in `spec` (see parse_loss_spec).

    `class_weights` (length num_classes) weight ce and ohem and are focal's per-class alpha; dice and
    lovasz ignore them. `label_smoothing` applies to ce and ohem, `focal_gamma` to focal,
    `ohem_thresh` and `ohem_min_kept` (pixels per image) to ohem.
    """
    weight = _class_weight_tensor(class_weights, num_classes)
    makers = {
        "ce": lambda: CELoss(weight, ignore_index, label_smoothing),
        "dice": lambda: DiceLoss(ignore_index),
        "focal": lambda: FocalLoss(focal_gamma, weight, ignore_index),
        "lovasz": lambda: LovaszLoss(ignore_index),
        "ohem": lambda: OhemCELoss(weight, ignore_index, label_smoothing, ohem_thresh, ohem_min_kept),
    }
    return WeightedSumLoss({name: (w, makers[name]()) for name, w in parse_loss_spec(spec).items()})


def undo_class_weights(probs, class_weights, dim=1):
    """The class probabilities p behind what a model trained with class-weighted cross-entropy predicts.

    Such a model learns q_c = w_c p_c / sum_k w_k p_k, which is what class weights are for (the
    argmax leans to the rare classes), but its confidence understates the common ones: Background,
    whose weight is the smallest, may never reach a high threshold however sure the model is.
    Pseudo-labels threshold p = (q_c / w_c) / sum_k (q_k / w_k) instead.
    """
    shape = [1] * probs.dim()
    shape[dim] = -1
    unweighted = probs / class_weights.to(probs).view(shape)
    return unweighted / unweighted.sum(dim, keepdim=True)


def auto_class_weights(pixel_counts, max_ratio=10.0):
    """Class weights from per-class pixel counts: 1/sqrt(frequency), capped, mean 1 over present classes.

    The square root tempers the imbalance (a class 100x rarer gets 10x the weight). No weight
    exceeds `max_ratio` times the smallest, so near-absent classes cannot dominate the loss;
    a class with no counted pixel is treated as the rarest and gets that cap.
    """
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64).flatten()
    if not (torch.isfinite(counts).all() and (counts >= 0).all() and counts.sum() > 0):
        raise ValueError(f"pixel counts must be finite, >= 0 and not all 0, got {counts.tolist()}")
    present = counts > 0
    inverse_sqrt = counts.rsqrt()  # inf for absent classes, capped next
    capped = inverse_sqrt.clamp(max=max_ratio * inverse_sqrt[present].min())
    return (capped / capped[present].mean()).float()
