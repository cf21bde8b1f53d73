"""Learning-rate schedules shared by stage 1 (supernet) and stage 3 (retraining)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """LR multiplier for optimizer step ``step``: linear warm-up, then linear or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    return 1.0 - progress


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a scheduler stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: lr_factor(t, total_steps, warmup_steps, schedule))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from the optimizer's lr to 0 over ``total_steps`` (retraining's schedule)."""
    return lr_schedule(optimizer, total_steps, 0, "cosine")
