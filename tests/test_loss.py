import math

import pytest
import torch
import torch.nn.functional as F

from loss import (LOSS_NAMES, CELoss, DiceLoss, FocalLoss, LovaszLoss, auto_class_weights, build_loss,
                  parse_loss_spec)

IGNORE = 255


def logits_from_probs(*pixel_probs):
    """Logits (1, C, 1, P) whose softmax at pixel i is pixel_probs[i]."""
    return torch.tensor(pixel_probs, dtype=torch.float32).log().T.reshape(1, len(pixel_probs[0]), 1, -1)


def two_pixels():
    """Pixel A: p = (3/4, 1/4), label 0. Pixel B: p = (1/2, 1/2), label 1."""
    return logits_from_probs((0.75, 0.25), (0.5, 0.5)), torch.tensor([[[0, 1]]])


def random_batch(seed=0, num_classes=4, ignored_fraction=0.25):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 3, 4, generator=generator)
    target = torch.randint(0, num_classes, (2, 3, 4), generator=generator)
    target[torch.rand(target.shape, generator=generator) < ignored_fraction] = IGNORE
    return logits, target


def value(loss_fn, logits, target):
    return loss_fn(logits, target).item()


# Cross-entropy

def test_ce_known_answer():
    logits, target = two_pixels()
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert value(build_loss("ce", 2), logits, target) == pytest.approx(expected, rel=1e-6)


def test_ce_class_weights_give_weighted_mean():
    logits, target = two_pixels()
    expected = (1 * math.log(4 / 3) + 3 * math.log(2)) / (1 + 3)
    assert value(build_loss("ce", 2, class_weights=[1.0, 3.0]), logits, target) == pytest.approx(expected, rel=1e-6)


