"""Indicators: how stage 2 scores an architecture (a registry name -> class).

- ``bn`` (BN-NAS): the stage-1 indicator table [layers x choices]; an architecture's score
  is a gather and a sum. Because it is a sum over layers, like the cost tables, the
  constrained optimum can be found exactly (``exact.exact_search``).
- ``acc`` (the SPOS baseline): per architecture, reset the BN running statistics,
  recalibrate them on ``search.calib_batches`` training batches and measure validation
  accuracy on ``search.val_batches`` batches. Expensive by design; no exact solver.

Add your own with ``@register_indicator`` (see ``Indicator``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from search_spaces import SearchSpace, Supernet, arch_scores, bn_indicator, space_from_dict

from ..budgets import check_table
from ..common import PipelineError
from ..config import Config, SearchConfig
from ..data import Splits, make_loader


class Indicator:
    """How architectures are scored. Higher is better.

    Subclass it, give it a ``name`` and register it with ``@register_indicator``; then
    ``search.indicator: <name>`` uses it. The class travels to the Ray actors by pickle,
    so it must be importable there (a module on the workers' path, or a runtime_env).

    - ``prepare`` runs once on the driver and returns the payload: everything scoring
      needs (numpy arrays travel zero-copy through the object store).
    - ``__init__(payload, device)`` runs once per actor.
    - ``score(archs)`` scores an [N x layers] int array; it must be deterministic (the
      same architecture always gets the same score), which is what makes the search
      reproducible and a dead actor's batch safely rescorable.
    - ``additive = True`` promises score = sum over layers of ``self.table[l, arch[l]]``;
      the exact solver then applies.
    - ``check_space`` refuses a space the indicator cannot score, before anything runs.
    """

    name: str = ""
    additive: bool = False
    table: Optional[np.ndarray] = None  # [layers x choices], additive indicators only

    @classmethod
    def check_space(cls, space: SearchSpace, q: SearchConfig) -> None:
        """Raise PipelineError when this indicator cannot rank ``space``'s choices."""

    @classmethod
    def prepare(cls, *, cfg: Config, space: SearchSpace, checkpoint: dict, splits: Splits) -> dict:
        raise NotImplementedError

    def __init__(self, payload: dict, device: str = "cpu"):
        self.payload, self.device = payload, device

    def score(self, archs: np.ndarray) -> np.ndarray:
        raise NotImplementedError


INDICATORS: dict[str, type[Indicator]] = {}


def register_indicator(cls: type[Indicator]) -> type[Indicator]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    INDICATORS[cls.name] = cls
    return cls


def get_indicator(name: str) -> type[Indicator]:
    if name not in INDICATORS:
        raise PipelineError(f"search.indicator={name!r} is unknown; registered indicators: "
                            f"{', '.join(sorted(INDICATORS))}")
    return INDICATORS[name]


@register_indicator
class BNIndicator(Indicator):
    """BN-NAS: the sum over layers of the chosen ops' mean |gamma| (no data needed)."""

    name = "bn"
    additive = True

    @classmethod
    def check_space(cls, space, q):
        # Identity has no BN, so its "score" would be a constant 0 against ~1 for every op:
        # the sum would count non-identity layers, not compare ops. The authors fix depth.
        layers = space.searchable_identity
        if layers and not q.identity_scores_zero:
            raise PipelineError(
                f"search.indicator=bn cannot score identity (it has no BatchNorm), and space {space.name!r} "
                f"lets it compete with ops at layer(s) {', '.join(map(str, layers))}: fix the depth "
                "(identity_layers in the space, as the built-in spaces do) or use search.indicator=acc; "
                "search.identity_scores_zero=true searches it anyway, identity scoring 0")

    @classmethod
    def prepare(cls, *, cfg, space, checkpoint, splits):
        table = checkpoint.get("indicator")
        if table is None:  # an older checkpoint: recompute it from the weights
            model = Supernet(space)
            model.load_state_dict(checkpoint["model"])
            table = bn_indicator(model)
        return {"table": check_table(np.asarray(table, dtype=np.float64), space, "the supernet's indicator table")}

    def __init__(self, payload, device="cpu"):
        super().__init__(payload, device)
        self.table = payload["table"]

    def score(self, archs):
        return arch_scores(self.table, np.asarray(archs))


@register_indicator
class AccIndicator(Indicator):
    """SPOS baseline: validation accuracy after recalibrating BN statistics.

    The supernet's weights never change, only BN running statistics do, so one supernet
    per actor serves every architecture: per architecture the BNs on its path (stem,
    chosen ops, head) are reset, recalibrated with a cumulative average (momentum=None,
    so every calibration batch counts equally and the reset values do not matter) in
    train mode without gradients, then the network is evaluated in eval mode. That is
    the same computation as a standalone subnet with the supernet's weights (a test
    checks it) without building one per architecture.

    The calibration and validation batches are drawn once on the driver (seeded) and
    shipped in the payload: every actor, on any node, scores on the same data.
    """

    name = "acc"

    @classmethod
    def prepare(cls, *, cfg, space, checkpoint, splits):
        q, bs = cfg.search, cfg.supernet.batch_size
        return {
            "space": space.to_dict(),
            "state": {k: v.detach().cpu().numpy() for k, v in checkpoint["model"].items()},
            "calib": take_batches(splits.train, bs, q.calib_batches, shuffle=True, seed=cfg.seed),
            "val": take_batches(splits.val, bs, q.val_batches, shuffle=False, seed=cfg.seed),
        }

    def __init__(self, payload, device="cpu"):
        super().__init__(payload, device)
        space = space_from_dict(payload["space"])
        self.model = Supernet(space)
        with warnings.catch_warnings():
            # The object store hands out read-only arrays; nothing here writes to them
            # (load_state_dict copies, inputs are only read).
            warnings.simplefilter("ignore", UserWarning)
            self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in payload["state"].items()})
            self.calib = [torch.from_numpy(x).to(device) for x, _ in payload["calib"]]
            self.val = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for x, y in payload["val"]]
        self.model.to(device)
        self.n_val = sum(len(y) for _, y in self.val)

    def _path_bns(self, arch: Sequence[int]) -> list[nn.BatchNorm2d]:
        m = self.model
        modules = [m.stem, *(m.layers[l][str(a)] for l, a in enumerate(arch)), m.head]
        return [bn for mod in modules for bn in mod.modules() if isinstance(bn, nn.BatchNorm2d)]

    @torch.no_grad()
    def score_one(self, arch: Sequence[int]) -> float:
        arch = tuple(int(a) for a in arch)
        for bn in self._path_bns(arch):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the calibration batches
        self.model.train()
        for x in self.calib:
            self.model(x, arch)
        self.model.eval()
        correct = 0
        for x, y in self.val:
            correct += int((self.model(x, arch).argmax(1) == y).sum())
        return correct / self.n_val

    def score(self, archs):
        return np.array([self.score_one(a) for a in np.asarray(archs)], dtype=np.float64)


def take_batches(dataset, batch_size: int, n: int, *, shuffle: bool, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` batches of a seeded loader as numpy arrays (same data on every actor).

    Training batches may be augmented, which draws from torch's global RNG: seed a
    private copy of it so the batches depend on the seed alone. A training set shorter
    than n batches is cycled over epochs; validation takes at most one pass.
    """
    if len(dataset) == 0:
        raise PipelineError("the dataset split used for the acc indicator is empty")
    out: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        epoch = 0
        while len(out) < n:
            loader = make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                 drop_last=shuffle and len(dataset) >= batch_size)
            for x, y in loader:
                out.append((x.numpy(), y.numpy()))
                if len(out) == n:
                    break
            if not shuffle:
                break
            epoch += 1
    return out
