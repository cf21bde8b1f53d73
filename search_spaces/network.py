"""Supernet and standalone subnets built from a SearchSpace, plus BN-NAS's pieces:
training modes that freeze everything but BatchNorm, and the BN indicator.

Parameter names line up: the supernet's ``layers.{l}.{k}.<p>`` is the subnet's
``layers.{l}.<p>`` for the op ``k`` chosen at layer ``l``, and stem/head keep their
names, so a subnet loads the weights its ops learnt inside the supernet.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from .ops import IDENTITY, conv_bn, create_op, last_bn
from .space import Arch, Layer, SearchSpace

TrainMode = Literal["bn_last", "bn_all", "all"]
TRAIN_MODES: tuple[str, ...] = ("bn_last", "bn_all", "all")
_ACT = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def build_stem(space: SearchSpace) -> nn.Sequential:
    layers, ch = [], space.in_channels
    for s in space.stem:
        if s.type == "conv":
            layers.append(nn.Sequential(*conv_bn(ch, s.out, s.kernel, s.stride, act=_ACT[s.act])))
        elif s.type == "maxpool":
            layers.append(nn.MaxPool2d(s.kernel, s.stride, s.kernel // 2))
        else:
            layers.append(create_op(s.op, ch, s.out, s.stride))
        ch = s.out if s.type != "maxpool" else ch
    return nn.Sequential(*layers)


class Head(nn.Module):
    def __init__(self, space: SearchSpace):
        super().__init__()
        h = space.head
        self.conv = nn.Sequential(*conv_bn(space.stages[-1].channels, h.channels, 1, act=_ACT[h.act]))
        self.dropout = nn.Dropout(h.dropout)
        self.fc = nn.Linear(h.channels, space.num_classes, bias=h.fc_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.fc(self.dropout(x))


class PadShortcut(nn.Module):
    """``op(x) + shortcut(x)`` for a layer that changes shape, the shortcut parameter-free:
    average pooling for the stride, zero channels (or the first ones) for the width.

    ``space.shortcut == "pad"`` wraps every op of such layers; the op's last BN stays the
    scored one (the wrapper has no parameters of its own).
    """

    def __init__(self, op: nn.Module, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.op, self.in_channels, self.out_channels = op, in_channels, out_channels
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x)
        s = x if self.pool is None else self.pool(x)
        if self.out_channels > self.in_channels:
            s = nn.functional.pad(s, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        else:
            s = s[:, :self.out_channels]
        return y + s


def build_op(space: SearchSpace, layer: Layer, name: str) -> nn.Module:
    """The candidate op ``name`` of ``layer``, with the space's shortcut where it applies."""
    op = create_op(name, layer.in_channels, layer.out_channels, layer.stride)
    changes_shape = layer.stride != 1 or layer.in_channels != layer.out_channels
    if space.shortcut == "pad" and changes_shape and name != IDENTITY:
        op = PadShortcut(op, layer.in_channels, layer.out_channels, layer.stride)
    return op


class Supernet(nn.Module):
    """Single-path one-shot supernet: ``forward(x, arch)`` runs one op per layer."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = build_stem(space)
        # ModuleDict keyed by choice index: forbidden choices simply have no module.
        self.layers = nn.ModuleList(
            nn.ModuleDict({str(k): build_op(space, layer, op) for k, op in enumerate(layer.ops) if layer.allowed[k]})
            for layer in space.layers)
        self.head = Head(space)

    def forward(self, x: torch.Tensor, arch: Sequence[int]) -> torch.Tensor:
        arch = self.space.validate(arch)
        x = self.stem(x)
        for ops, a in zip(self.layers, arch):
            x = ops[str(a)](x)
        return self.head(x)

    def candidate_ops(self):
        """(layer, choice, module) for every candidate op."""
        for l, ops in enumerate(self.layers):
            for k, op in ops.items():
                yield l, int(k), op


class Subnet(nn.Module):
    """A plain network with only the chosen ops; no supernet inside."""

    def __init__(self, space: SearchSpace, arch: Sequence[int]):
        super().__init__()
        self.arch = space.validate(arch)
        self.stem = build_stem(space)
        self.layers = nn.Sequential(*(build_op(space, layer, layer.ops[a]) for layer, a in zip(space.layers, self.arch)))
        self.head = Head(space)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def build_subnet(space: SearchSpace, arch: Sequence[int]) -> Subnet:
    return Subnet(space, arch)


def subnet_state_from_supernet(supernet_state: dict, arch: Arch) -> dict:
    """Pick the chosen ops' weights out of a supernet state dict, renamed for a Subnet."""
    out = {}
    for key, value in supernet_state.items():
        if key.startswith("layers."):
            _, l, k, rest = key.split(".", 3)
            if int(k) == arch[int(l)]:
                out[f"layers.{l}.{rest}"] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------- BN-NAS training modes

def freeze(model: Supernet, mode: TrainMode) -> list[nn.Parameter]:
    """Set requires_grad per mode and return the trainable parameters.

    bn_last: only the last BN of every candidate op (the authors' released code);
    bn_all: every BN's gamma and beta (the paper's text); all: SPOS, everything.
    Frozen parameters get requires_grad=False so backward never computes their
    weight gradients: that is where a BN-only step saves time.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; use one of {', '.join(TRAIN_MODES)}")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    if mode == "bn_all":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(True)
    elif mode == "bn_last":
        for _, _, op in model.candidate_ops():
            bn = last_bn(op)
            if bn is not None:
                bn.weight.requires_grad_(True)
                bn.bias.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------- BN indicator

def bn_indicator(model: Supernet) -> np.ndarray:
    """[layers x choices]: mean |gamma| of each op's last BN.

    Identity scores 0 (as in the authors' code); a choice the layer forbids is NaN, so
    it can never be mistaken for a score.
    """
    space = model.space
    table = np.full((space.num_layers, space.num_choices), np.nan)
    for l, k, op in model.candidate_ops():
        bn = last_bn(op)
        table[l, k] = 0.0 if bn is None else bn.weight.detach().abs().mean().item()
    return table


def arch_score(table: np.ndarray, arch: Sequence[int]) -> float:
    """A subnet's BN score: the sum over layers of its ops' scores."""
    return float(table[np.arange(len(arch)), np.asarray(arch)].sum())


def arch_scores(table: np.ndarray, archs: np.ndarray) -> np.ndarray:
    """Vectorised ``arch_score`` for an [N x layers] int array: a gather and a sum."""
    archs = np.asarray(archs)
    return table[np.arange(archs.shape[1]), archs].sum(axis=1)
