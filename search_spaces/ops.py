"""Candidate operations and their registry.

Every candidate op is built as ``create_op(name, in_channels, out_channels, stride)``.
BN-NAS scores an op by the scale vector gamma of its *last* BatchNorm, so every op
except identity must end in an affine ``BatchNorm2d`` (optionally followed by a
parameter-free activation, as in ShuffleNetV2). ``last_bn`` finds that BN and
``create_op`` refuses an op that has none, naming it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

OpFactory = Callable[[int, int, int], nn.Module]
OPS: dict[str, OpFactory] = {}
IDENTITY = "identity"


class OpError(ValueError):
    """An op is unknown or cannot be scored by BN-NAS."""


def register_op(name: str, factory: Optional[OpFactory] = None):
    """Register ``factory(in_channels, out_channels, stride) -> nn.Module`` as ``name``.

    Usable as ``register_op("x", f)`` or as a decorator ``@register_op("x")``.
    """
    def add(f: OpFactory) -> OpFactory:
        OPS[name] = f
        return f
    return add(factory) if factory is not None else add


def _last_with_params(op: nn.Module) -> Optional[nn.Module]:
    # Registration order stands for run order: ops list their layers in the order
    # they run (ShuffleNet registers its projection branch before its main branch).
    last = None
    for m in op.modules():
        if next(m.parameters(recurse=False), None) is not None:
            last = m
    return last


def last_bn(op: nn.Module) -> Optional[nn.BatchNorm2d]:
    """The BN whose gamma is the op's indicator; None for identity."""
    m = _last_with_params(op)
    return m if isinstance(m, nn.BatchNorm2d) and m.affine else None


def create_op(name: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if name not in OPS:
        raise OpError(f"unknown op {name!r}; registered ops: {', '.join(sorted(OPS))}")
    op = OPS[name](in_channels, out_channels, stride)
    last = _last_with_params(op)
    if last is None and name != IDENTITY:
        raise OpError(f"op {name!r} has no parameters and no BatchNorm; only {IDENTITY!r} may be parameter-free")
    if last is not None and last_bn(op) is None:
        raise OpError(
            f"op {name!r} does not end in an affine BatchNorm2d (its last layer with parameters is "
            f"{type(last).__name__}), so BN-NAS cannot score it; end it with nn.BatchNorm2d(affine=True)"
        )
    return op


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            act: Optional[type[nn.Module]] = None) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return layers + ([act(inplace=True)] if act is not None else [])


# --------------------------------------------------------------------------- identity

class Identity(nn.Identity):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        if in_channels != out_channels or stride != 1:
            raise OpError(
                f"op 'identity' cannot map {in_channels}->{out_channels} channels at stride {stride}; "
                "forbid identity in this layer (the first layer of a stage)"
            )
        super().__init__()


register_op(IDENTITY, Identity)


# --------------------------------------------------------------------------- MBConv

class MBConv(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, kxk depthwise, linear 1x1 + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, kernel: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        layers = [] if expand == 1 else conv_bn(in_channels, mid, 1, act=nn.ReLU6)
        layers += conv_bn(mid, mid, kernel, stride, groups=mid, act=nn.ReLU6)
        layers += conv_bn(mid, out_channels, 1)  # linear bottleneck: ends in the scored BN
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


for _k in (3, 5, 7):
    for _e in (1, 3, 6):
        register_op(f"mbconv_k{_k}_e{_e}", partial(MBConv, kernel=_k, expand=_e))


# --------------------------------------------------------------------------- ShuffleNetV2

def channel_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPOS's shuffle: interleave channels, then split into two halves."""
    b, c, h, w = x.shape
    x = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
    return x[0], x[1]


class ShuffleBlock(nn.Module):
    """SPOS ShuffleNetV2 block (kxk) or its Xception variant (three 3x3 depthwise).

    At stride 1 half the channels pass through and the main branch works on the other
    half; at stride 2 a projection branch downsamples the whole input. The main
    branch ends conv-BN-ReLU: its BN is the scored one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, kernel: int, xception: bool = False):
        super().__init__()
        if out_channels % 2 or in_channels % 2 or (stride == 1 and in_channels != out_channels):
            raise OpError(f"ShuffleNet block needs even channels and in == out at stride 1, "
                          f"got {in_channels}->{out_channels} stride {stride}")
        self.stride = stride
        inp = in_channels // 2 if stride == 1 else in_channels
        mid = out_channels // 2
        outputs = out_channels - inp
        if stride == 2:  # registered first: it runs first, so the main branch's BN is last
            self.branch_proj = nn.Sequential(*conv_bn(inp, inp, kernel, 2, groups=inp),
                                             *conv_bn(inp, inp, 1, act=nn.ReLU))
        if xception:
            main = conv_bn(inp, inp, 3, stride, groups=inp) + conv_bn(inp, mid, 1, act=nn.ReLU)
            main += conv_bn(mid, mid, 3, groups=mid) + conv_bn(mid, mid, 1, act=nn.ReLU)
            main += conv_bn(mid, mid, 3, groups=mid) + conv_bn(mid, outputs, 1, act=nn.ReLU)
        else:
            main = conv_bn(inp, mid, 1, act=nn.ReLU) + conv_bn(mid, mid, kernel, stride, groups=mid)
            main += conv_bn(mid, outputs, 1, act=nn.ReLU)
        self.branch_main = nn.Sequential(*main)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x_proj, x = channel_shuffle(x)
            return torch.cat((x_proj, self.branch_main(x)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


for _k in (3, 5, 7):
    register_op(f"shuffle_k{_k}", partial(ShuffleBlock, kernel=_k))
register_op("xception", partial(ShuffleBlock, kernel=3, xception=True))