def test_ce_label_smoothing_known_answer():
    # Per pixel: (1 - e) * -log p_label + e / C * sum_c -log p_c, with e = 0.2, C = 2.
    logits, target = two_pixels()
    pixel_a = 0.8 * math.log(4 / 3) + 0.1 * (math.log(4 / 3) + math.log(4))
    pixel_b = 0.8 * math.log(2) + 0.1 * (2 * math.log(2))
    loss_fn = build_loss("ce", 2, label_smoothing=0.2)
    assert value(loss_fn, logits, target) == pytest.approx((pixel_a + pixel_b) / 2, rel=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight", [None, [0.5, 2.0, 1.0, 3.0]])
def test_ce_matches_torch_mean_reduction(weight, label_smoothing):
    logits, target = random_batch()
    expected = F.cross_entropy(logits, target, weight=None if weight is None else torch.tensor(weight),
                               ignore_index=IGNORE, label_smoothing=label_smoothing)
    loss_fn = CELoss(None if weight is None else torch.tensor(weight), IGNORE, label_smoothing)
    assert value(loss_fn, logits, target) == pytest.approx(expected.item(), rel=1e-5)


# Focal

def test_focal_known_answer():
    # -(1 - p_label)^2 log p_label per pixel: A (1/4)^2 log(4/3), B (1/2)^2 log 2.
    logits, target = two_pixels()
    expected = ((1 / 4) ** 2 * math.log(4 / 3) + (1 / 2) ** 2 * math.log(2)) / 2
    assert value(build_loss("focal", 2, focal_gamma=2.0), logits, target) == pytest.approx(expected, rel=1e-6)


def test_focal_alpha_known_answer():
    logits, target = two_pixels()
    expected = (1 * (1 / 4) ** 2 * math.log(4 / 3) + 3 * (1 / 2) ** 2 * math.log(2)) / (1 + 3)
    loss_fn = build_loss("focal", 2, class_weights=[1.0, 3.0], focal_gamma=2.0)
    assert value(loss_fn, logits, target) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weight", [None, [0.5, 2.0, 1.0, 3.0]])
def test_focal_with_gamma_zero_equals_ce(weight):
    logits, target = random_batch()
    focal = build_loss("focal", 4, class_weights=weight, focal_gamma=0.0)
    ce = build_loss("ce", 4, class_weights=weight)
    assert value(focal, logits, target) == pytest.approx(value(ce, logits, target), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_scales_each_pixels_ce_by_one_minus_p_to_the_gamma(gamma):
    # a confident pixel (p_label = 0.9) and an unconfident one (p_label = 0.2), labelled class 0 of 3
    ratios = {}
    for p in (0.9, 0.2):
        logits, target = logits_from_probs((p, (1 - p) / 2, (1 - p) / 2)), torch.tensor([[[0]]])
        focal = value(build_loss("focal", 3, focal_gamma=gamma), logits, target)
        ce = value(build_loss("ce", 3), logits, target)
        assert ce == pytest.approx(-math.log(p), rel=1e-6)
        ratios[p] = focal / ce
        assert ratios[p] == pytest.approx((1 - p) ** gamma, rel=1e-5)
    assert ratios[0.9] < ratios[0.2]  # the confident pixel is down-weighted more


def test_focal_gradient_finite_for_fractional_gamma_on_saturated_pixel():
    """Pixel 0's p_label rounds to exactly 1, where d (1 - p)^0.5 / dp is infinite; its gradient is the formula's all
    the same (about 0: written with 1 - p_label as the other class's probability, 4e-44, it has no rounding), and
    pixel 1's is the formula's."""
    logits = torch.tensor([[[[100.0, 1.0]], [[0.0, 0.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 0]]])
    FocalLoss(gamma=0.5)(logits, target).backward()
    reference = logits.detach().double().requires_grad_()
    (-reference.softmax(1)[:, 1].pow(0.5) * reference.log_softmax(1)[:, 0]).mean().backward()
    assert torch.isfinite(logits.grad).all() and reference.grad.abs().max() > 0.05
    torch.testing.assert_close(logits.grad, reference.grad.float(), rtol=1e-5, atol=1e-7)


def test_focal_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)


# Dice

def test_dice_known_answer():
    # smooth = 1. Class 0: I = 3/4, sum p = 3/4 + 1/2, sum g = 1 -> (2*3/4 + 1) / (5/4 + 1 + 1) = 10/13.
    # Class 1: I = 1/2, sum p = 1/4 + 1/2, sum g = 1 -> (2*1/2 + 1) / (3/4 + 1 + 1) = 8/11.
    logits, target = two_pixels()
    expected = 1 - (10 / 13 + 8 / 11) / 2
    assert value(build_loss("dice", 2), logits, target) == pytest.approx(expected, rel=1e-6)


def test_dice_averages_over_classes_in_target_or_prediction():
    # One pixel, label 0, p = (1/4, 3/4, 0): class 1 is predicted, class 2 is absent everywhere.
    # Class 0: (2/4 + 1) / (1/4 + 1 + 1) = 2/3. Class 1: (0 + 1) / (3/4 + 0 + 1) = 4/7.
    logits = torch.tensor([[[[0.0]], [[math.log(3)]], [[-1e4]]]])
    expected = 1 - (2 / 3 + 4 / 7) / 2
    assert value(DiceLoss(), logits, torch.tensor([[[0]]])) == pytest.approx(expected, rel=1e-6)


def test_dice_perfect_prediction_is_near_zero():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = 50 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert value(DiceLoss(), logits, target) == pytest.approx(0.0, abs=1e-6)


def test_dice_rejects_nonpositive_smooth():
    with pytest.raises(ValueError, match="smooth"):
        DiceLoss(smooth=0.0)


# Lovasz-softmax

def test_lovasz_known_answer():
    # Class 0: errors B 0.3 (label 1), A 0.2 (label 0). Jaccard loss |M| / |G u M| with G = {A}:
    #   {B} -> 1/2, {B, A} -> 1, so 0.3 * 1/2 + 0.2 * (1 - 1/2) = 0.25.
    # Class 1: errors B 0.3 (label 1), A 0.2 (label 0). G = {B}: {B} -> 1, {B, A} -> 1, so 0.3 * 1 + 0.2 * 0 = 0.3.
    logits = logits_from_probs((0.8, 0.2), (0.3, 0.7))
    target = torch.tensor([[[0, 1]]])
    assert value(build_loss("lovasz", 2), logits, target) == pytest.approx((0.25 + 0.3) / 2, rel=1e-6)


def jaccard_loss(truth, wrong):
    """1 - IoU of the prediction whose mistakes are `wrong`: |wrong| / |truth u wrong|."""
    return wrong.sum().item() / (truth | wrong).sum().item()


def lovasz_by_threshold_integral(logits, target):
    """Lovasz extension as the integral over t of the Jaccard loss of {pixels with error > t}."""
    probs = logits.softmax(1).movedim(1, -1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    probs, labels = probs[labels != IGNORE], labels[labels != IGNORE]
    per_class = []
    for c in labels.unique().tolist():
        truth = labels == c
        errors = (truth.double() - probs[:, c]).abs()
        levels = sorted(set(errors.tolist()) | {0.0})
        per_class.append(sum((high - low) * jaccard_loss(truth, errors >= high)
                             for low, high in zip(levels, levels[1:])))
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_threshold_integral(seed):
    logits, target = random_batch(seed, num_classes=5)
    logits = logits.double()
    assert value(LovaszLoss(), logits, target) == pytest.approx(lovasz_by_threshold_integral(logits, target), rel=1e-9)


def test_lovasz_perfect_prediction_is_near_zero():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = 50 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert value(LovaszLoss(), logits, target) == pytest.approx(0.0, abs=1e-6)


# Every term: ignored pixels, gradients, class weights

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_pixels_change_nothing_and_get_no_gradient(name):
    logits, target = random_batch()
    target[target == 3] = 0
    logits[:, 3] = -5.0  # class 3 is neither labelled nor predicted at kept pixels
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    loss_fn = build_loss(name, 4)
    other = logits.clone()
    other[:, 3][target == IGNORE] = 30.0  # ignored pixels now confidently predict class 3
    other = other.requires_grad_()
    loss = loss_fn(other, target)
    loss.backward()
    assert loss.item() == pytest.approx(value(loss_fn, logits, target), rel=1e-6)
    assert (other.grad[ignored] == 0).all()
    assert other.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("spec", [*LOSS_NAMES, "ce:1,dice:1,focal:1,lovasz:1"])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(spec):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = build_loss(spec, 3, class_weights=[1.0, 2.0, 3.0], label_smoothing=0.1)(
        logits, torch.full((2, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_descent_lowers_each_loss(name):
    logits, target = random_batch()
    logits.requires_grad_()
    loss_fn = build_loss(name, 4)
    before = loss_fn(logits, target)
    before.backward()
    with torch.no_grad():
        after = loss_fn(logits - 0.5 * logits.grad, target)
    assert after < before


@pytest.mark.parametrize("name", ["dice", "lovasz"])
def test_dice_and_lovasz_ignore_class_weights(name):
    logits, target = random_batch()
    weighted = build_loss(name, 4, class_weights=[0.1, 5.0, 1.0, 2.0])
    assert value(weighted, logits, target) == value(build_loss(name, 4), logits, target)


def test_half_precision_logits_are_computed_in_float32():
    logits, target = random_batch()
    loss = build_loss("ce:1,dice:1,focal:1,lovasz:1", 4)(logits.half(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(value(build_loss("ce:1,dice:1,focal:1,lovasz:1", 4), logits, target),
                                        rel=1e-2)


# Spec parsing and combination

def test_parse_loss_spec():
    assert parse_loss_spec("ce") == {"ce": 1.0}
    assert parse_loss_spec("ce:1, dice:0.5") == {"ce": 1.0, "dice": 0.5}
    assert parse_loss_spec("focal:2,lovasz") == {"focal": 2.0, "lovasz": 1.0}


@pytest.mark.parametrize("spec, bad_part", [
    ("bce", "'bce'"), ("ce,dise:1", "'dise'"), ("", "''"), ("ce:x", "'ce:x'"), ("ce:", "'ce:'"),
    ("dice:-1", "'dice:-1'"), ("dice:0", "'dice:0'"), ("ce:nan", "'ce:nan'"), ("ce:1,ce:2", "'ce'"),
])
def test_bad_specs_name_the_part_and_the_valid_names(spec, bad_part):
    with pytest.raises(ValueError) as error:
        parse_loss_spec(spec)
    assert bad_part in str(error.value)
    assert "ce, dice, focal, lovasz" in str(error.value)


def test_combination_is_the_weighted_sum_of_terms():
    logits, target = random_batch()
    combined = build_loss("ce:1,dice:0.5,lovasz:0.25", 4)
    expected = (value(build_loss("ce", 4), logits, target) + 0.5 * value(build_loss("dice", 4), logits, target)
                + 0.25 * value(build_loss("lovasz", 4), logits, target))
    assert value(combined, logits, target) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 2.0], [1.0, -1.0, 1.0], [1.0, math.inf, 1.0]])
def test_bad_class_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="class weights"):
        build_loss("ce", 3, class_weights=weights)


# Automatic class weights

def test_auto_class_weights_known_answer():
    # 1/sqrt(count): 1/30, 1/10, 1, inf; capped at 10 * 1/30; mean over present classes 14/90.
    weights = auto_class_weights([900, 100, 1, 0])
    assert weights.tolist() == pytest.approx([3 / 14, 9 / 14, 30 / 14, 30 / 14], rel=1e-6)
    assert weights.dtype == torch.float32


def test_auto_class_weights_uncapped_have_mean_one():
    # 1/sqrt: 1/20, 1/10 -> ratio 2, mean 1.
    assert auto_class_weights(torch.tensor([400, 100])).tolist() == pytest.approx([2 / 3, 4 / 3], rel=1e-6)


@pytest.mark.parametrize("counts", [[0, 0], [10, -1], [1.0, math.nan]])
def test_auto_class_weights_reject_bad_counts(counts):
    with pytest.raises(ValueError, match="pixel counts"):
        auto_class_weights(counts)
