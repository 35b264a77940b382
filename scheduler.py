"""Builds the optimizers and the per-step learning-rate schedules of training.

`build_optimizer`: RAdam, AdamW or SGD, weight decay on weights only (not biases and norms).
`build_scheduler`: warmup, then cosine with warm restarts, poly or constant, stepped once per optimizer step.
"""
import functools
import math

import torch

OPTIMIZER_NAMES = ("radam", "adamw", "sgd")
SCHEDULER_NAMES = ("cosine", "poly", "constant")


def _parameter_groups(model, weight_decay):
    """Decay matrices and convolution kernels only: biases and norm scales (1-D) are not shrunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(name, model, lr, weight_decay=0.0, momentum=0.9):
    """RAdam (decoupled weight decay), AdamW or Nesterov SGD over the model's trainable parameters."""
    groups = _parameter_groups(model, weight_decay)
    if name == "radam":
        return torch.optim.RAdam(groups, lr=lr, decoupled_weight_decay=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")


def _cycle_position(step, first_length, length_mult):
    """(cycle index, steps into that cycle, cycle length) when cycle k lasts first_length * length_mult**k."""
    if length_mult == 1:
        cycle, into = divmod(step, first_length)
        return cycle, into, first_length
    cycle, start, length = 0, 0, first_length
    while step >= start + length:
        cycle, start, length = cycle + 1, start + length, length * length_mult
    return cycle, step - start, length


def lr_multiplier(step, name, total_steps, warmup_steps=0, cycle_steps=None, cycle_mult=1, cycle_decay=1.0,
                  min_lr_ratio=0.0, power=0.9):
    """Fraction of the peak learning rate for optimizer step `step` (0-based).

    Warmup rises linearly from 1/(warmup_steps+1) at step 0 to 1 at step warmup_steps, so no
    step runs at lr 0. Then: constant stays at 1; poly falls as (1 - t)^power, t the fraction of
    the post-warmup steps done; cosine anneals to min_lr_ratio over cycles of cycle_steps
    (default: all post-warmup steps), each cycle_mult times longer than the last and restarting
    at cycle_decay times the previous peak. Poly and cosine end at min_lr_ratio from total_steps on.
    A warmup as long as the run never reaches the peak.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    done, decay_steps = step - warmup_steps, total_steps - warmup_steps
    if done >= decay_steps:
        return min_lr_ratio
    if name == "poly":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - done / decay_steps) ** power
    cycle, into, length = _cycle_position(done, cycle_steps or decay_steps, cycle_mult)
    peak = max(cycle_decay ** cycle, min_lr_ratio)
    return min_lr_ratio + (peak - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * into / length))


def _check_schedule(name, total_steps, warmup_steps, cycle_steps, cycle_mult, cycle_decay, min_lr_ratio, power):
    checks = [
        (name in SCHEDULER_NAMES, f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}"),
        (total_steps >= 1, f"total_steps must be >= 1, got {total_steps}"),
        (warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}"),
        (cycle_steps is None or cycle_steps >= 1, f"cycle_steps must be >= 1, got {cycle_steps}"),
        (cycle_mult >= 1, f"cycle_mult must be >= 1, got {cycle_mult}"),
        (cycle_decay > 0, f"cycle_decay must be > 0, got {cycle_decay}"),
        (0 <= min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}"),
        (power > 0, f"power must be > 0, got {power}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def build_scheduler(name, optimizer, total_steps, warmup_steps=0, cycle_steps=None, cycle_mult=1, cycle_decay=1.0,
                    min_lr_ratio=0.0, power=0.9):
    """A LambdaLR applying lr_multiplier to every group's lr; call step() once per optimizer step.

    To resume, build the optimizer and this scheduler as before, then load both state dicts:
    the optimizer's restores the lr of the next step, the scheduler's the step count.
    """
    _check_schedule(name, total_steps, warmup_steps, cycle_steps, cycle_mult, cycle_decay, min_lr_ratio, power)
    multiplier = functools.partial(
        lr_multiplier, name=name, total_steps=total_steps, warmup_steps=warmup_steps, cycle_steps=cycle_steps,
        cycle_mult=cycle_mult, cycle_decay=cycle_decay, min_lr_ratio=min_lr_ratio, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
