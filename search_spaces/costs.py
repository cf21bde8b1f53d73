"""Per-op cost tables, measured with torch's FlopCounterMode on the real modules.

Multiply-adds (the papers' "FLOPs") and parameter counts are [layers x choices] tables
at the space's input size. Both are additive: an architecture costs the fixed part
(stem + head) plus one table entry per layer, which equals counting the standalone
subnet directly (a test checks it). Modules are built on the meta device, so even the
224 px spaces are tabulated in about a second without allocating or computing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .network import Head, build_stem
from .ops import create_op
from .space import SearchSpace


@dataclass(frozen=True)
class CostTables:
    flops: np.ndarray  # [layers x choices] multiply-adds; NaN where the choice is forbidden
    params: np.ndarray  # [layers x choices]
    fixed_flops: float  # stem + head
    fixed_params: float

    def cost(self, arch: Sequence[int]) -> tuple[float, float]:
        idx = (np.arange(len(arch)), np.asarray(arch))
        return self.fixed_flops + float(self.flops[idx].sum()), self.fixed_params + float(self.params[idx].sum())

    def costs(self, archs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        archs = np.asarray(archs)
        idx = (np.arange(archs.shape[1]), archs)
        return self.fixed_flops + self.flops[idx].sum(1), self.fixed_params + self.params[idx].sum(1)


def count(module: nn.Module, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(multiply-adds, parameters, output) of one forward pass of ``module`` on ``x``."""
    module.eval()  # eval-mode BN has no batch statistics to compute: cheaper on meta
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = module(x)
    return counter.get_total_flops() / 2, float(sum(p.numel() for p in module.parameters())), y


@functools.lru_cache(maxsize=None)
def _op_cost(name: str, cin: int, cout: int, stride: int, shape: tuple[int, ...]) -> tuple[float, float, tuple]:
    # Layers inside a stage repeat the same shapes: count each distinct op once.
    f, p, y = count(_on_meta(create_op, name, cin, cout, stride), torch.empty(shape, device="meta"))
    return f, p, tuple(y.shape)


def _on_meta(build, *args) -> nn.Module:
    # Build on the meta device (no allocation, no init) but run the forward outside
    # the device context: inside it every op dispatch is several times slower.
    with torch.device("meta"):
        return build(*args)


@functools.lru_cache(maxsize=32)
def cost_tables(space: SearchSpace) -> CostTables:
    layers = space.layers
    flops = np.full((len(layers), space.num_choices), np.nan)
    params = np.full_like(flops, np.nan)
    x = torch.empty(1, space.in_channels, space.input_size, space.input_size, device="meta")
    stem_flops, stem_params, x = count(_on_meta(build_stem, space), x)
    for layer in layers:
        for k, name in enumerate(layer.ops):
            if layer.allowed[k]:
                flops[layer.index, k], params[layer.index, k], out_shape = _op_cost(
                    name, layer.in_channels, layer.out_channels, layer.stride, tuple(x.shape))
        x = torch.empty(out_shape, device="meta")
    head_flops, head_params, _ = count(_on_meta(Head, space), x)
    flops.setflags(write=False)
    params.setflags(write=False)
    return CostTables(flops, params, stem_flops + head_flops, stem_params + head_params)


def count_model(model: nn.Module, space: SearchSpace) -> tuple[float, float]:
    """Multiply-adds and parameters of a whole standalone network, counted directly."""
    was_training = model.training
    flops, params, _ = count(model, torch.zeros(1, space.in_channels, space.input_size, space.input_size))
    model.train(was_training)
    return flops, params
