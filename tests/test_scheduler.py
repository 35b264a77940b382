import io
import math

import pytest
import torch
import torch.nn as nn

from scheduler import OPTIMIZER_NAMES, SCHEDULER_NAMES, build_optimizer, build_scheduler, lr_multiplier

PEAK = 0.1


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False))


def learning_rates(name, steps, **schedule):
    """The lr each of the first `steps` optimizer steps runs at."""
    optimizer = build_optimizer("sgd", tiny_model(), lr=PEAK)
    scheduler = build_scheduler(name, optimizer, **schedule)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


# Schedules, through the LambdaLR the training loop steps

def test_cosine_warmup_then_single_cycle():
    # warmup 10 of 110 steps: step t < 10 runs at (t + 1) / 11; then 100 steps of cosine down to 0.1.
    rates = learning_rates("cosine", 110, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert rates[0] == pytest.approx(PEAK * 1 / 11)
    assert rates[9] == pytest.approx(PEAK * 10 / 11)
    assert rates[10] == pytest.approx(PEAK)  # end of warmup: the peak
    assert rates[60] == pytest.approx(PEAK * (0.1 + 0.9 * 0.5))  # halfway: cos(pi/2) = 0
    assert rates[109] == pytest.approx(PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100))))


def test_cosine_warm_restarts_with_longer_cycles_and_decaying_peaks():
    # Cycles of 10, 20, 40 steps starting at steps 0, 10, 30 with peaks 1, 0.5, 0.25.
    rates = learning_rates("cosine", 70, total_steps=70, cycle_steps=10, cycle_mult=2, cycle_decay=0.5)
    assert rates[0] == pytest.approx(PEAK)
    assert rates[5] == pytest.approx(PEAK * 0.5)  # middle of cycle 0
    assert rates[9] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert rates[10] == pytest.approx(PEAK * 0.5)  # restart at half the peak
    assert rates[20] == pytest.approx(PEAK * 0.5 * 0.5)  # middle of cycle 1
    assert rates[29] == pytest.approx(PEAK * 0.5 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert rates[30] == pytest.approx(PEAK * 0.25)  # second restart
    assert rates[50] == pytest.approx(PEAK * 0.25 * 0.5)


def test_cosine_restarts_of_equal_length_after_warmup():
    # warmup 5, then cycles of 10 from step 5; step 30 is 5 steps into cycle 2 (peak 0.5**2).
    rates = learning_rates("cosine", 40, total_steps=45, warmup_steps=5, cycle_steps=10, cycle_decay=0.5)
    assert rates[5] == pytest.approx(PEAK)
    assert rates[15] == pytest.approx(PEAK * 0.5)
    assert rates[30] == pytest.approx(PEAK * 0.25 * 0.5)


def test_cosine_fractional_cycle_mult():
    # Cycles of 10, 15, 22.5 steps start at steps 0, 10, 25; step 35 is 10 of 22.5 steps into cycle 2.
    multiplier = lr_multiplier(35, "cosine", 100, cycle_steps=10, cycle_mult=1.5, cycle_decay=0.5)
    assert multiplier == pytest.approx(0.25 * 0.5 * (1 + math.cos(math.pi * 10 / 22.5)))
    assert lr_multiplier(25, "cosine", 100, cycle_steps=10, cycle_mult=1.5, cycle_decay=0.5) == pytest.approx(0.25)


def test_warmup_longer_than_the_run_only_ramps():
    rates = learning_rates("cosine", 5, total_steps=5, warmup_steps=9)
    assert rates == pytest.approx([PEAK * (t + 1) / 10 for t in range(5)])


def test_cosine_peak_never_drops_below_the_floor():
    assert lr_multiplier(30, "cosine", 40, cycle_steps=10, cycle_decay=0.1, min_lr_ratio=0.05) == pytest.approx(0.05)


def test_poly():
    # warmup 4 of 24 steps, then (1 - t / 20) ** 0.9 at t steps after warmup.
    rates = learning_rates("poly", 24, total_steps=24, warmup_steps=4, power=0.9)
    assert rates[0] == pytest.approx(PEAK * 1 / 5)
    assert rates[4] == pytest.approx(PEAK)
    assert rates[14] == pytest.approx(PEAK * 0.5 ** 0.9)
    assert rates[23] == pytest.approx(PEAK * (1 / 20) ** 0.9)  # last step


def test_poly_floor():
    assert lr_multiplier(10, "poly", 20, min_lr_ratio=0.2, power=1.0) == pytest.approx(0.2 + 0.8 * 0.5)


def test_constant_after_warmup():
    rates = learning_rates("constant", 12, total_steps=10, warmup_steps=3)
    assert rates[:4] == pytest.approx([PEAK / 4, PEAK * 2 / 4, PEAK * 3 / 4, PEAK])
    assert rates[4:] == pytest.approx([PEAK] * 8)


@pytest.mark.parametrize("name", ["cosine", "poly"])
def test_decaying_schedules_rest_at_the_floor_after_the_last_step(name):
    assert lr_multiplier(100, name, 100, min_lr_ratio=0.01) == 0.01
    assert lr_multiplier(150, name, 100, min_lr_ratio=0.01) == 0.01


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    schedule = dict(total_steps=60, warmup_steps=5, cycle_steps=10, cycle_mult=2, cycle_decay=0.7, min_lr_ratio=0.01)
    uninterrupted = learning_rates(name, 60, **schedule)

    optimizer = build_optimizer("radam", tiny_model(), lr=PEAK)
    scheduler = build_scheduler(name, optimizer, **schedule)
    for _ in range(23):
        optimizer.step()
        scheduler.step()
    saved = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)

    optimizer = build_optimizer("radam", tiny_model(), lr=PEAK)
    scheduler = build_scheduler(name, optimizer, **schedule)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    resumed = []
    for _ in range(23, 60):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == uninterrupted[23:]


@pytest.mark.parametrize("bad, match", [
    (dict(name="linear"), "cosine, poly, constant"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(cycle_steps=0), "cycle_steps"),
    (dict(cycle_mult=0.5), "cycle_mult"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"),
])
def test_bad_schedules_are_rejected(bad, match):
    schedule = dict(name="cosine", total_steps=100) | bad
    optimizer = build_optimizer("sgd", tiny_model(), lr=PEAK)
    with pytest.raises(ValueError, match=match):
        build_scheduler(optimizer=optimizer, **schedule)


# Optimizers

def decay_of(optimizer):
    """Weight decay of each parameter, by its shape."""
    return {tuple(p.shape): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_no_weight_decay_on_biases_and_norm_parameters(name):
    optimizer = build_optimizer(name, tiny_model(), lr=PEAK, weight_decay=0.05)
    # conv kernels (4,3,3,3) and (2,4,1,1) decay; conv bias and BatchNorm weight/bias (all (4,)) do not.
    assert decay_of(optimizer) == {(4, 3, 3, 3): 0.05, (2, 4, 1, 1): 0.05, (4,): 0.0}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 5


def test_optimizer_kinds():
    model = tiny_model()
    radam = build_optimizer("radam", model, lr=PEAK)
    assert isinstance(radam, torch.optim.RAdam) and radam.defaults["decoupled_weight_decay"]
    assert isinstance(build_optimizer("adamw", model, lr=PEAK), torch.optim.AdamW)
    sgd = build_optimizer("sgd", model, lr=PEAK, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model[0].requires_grad_(False)
    assert sum(len(group["params"]) for group in build_optimizer("radam", model, lr=PEAK).param_groups) == 3


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(ValueError, match="radam, adamw, sgd"):
        build_optimizer("adam", tiny_model(), lr=PEAK)
