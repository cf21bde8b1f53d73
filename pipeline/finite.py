"""The guard against non-finite training: a NaN or infinite loss stops the stage at the
step where it first appears, with one line naming that step and its learning rate.

Without it a diverged run (``supernet.lr`` far too high, broken data) trains on and a
stage saves NaN weights as finished, and every later stage works on garbage. The
guard looks at every loss: on the CPU right away (the value is there already), on a GPU
every ``GPU_EVERY`` steps and at the end of the epoch, so that it does not wait for the
GPU after every step; either way the step it names is the first bad one. Across
data-parallel ranks the check is all-reduced, so every rank stops at the same step
(Ray Train's ``report`` is a barrier that every rank must reach equally often).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

GPU_EVERY = 25
_NONE = 1 << 62  # "no bad step yet" (a MIN reduction keeps the first bad step over all ranks)


class NonFinite(RuntimeError):
    """Training produced a NaN or infinity; ``str()`` is the one line for the user."""


class NonFiniteLoss(NonFinite):
    def __init__(self, epoch: int, step: int, lr: float, value: float):
        self.epoch, self.step, self.lr, self.value = epoch, step, lr, value
        super().__init__(f"non-finite loss ({value}) at epoch {epoch + 1} step {step + 1} (lr {lr:.4g})")


def check_weights(state: dict[str, torch.Tensor], epoch: int, lr: float) -> None:
    """After an epoch: raise ``NonFinite`` if a weight or BN statistic is not finite.

    Batch normalisation can keep every loss finite while its parameters or running
    variance overflow (a huge learning rate): the loss guard alone would let such a
    model be saved."""
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFinite(f"non-finite weights ({bad[0]}{more}) after epoch {epoch + 1} (lr {lr:.4g})")


class FiniteGuard:
    """``step(loss, epoch, step, lr)`` after every loss, ``check()`` at the end of the
    epoch; either raises ``NonFiniteLoss`` for the first step whose loss was not finite.

    ``all_reduce(tensor, op)`` (a data-parallel trainer's) makes every rank decide alike.
    """

    def __init__(self, device: torch.device | str, all_reduce: Optional[Callable] = None):
        self.device = torch.device(device)
        self.all_reduce = all_reduce
        self.every = 1 if self.device.type == "cpu" else GPU_EVERY
        self.first = torch.full((), _NONE, dtype=torch.int64, device=self.device)
        self.first_value = torch.zeros((), dtype=torch.float64, device=self.device)
        self.lrs: dict[int, float] = {}  # lr of each step since the last check
        self.epoch = 0
        self.count = 0

    def step(self, loss: torch.Tensor, epoch: int, step: int, lr: float) -> None:
        value = loss.detach().double()
        bad = ~torch.isfinite(value) & (self.first == _NONE)
        self.first = torch.where(bad, torch.full_like(self.first, step), self.first)
        self.first_value = torch.where(bad, value, self.first_value)
        self.lrs[step] = lr
        self.epoch = epoch
        self.count += 1
        if self.count % self.every == 0:
            self.check()

    def check(self) -> None:
        first = self.first.clone()
        if self.all_reduce is not None:
            import torch.distributed as dist

            self.all_reduce(first, dist.ReduceOp.MIN)
        step = int(first.item())
        if step != _NONE:
            value = float(self.first_value.item()) if int(self.first.item()) == step else math.nan
            raise NonFiniteLoss(self.epoch, step, self.lrs.get(step, math.nan), value)
        self.lrs.clear()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or infinity."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
