"""Built-in search spaces, one small factory each.

The 224 px spaces reproduce the published ones (SPOS's ShuffleNetV2, BN-NAS's ABS
MobileNet, FairNAS's MobileNet; README.md, section "Search spaces", has the table), and
``tests/test_search_spaces.py`` checks the published BN-NAS and SPOS architectures'
multiply-adds and parameters. The ``*_small`` spaces keep the same op families but are
sized for 28-32 px inputs so that a 2-core CPU trains them in minutes.
"""

from __future__ import annotations

from dataclasses import replace

from .space import Head, SearchSpace, Stage, StemLayer, register_space

SHUFFLE_OPS = ("shuffle_k3", "shuffle_k5", "shuffle_k7", "xception")
# BN-NAS / ABS order: k3e3, k3e6, k5e3, k5e6, k7e3, k7e6. Identity (-1 in the paper) is
# not a choice: the authors fix which layers are identity (``identity_layers``).
MOBILE_OPS = ("mbconv_k3_e3", "mbconv_k3_e6", "mbconv_k5_e3", "mbconv_k5_e6", "mbconv_k7_e3", "mbconv_k7_e6")


def _stages(spec, ops) -> tuple[Stage, ...]:
    return tuple(Stage(channels=c, depth=d, stride=s, ops=ops) for c, d, s in spec)


@register_space
def spos_shufflenet() -> SearchSpace:
    """SPOS ShuffleNetV2 space (Guo et al. 2020): 20 layers x 4 choices, 330M budget."""
    return SearchSpace(
        name="spos_shufflenet", input_size=224,
        stem=(StemLayer("conv", out=16, kernel=3, stride=2),),  # SPOS supernet: no max-pool
        stages=_stages([(64, 4, 2), (160, 4, 2), (320, 8, 2), (640, 4, 2)], SHUFFLE_OPS),
        head=Head(channels=1024, dropout=0.1, fc_bias=False),
    )


@register_space
def bnnas_mobilenet() -> SearchSpace:
    """BN-NAS / ABS MobileNet space as the authors search it: 21 layers, 6 MBConv ops each,
    layers 1, 5, 6 and 9 fixed to identity, 475M budget.

    The authors' supernet training and evolution (``BNNAS/supernet/train.py``,
    ``BNNAS/search/ea.py``) set those four layers to -1 on every step and in every
    candidate: the BN score then only compares MBConv ops with MBConv ops (identity has
    no BN to score). Both published architectures have -1 exactly there.
    """
    return SearchSpace(
        name="bnnas_mobilenet", input_size=224,
        stem=(StemLayer("conv", out=40, kernel=3, stride=2, act="relu6"),
              StemLayer("op", out=24, op="mbconv_k3_e1")),
        stages=_stages([(32, 4, 2), (56, 4, 2), (112, 4, 2), (128, 4, 1), (256, 4, 2), (432, 1, 1)],
                       MOBILE_OPS),
        head=Head(channels=1728, act="relu6"),
        identity_layers=(1, 5, 6, 9),
    )


@register_space
def fairnas_mobilenet() -> SearchSpace:
    """FairNAS space (Chu et al. 2021): 19 layers x 6 choices, 330M budget."""
    return SearchSpace(
        name="fairnas_mobilenet", input_size=224,
        stem=(StemLayer("conv", out=32, kernel=3, stride=2, act="relu6"),
              StemLayer("op", out=16, op="mbconv_k3_e1")),
        stages=_stages([(32, 2, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1)], MOBILE_OPS),
        head=Head(channels=1280, act="relu6"),
    )


@register_space
def mobilenet_small() -> SearchSpace:
    """The BN-NAS MobileNet family for 28-32 px inputs: 7 layers, 6 MBConv ops each,
    layer 1 fixed to identity (6 searchable layers, 6^6 = 46,656 architectures).

    As in BN-NAS, depth is fixed so that the BN indicator compares ops with ops. Of the
    layers that may be identity (the second of each two-layer stage: 1, 3, 5), layer 1
    runs at the highest resolution, where an op costs the most multiply-adds and adds
    the least capacity; skipping it is the authors' choice too (their layer 1, the
    second of their first stage). The stem halves the resolution at once: on a 2-core
    CPU the 28 px layers would cost most of the run for little accuracy on
    Fashion-MNIST or CIFAR-10.
    """
    return SearchSpace(
        name="mobilenet_small", input_size=32,
        stem=(StemLayer("conv", out=16, kernel=3, stride=2, act="relu6"),),
        stages=_stages([(24, 2, 1), (40, 2, 2), (80, 2, 2), (96, 1, 1)], MOBILE_OPS),
        head=Head(channels=256, act="relu6"),
        num_classes=10,
        identity_layers=(1,),
    )


@register_space
def mobilenet_small_res() -> SearchSpace:
    """``mobilenet_small`` with a parameter-free shortcut (average pool + zero channels)
    around every op of the four layers that change shape, so every layer is residual.

    For BN-only training with the scored gammas starting at 0 (``supernet.gamma_init``):
    every path then starts as the same function, so a shared, trained classifier can
    read all of them, and a gamma grows only as far as its op's output helps. Each
    plain path is a different random feature basis instead, which no shared head reads:
    the plain space's BN-only supernet stays at chance (BENCHMARKS.md, section 7).
    Costs are those of ``mobilenet_small`` (the shortcut has no multiply-adds or weights).
    """
    return replace(mobilenet_small(), name="mobilenet_small_res", shortcut="pad")


@register_space
def shufflenet_small() -> SearchSpace:
    """The SPOS ShuffleNetV2 family for 28-32 px inputs: 8 layers x 4 choices."""
    return SearchSpace(
        name="shufflenet_small", input_size=32,
        stem=(StemLayer("conv", out=24, kernel=3, stride=1),),
        stages=_stages([(48, 2, 2), (96, 4, 2), (192, 2, 2)], SHUFFLE_OPS),
        head=Head(channels=256, fc_bias=False),
        num_classes=10,
    )
