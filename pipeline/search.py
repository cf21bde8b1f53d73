"""Stage 2: find the best subnets of a trained supernet under FLOPs / params / latency budgets.

Reads ``supernet/final.pt`` (written by stage 1) and writes, under ``search/``:

- ``scored.parquet``: every architecture scored (arch, ops, score, flops, params,
  [latency], source, generation);
- ``topn.parquet``: the best ``search.top_n`` distinct architectures within budget
  (rank, arch, ops, score, flops, params, [latency], source);
- ``result.json`` LAST: its presence means the stage finished; a rerun returns it.

How a score is computed is an *indicator* (a registry name -> class; add your own with
``@register_indicator``):

- ``bn`` (BN-NAS): the stage-1 indicator table [layers x choices]; an architecture's score
  is a gather and a sum. Because it is a sum over layers, like the cost tables, the
  constrained optimum can be found exactly (``exact_search``: branch and bound over the
  layers with a dynamic-programming bound, checked against the real float costs).
- ``acc`` (the SPOS baseline): per architecture, reset the BN running statistics,
  recalibrate them on ``search.calib_batches`` training batches and measure validation
  accuracy on ``search.val_batches`` batches. Expensive by design; no exact solver.

Scoring runs on a pool of Ray actors (``ScorerPool``): the indicator's payload (table, or
supernet weights and the data batches) is put in the object store once and every actor
receives it at construction. The evolutionary search (the paper's settings) sends each
generation's new candidates as batches, keeping every actor busy; results are
reassembled by batch index, so the outcome depends only on the seed, never on the
number of actors, their timing, or an actor dying and its batch being rescored.

A search interrupted part-way (crash, Ctrl-C) resumes: scores are saved after every
generation in ``search/cache.parquet`` and a rerun replays the seeded evolution,
scoring only what the cache lacks.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from search_spaces import (Arch, SearchSpace, Supernet, arch_scores, bn_indicator, cost_tables,
                           space_from_dict)
from search_spaces.space import SpaceError

from .common import PipelineError, Progress, ensure_ray, resolve_space
from .config import Config, SearchConfig
from .data import DataError, Splits, build_datasets, make_loader
from .storage import RunDir, StorageError
from .train_supernet import FINAL as SUPERNET_FILE, load_supernet

SCORED_FILE = "search/scored.parquet"
TOPN_FILE = "search/topn.parquet"
RESULT_FILE = "search/result.json"
CACHE_FILE = "search/cache.parquet"

# ======================================================================================
# Indicators
# ======================================================================================


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
    """

    name: str = ""
    additive: bool = False
    table: Optional[np.ndarray] = None  # [layers x choices], additive indicators only

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


def check_table(table: np.ndarray, space: SearchSpace, what: str) -> np.ndarray:
    """A [layers x choices] table with a finite value for every allowed choice, NaN elsewhere."""
    allowed = allowed_mask(space)
    if table.shape != allowed.shape:
        raise PipelineError(f"{what} has shape {table.shape}, but space {space.name!r} has "
                            f"{allowed.shape[0]} layers x {allowed.shape[1]} choices")
    bad = np.argwhere(allowed & ~np.isfinite(table))
    if len(bad):
        l, k = bad[0]
        raise PipelineError(f"{what}: layer {l} choice {k} ({space.layers[l].ops[k]}) has no finite value")
    out = np.where(allowed, table, np.nan)
    out.setflags(write=False)
    return out


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


# ======================================================================================
# Budgets
# ======================================================================================


def allowed_mask(space: SearchSpace) -> np.ndarray:
    mask = np.zeros((space.num_layers, space.num_choices), dtype=bool)
    for layer in space.layers:
        mask[layer.index, :len(layer.allowed)] = layer.allowed
    return mask


@dataclass(frozen=True)
class Constraint:
    """One additive cost: fixed + sum over layers of table[l, arch[l]], kept in [lo, hi]."""

    name: str  # flops | params | latency (also the config keys: search.max_<name>)
    unit: str
    table: np.ndarray  # [layers x choices], NaN where the choice is forbidden
    fixed: float
    lo: float = 0.0  # 0: no minimum
    hi: float = math.inf  # inf: no maximum

    @property
    def active(self) -> bool:
        return self.lo > 0 or self.hi < math.inf

    def fmt(self, x: float) -> str:
        return f"{x:.4g} ms" if self.name == "latency" else _human(x)

    def cheapest(self) -> float:
        return self.fixed + float(np.nanmin(self.table, axis=1).sum())

    def dearest(self) -> float:
        return self.fixed + float(np.nanmax(self.table, axis=1).sum())


def _human(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


@dataclass
class Budgets:
    space: SearchSpace
    constraints: list[Constraint]
    allowed: np.ndarray = field(init=False)

    def __post_init__(self):
        self.allowed = allowed_mask(self.space)

    @property
    def active(self) -> list[Constraint]:
        return [c for c in self.constraints if c.active]

    def costs(self, archs: np.ndarray) -> dict[str, np.ndarray]:
        """Every cost of an [N x layers] batch. THE cost function: the exact solver, the
        evolution and the outputs all use it, so a budget decision never depends on
        which code path summed the floats."""
        archs = np.ascontiguousarray(archs, dtype=np.int64)
        idx = (np.arange(archs.shape[1]), archs)
        return {c.name: c.fixed + np.ascontiguousarray(c.table[idx]).sum(axis=1) for c in self.constraints}

    def within(self, archs: np.ndarray) -> np.ndarray:
        costs = self.costs(archs)
        ok = np.ones(len(archs), dtype=bool)
        for c in self.active:
            ok &= (costs[c.name] >= c.lo) & (costs[c.name] <= c.hi)
        return ok

    def describe(self) -> str:
        parts = []
        for c in self.active:
            if c.lo > 0:
                parts.append(f"{c.name} >= {c.fmt(c.lo)}")
            if c.hi < math.inf:
                parts.append(f"{c.name} <= {c.fmt(c.hi)}")
        return ", ".join(parts) or "no budget"

    def check_feasible(self) -> None:
        """Each budget alone must be reachable: name the cheapest (dearest) architecture if not."""
        name = self.space.name
        for c in self.active:
            low, high = c.cheapest(), c.dearest()
            what = "multiply-adds" if c.name == "flops" else c.unit
            if c.hi < low:
                raise PipelineError(
                    f"search.max_{c.name}={c.fmt(c.hi)} is below the cheapest architecture in {name} "
                    f"({c.fmt(low)} {what}); raise it")
            if c.lo > high:
                raise PipelineError(
                    f"search.min_{c.name}={c.fmt(c.lo)} is above the most expensive architecture in {name} "
                    f"({c.fmt(high)} {what}); lower it")


def make_budgets(q: SearchConfig, space: SearchSpace) -> Budgets:
    tables = cost_tables(space)
    inf = math.inf
    cons = [
        Constraint("flops", "multiply-adds", tables.flops, tables.fixed_flops, q.min_flops, q.max_flops or inf),
        Constraint("params", "parameters", tables.params, tables.fixed_params, q.min_params, q.max_params or inf),
    ]
    if q.latency_table:
        table, fixed = load_latency_table(q.latency_table, space)
        cons.append(Constraint("latency", "ms", table, fixed, 0.0, q.max_latency or inf))
    return Budgets(space, cons)


def load_latency_table(path: str, space: SearchSpace) -> tuple[np.ndarray, float]:
    """A latency lookup table measured on the target device: .npy or .csv (no header).

    [layers x choices] in ms (forbidden choices may be empty/NaN); an optional extra last
    row holds the fixed stem + head latency in its first column (0 without it).
    """
    try:
        if "://" in path:
            import pyarrow.fs as pafs
            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                data = f.read()
        else:
            with open(os.path.expanduser(path), "rb") as f:
                data = f.read()
        if path.endswith(".npy"):
            arr = np.load(io.BytesIO(data))
        elif path.endswith(".csv"):
            arr = np.genfromtxt(io.StringIO(data.decode()), delimiter=",", dtype=np.float64)
        else:
            raise PipelineError(f"search.latency_table={path!r}: use a .npy or .csv file")
    except (OSError, ValueError) as e:
        raise PipelineError(f"search.latency_table={path!r} cannot be read ({type(e).__name__}: {e})") from None
    arr = np.atleast_2d(np.asarray(arr, dtype=np.float64))
    L, K = space.num_layers, space.num_choices
    fixed = 0.0
    if arr.shape == (L + 1, K):
        fixed, arr = float(arr[L, 0]), arr[:L]
    if arr.shape != (L, K):
        raise PipelineError(f"search.latency_table={path!r} has shape {arr.shape}; space {space.name!r} needs "
                            f"[{L} layers x {K} choices] (plus optionally a last row with the fixed stem+head ms)")
    table = check_table(arr, space, f"search.latency_table={path!r}")
    if np.nanmin(table) < 0 or not math.isfinite(fixed) or fixed < 0:
        raise PipelineError(f"search.latency_table={path!r} has negative or non-finite latencies")
    return table, fixed


# ======================================================================================
# Exact search (additive indicators)
# ======================================================================================


@dataclass
class _Dim:
    """One active constraint, discretised for the dynamic-programming bound."""
    c: Constraint
    delta: float  # bucket width
    shift_suffix: np.ndarray  # [L+1] sum over layers >= l of the per-layer minimum cost
    qmax: np.ndarray  # [L+1] the largest bucket sum reachable by layers >= l
    best: list  # best[l][Q]: max score of layers >= l whose bucket sum is exactly Q (-inf: none)
    best_upto: list  # running max of best[l] over Q (for a max-only constraint)


def _discretise(c: Constraint, scores: np.ndarray, allowed: np.ndarray, buckets: int) -> Optional[_Dim]:
    L = len(scores)
    w = np.where(allowed, c.table, np.nan)
    mins = np.nanmin(w, axis=1)
    shifted = w - mins[:, None]  # >= 0: buckets then measure only what choices add
    span = float(np.nansum(np.nanmax(shifted, axis=1)))
    if span <= 0:
        return None  # the cost does not depend on the choices: check_feasible settled it
    delta = span / buckets
    # Rounding each op's cost DOWN makes the bucket problem a relaxation: any suffix whose
    # real cost fits also fits in buckets, so the DP value bounds the real optimum.
    q = np.where(allowed, np.floor(np.nan_to_num(shifted) / delta), -1).astype(np.int64)
    qmax = np.zeros(L + 1, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        qmax[l] = qmax[l + 1] + q[l].max()
    best = [None] * (L + 1)
    best[L] = np.zeros(1)
    for l in range(L - 1, -1, -1):
        nxt, cur = best[l + 1], np.full(qmax[l] + 1, -np.inf)
        for k in np.flatnonzero(allowed[l]):
            seg = cur[q[l, k]:q[l, k] + len(nxt)]
            np.maximum(seg, scores[l, k] + nxt, out=seg)
        best[l] = cur
    shift_suffix = np.concatenate([np.cumsum(mins[::-1])[::-1], [0.0]])
    return _Dim(c, delta, shift_suffix, qmax, best, [np.maximum.accumulate(b) for b in best])


def exact_search(table: np.ndarray, budgets: Budgets, top_n: int = 1, *, buckets: int = 4096) -> list[tuple[float, Arch]]:
    """The ``top_n`` best architectures under the budgets, exactly, for an additive score.

    A multiple-choice knapsack with up to three cost dimensions, each with a minimum and
    a maximum. Best-first branch and bound over the layers: a partial architecture is
    expanded only while its bound (its score so far plus the best any completion could
    add) can still reach the ``top_n``-th best. The completion bound comes from a DP per
    constraint over bucketed costs (rounded down, so it never underestimates); a minimum is honoured by
    reading the DP over the bucket range a fitting suffix can land in (at most one bucket
    per layer below the real cost). The bound prunes only: every reported architecture
    is checked with the real float costs (``Budgets.within``) and scored with the real
    table, so no discretisation error reaches the answer. With several constraints the
    bound is the minimum over the per-constraint bounds (each a relaxation).

    Returns [(score, arch)] sorted by score (descending), ties by arch; empty if no
    architecture meets all budgets together.
    """
    allowed = budgets.allowed
    L = len(table)
    scores = np.where(allowed, table, -np.inf)
    order = [sorted(np.flatnonzero(allowed[l]).tolist(), key=lambda k, l=l: (-scores[l, k], k)) for l in range(L)]
    best_rest = np.concatenate([np.cumsum(scores.max(1)[::-1])[::-1], [0.0]])
    dims = [d for d in (_discretise(c, scores, allowed, buckets) for c in budgets.active) if d is not None]
    # Plain Python lists: element access in the hot loop is far cheaper than numpy's.
    S = scores.tolist()
    W = [np.nan_to_num(d.c.table).tolist() for d in dims]
    eps = 1e-7  # buckets; float noise in the running cost sums, far below one bucket

    # Per constraint, as plain floats/lists: the budget left for layers >= l before the
    # running cost is subtracted, in bucket units.
    lim = []
    for d in dims:
        c = d.c
        hi = [(c.hi - c.fixed - d.shift_suffix[l]) / d.delta for l in range(L + 1)] if c.hi < math.inf else None
        lo = [(c.lo - c.fixed - d.shift_suffix[l]) / d.delta for l in range(L + 1)] if c.lo > 0 else None
        lim.append((hi, lo, 1.0 / d.delta, d.qmax.tolist(), d.best, [b.tolist() for b in d.best_upto]))

    def completion_bound(l: int, spent: tuple) -> float:
        """An upper bound on the score layers >= l can add, given the costs spent so far."""
        bound = best_rest[l]
        for (hi, lo, inv, qmax, best, best_upto), p in zip(lim, spent):
            qhi = qmax[l]
            if hi is not None:
                r = hi[l] - p * inv
                if r < -eps:
                    return -math.inf
                qhi = min(qhi, int(r + eps))
            if lo is not None:
                qlo = math.ceil(lo[l] - p * inv - eps) - (L - l)
                if qlo > qhi:
                    return -math.inf
                if qlo > 0:
                    bound = min(bound, float(best[l][qlo:qhi + 1].max()))
                    continue
            bound = min(bound, best_upto[l][qhi])
        return bound

    # Best-first (A*): always expand the partial architecture with the highest bound.
    # A complete one's bound is its score, so complete architectures come off the heap
    # best first, and nothing whose bound is below the top_n-th score is ever expanded.
    # Keys are (-bound, arch prefix): equal bounds leave in lexicographic order, so even
    # a table full of ties (an untrained supernet) walks straight down to its answers.
    found: list[tuple[float, Arch]] = []
    heap = [(-completion_bound(0, (0.0,) * len(dims)), (), 0.0, (0.0,) * len(dims))]
    while heap:
        neg, prefix, score, spent = heapq.heappop(heap)
        if neg == math.inf:
            break  # only infeasible partial architectures are left
        l = len(prefix)
        if l == L:
            a = np.array([prefix])
            # The bound prunes only; the answer is decided by the real costs and scores.
            if budgets.within(a)[0]:
                found.append((float(arch_scores(table, a)[0]), prefix))
                if len(found) == top_n:
                    break
            continue
        row = S[l]
        for k in order[l]:
            child_spent = tuple(p + w[l][k] for p, w in zip(spent, W))
            child_score = score + row[k]
            bound = child_score + completion_bound(l + 1, child_spent)
            if bound > -math.inf:
                heapq.heappush(heap, (-bound, prefix + (k,), child_score, child_spent))
    return sorted(found, key=lambda t: (-t[0], t[1]))


# ======================================================================================
# Ray scorer actors
# ======================================================================================


class ScorerActor:
    """Holds one indicator instance; scores batches of architectures (a Ray actor:
    ``ScorerPool`` wraps it with ``ray.remote``, so this module imports without Ray)."""

    def __init__(self, indicator_cls: type[Indicator], payload: dict, num_cpus: float):
        import ray

        # payload was a top-level ObjectRef argument, so Ray hands it over resolved.
        # One torch thread per reserved CPU: more would fight the other actors for cores.
        torch.set_num_threads(max(1, int(num_cpus)))
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.indicator = indicator_cls(payload, device)

    def ready(self) -> int:
        return os.getpid()

    def score(self, archs: np.ndarray) -> tuple[np.ndarray, int, float, float]:
        start = time.time()
        scores = np.asarray(self.indicator.score(archs), dtype=np.float64)
        return scores, os.getpid(), start, time.time()


@dataclass
class SearchHooks:
    """Test hooks: ``on_submit(pool, slot, n_submitted)`` after each batch is sent to an actor;
    ``on_generation(generation)`` after each generation is scored and saved."""
    on_submit: Optional[Callable[["ScorerPool", int, int], None]] = None
    on_generation: Optional[Callable[[int], None]] = None


class ScorerPool:
    """``num_actors`` scorer actors fed through ``ray.wait``.

    Each actor keeps up to two batches queued (the next one is already there while the
    driver handles a result). Results are stored by batch index, so the order in which
    they come back does not matter. An actor that dies (RayActorError: killed, OOM,
    node lost) is replaced by a fresh one and its batches go back to the queue; scores
    are deterministic, so the result is the same as without the failure.
    """

    def __init__(self, indicator_cls: type[Indicator], payload: dict, *, num_actors: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, hooks: Optional[SearchHooks] = None,
                 max_replacements: Optional[int] = None):
        import ray

        self.indicator_cls, self.num_cpus, self.num_gpus = indicator_cls, num_cpus, num_gpus
        self.actor_cls = ray.remote(ScorerActor)
        self.hooks = hooks or SearchHooks()
        self.payload_ref = ray.put(payload)  # once: every actor reads this one copy
        self.actors = [self._start() for _ in range(num_actors)]
        self.generation = [0] * num_actors  # bumped on replacement: stale failures are ignored
        self.replacements = 0
        self.max_replacements = 3 * num_actors + 3 if max_replacements is None else max_replacements
        self.log: list[dict] = []  # per batch: slot, batch, pid, start, end, n
        self.n_scored = 0
        self.busy_s = 0.0  # wall time spent inside score()
        self._submitted = 0
        # Fail here, with the constructor's error, rather than on the first batch.
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise PipelineError(f"a scorer actor failed to start: {_one_line(e)}") from e

    def _start(self):
        return self.actor_cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
            self.indicator_cls, self.payload_ref, self.num_cpus)

    def _replace(self, slot: int, err: BaseException) -> None:
        import ray

        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise PipelineError(f"scorer actors died {self.replacements} times; giving up "
                                f"(last: {_one_line(err)})") from err
        ray.kill(self.actors[slot], no_restart=True)  # harmless if it is already gone
        self.actors[slot] = self._start()
        self.generation[slot] += 1

    def score(self, archs: np.ndarray, batch_size: int) -> np.ndarray:
        import ray

        archs = np.ascontiguousarray(archs, dtype=np.int64)
        if len(archs) == 0:
            return np.zeros(0)
        # Smaller batches when there are few candidates, so that every actor gets work.
        bs = max(1, min(batch_size, math.ceil(len(archs) / len(self.actors))))
        batches = [archs[i:i + bs] for i in range(0, len(archs), bs)]
        queue = list(range(len(batches)))[::-1]  # pop() takes the lowest index first
        results: list[Optional[np.ndarray]] = [None] * len(batches)
        inflight: dict = {}  # ref -> (slot, actor generation, batch index)
        load = [0] * len(self.actors)
        start = time.perf_counter()
        while queue or inflight:
            for slot in sorted(range(len(self.actors)), key=lambda s: load[s]):
                while queue and load[slot] < 2:
                    b = queue.pop()
                    ref = self.actors[slot].score.remote(batches[b])
                    inflight[ref] = (slot, self.generation[slot], b)
                    load[slot] += 1
                    self._submitted += 1
                    if self.hooks.on_submit:
                        self.hooks.on_submit(self, slot, self._submitted)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, gen, b = inflight.pop(ref)
                if gen == self.generation[slot]:
                    load[slot] -= 1
                try:
                    scores, pid, t0, t1 = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    queue.append(b)  # rescored on whichever actor is free next
                    if gen == self.generation[slot]:
                        self._replace(slot, e)
                        load[slot] = 0
                        # Its other in-flight batches fail too and are requeued as they arrive.
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise PipelineError(f"indicator {self.indicator_cls.name!r} failed on an actor: "
                                        f"{_one_line(e)}") from e
                results[b] = scores
                self.log.append({"slot": slot, "batch": b, "pid": pid, "start": t0, "end": t1, "n": len(scores)})
        self.busy_s += time.perf_counter() - start
        self.n_scored += len(archs)
        return np.concatenate(results)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ======================================================================================
# Evolutionary search
# ======================================================================================


class NoCandidatesError(PipelineError):
    """Random sampling found no architecture within the budgets."""


@dataclass
class Record:
    arch: Arch
    score: float
    source: str  # random | mutation | crossover | exact
    generation: int  # -1 for the exact solver's architectures


class Sampler:
    """Seeded candidate generation; every candidate is valid, within budget and unseen."""

    def __init__(self, budgets: Budgets, rng: np.random.Generator):
        self.budgets, self.rng = budgets, rng
        allowed = budgets.allowed
        self.n_allowed = allowed.sum(1)
        # choice_of[l, j]: the j-th allowed choice of layer l.
        self.choice_of = np.zeros(allowed.shape, dtype=np.int64)
        for l, row in enumerate(allowed):
            ks = np.flatnonzero(row)
            self.choice_of[l, :len(ks)] = ks
        self.draws = 0

    def _uniform(self, n: int) -> np.ndarray:
        j = (self.rng.random((n, len(self.n_allowed))) * self.n_allowed).astype(np.int64)
        return self.choice_of[np.arange(len(self.n_allowed)), j]

    def _keep(self, cands: np.ndarray, seen: set, out: list, want: int) -> None:
        for a in cands[self.budgets.within(cands)].tolist():
            t = tuple(a)
            if t not in seen:
                seen.add(t)
                out.append(t)
                if len(out) == want:
                    return

    def _guided(self, n: int) -> np.ndarray:
        """Architectures drawn layer by layer (in a random layer order) among the choices
        that still leave every budget reachable with the unassigned layers. Not uniform
        over the feasible set, but it finds architectures under budgets so tight that
        uniform draws almost never fit (e.g. 280M in spos_shufflenet, cheapest 270M)."""
        allowed = self.budgets.allowed
        L, K = allowed.shape
        active = self.budgets.active
        tables = [np.nan_to_num(c.table) for c in active]
        rest_min = [float(np.nanmin(c.table, 1).sum()) for c in active]
        rest_max = [float(np.nanmax(c.table, 1).sum()) for c in active]
        spent = [np.full(n, c.fixed) for c in active]
        archs = np.zeros((n, L), dtype=np.int64)
        ok = np.ones(n, dtype=bool)
        for l in self.rng.permutation(L):
            feasible = np.broadcast_to(allowed[l], (n, K)).copy()
            for i, c in enumerate(active):
                rest_min[i] -= float(np.nanmin(c.table[l]))
                rest_max[i] -= float(np.nanmax(c.table[l]))
                total = spent[i][:, None] + tables[i][l][None, :]
                if c.hi < math.inf:
                    feasible &= total + rest_min[i] <= c.hi
                if c.lo > 0:
                    feasible &= total + rest_max[i] >= c.lo
            count = feasible.sum(1)
            ok &= count > 0
            # Uniform among the feasible choices: the r-th True of each row.
            r = (self.rng.random(n) * np.maximum(count, 1)).astype(np.int64)
            k = (np.cumsum(feasible, 1) > r[:, None]).argmax(1)
            archs[:, l] = np.where(count > 0, k, self.choice_of[l, 0])
            for i in range(len(active)):
                spent[i] += tables[i][l][archs[:, l]]
        return archs[ok]

    def random(self, want: int, seen: set, *, max_draws: int = 200_000) -> list[Arch]:
        """Rejection sampling in vectorised chunks, at most ``max_draws`` draws.

        Uniform draws first (unbiased, as in SPOS); if they rarely fit the budgets, the
        rest of the draws are budget-guided (``_guided``). Either way every candidate is
        checked with the real costs, and the draws stop after ``max_draws``.
        """
        out: list[Arch] = []
        draws = 0
        uniform_draws = min(max_draws // 10, 20_000)
        while len(out) < want and draws < max_draws:
            n = min(max(256, 8 * want), max_draws - draws)
            cands = self._uniform(n) if draws < uniform_draws else self._guided(n)
            self._keep(cands, seen, out, want)
            draws += n
        self.draws += draws
        return out

    def mutations(self, parents: list[Arch], want: int, prob: float, seen: set) -> list[Arch]:
        out: list[Arch] = []
        for _ in range(10):  # SPOS: at most 10x as many tries as wanted
            if len(out) == want or not parents:
                break
            n = max(2 * want, 16)
            base = np.array(parents)[self.rng.integers(len(parents), size=n)]
            flip = self.rng.random(base.shape) < prob
            cands = np.where(flip, self._uniform(n), base)
            self._keep(cands, seen, out, want)
        return out

    def crossovers(self, parents: list[Arch], want: int, seen: set) -> list[Arch]:
        out: list[Arch] = []
        if len(parents) < 2:
            return out
        for _ in range(10):
            if len(out) == want:
                break
            n = max(2 * want, 16)
            p = np.array(parents)
            pick = np.stack([self.rng.choice(len(parents), size=2, replace=False) for _ in range(n)])
            mask = self.rng.random((n, p.shape[1])) < 0.5
            cands = np.where(mask, p[pick[:, 0]], p[pick[:, 1]])
            self._keep(cands, seen, out, want)
        return out


def evolve(budgets: Budgets, score_fn: Callable[[np.ndarray], np.ndarray], q: SearchConfig, seed: int, *,
           cache: Optional[dict] = None, progress: Progress = print,
           on_generation: Optional[Callable[[list[Record], dict], None]] = None) -> list[Record]:
    """The paper's evolutionary search (SPOS): returns every record, in the order scored.

    Generation 0 is ``population`` random architectures; each later generation makes
    ``mutations`` mutants and ``crossovers`` children of the ``parents`` best scored so
    far, and refills with random ones up to ``population``. ``generations`` counts all
    of them. Candidates are drawn within budget and never seen before, so nothing is
    scored twice. All randomness comes from one seeded Generator on the driver and a
    generation's candidates are scored as one ordered array, so the result depends on
    the seed only. ``cache`` (arch -> score) supplies scores known from an interrupted
    run; the replay asks ``score_fn`` only for the rest.
    """
    rng = np.random.default_rng(seed)
    sampler = Sampler(budgets, rng)
    cache = {} if cache is None else cache
    records: list[Record] = []
    seen: set = set()
    ranked: list[Record] = []  # all records, best first
    t0 = time.perf_counter()
    for gen in range(q.generations):
        if gen == 0:
            cands = [(a, "random") for a in sampler.random(q.population, seen)]
            if not cands:
                raise NoCandidatesError(
                    f"no random architecture within budget ({budgets.describe()}) in {sampler.draws} draws "
                    "(uniform, then budget-guided); the budgets together leave (almost) no architecture: "
                    "loosen them, or use search.method=exact with an additive indicator (bn)")
        else:
            parents = [r.arch for r in ranked[:q.parents]]
            cands = [(a, "mutation") for a in sampler.mutations(parents, q.mutations, q.mutation_prob, seen)]
            cands += [(a, "crossover") for a in sampler.crossovers(parents, q.crossovers, seen)]
            cands += [(a, "random") for a in sampler.random(q.population - len(cands), seen)]
        if not cands:
            progress(f"search: generation {gen}: no unseen architecture left within budget; stopping early")
            break
        archs = np.array([a for a, _ in cands], dtype=np.int64)
        todo = [i for i, (a, _) in enumerate(cands) if a not in cache]
        if todo:
            for i, s in zip(todo, score_fn(archs[todo])):
                cache[cands[i][0]] = float(s)
        new = [Record(a, cache[a], src, gen) for a, src in cands]
        records += new
        ranked = sorted(ranked + new, key=lambda r: (-r.score, r.arch))
        best = ranked[0]
        counts = {s: sum(1 for _, src in cands if src == s) for s in ("mutation", "crossover", "random")}
        progress(f"search gen {gen + 1}/{q.generations}: {len(new)} new ({counts['mutation']} mut, "
                 f"{counts['crossover']} cross, {counts['random']} random; {len(todo)} scored), "
                 f"best {best.score:.5g} [{_fmt_costs(budgets, best.arch)}], {time.perf_counter() - t0:.1f}s")
        if on_generation:
            on_generation(records, cache)
    return records


def _fmt_costs(budgets: Budgets, arch: Arch) -> str:
    costs = budgets.costs(np.array([arch]))
    return ", ".join(f"{c.name} {c.fmt(float(costs[c.name][0]))}" for c in budgets.constraints)


# ======================================================================================
# The stage
# ======================================================================================


def checked_space(cfg: Config, ckpt: dict, splits: Splits) -> SearchSpace:
    """The configured space (adapted to the dataset), refusing a supernet from another one."""
    info = splits.info
    wanted = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    try:
        trained = space_from_dict(ckpt["space"], source=SUPERNET_FILE)
    except SpaceError as e:
        raise PipelineError(str(e)) from None
    if ckpt["fingerprint"] != wanted.fingerprint or trained.fingerprint != wanted.fingerprint:
        raise PipelineError(
            f"{SUPERNET_FILE} was trained on space {trained.name!r} ({trained.input_size}px, "
            f"{trained.num_classes} classes, fingerprint {ckpt['fingerprint']}), not the configured "
            f"{wanted.name!r} on {info.name} ({wanted.input_size}px, {wanted.num_classes} classes, "
            f"fingerprint {wanted.fingerprint}); a checkpoint from another space is refused: "
            "use the run_dir of this space's supernet or set space.name/data to match")
    return wanted


def _scoring_key(cfg: Config, ckpt: dict) -> str:
    """What a cached score depends on: the supernet and the indicator's own settings."""
    q = cfg.search
    # The indicator table changes whenever the trained BN parameters do.
    table = np.ascontiguousarray(np.nan_to_num(np.asarray(ckpt.get("indicator", 0.0), dtype=np.float64)))
    key = [ckpt["fingerprint"], str(ckpt.get("epoch")), hashlib.sha256(table.tobytes()).hexdigest()[:16], q.indicator]
    if q.indicator != "bn":
        key += [str(cfg.seed), str(cfg.supernet.batch_size), str(q.calib_batches), str(q.val_batches),
                repr(sorted(cfg.data.__dict__.items()))]
    return "|".join(key)


def _load_cache(run: RunDir, key: str, progress: Progress) -> dict:
    if not run.exists(CACHE_FILE):
        return {}
    try:
        df = run.read_parquet(CACHE_FILE)
    except StorageError as e:
        progress(f"search: ignoring {CACHE_FILE} ({_one_line(e)})")
        return {}
    if len(df) == 0 or (df["key"] != key).any():
        progress(f"search: {CACHE_FILE} is from another supernet or indicator setting; not reused")
        return {}
    progress(f"search: resuming with {len(df)} cached scores from an interrupted search")
    return {tuple(int(v) for v in a): float(s) for a, s in zip(df["arch"], df["score"])}


def _rows(space: SearchSpace, budgets: Budgets, records: list[Record]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=["arch", "ops", "score", *[c.name for c in budgets.constraints],
                                     "source", "generation"])
    archs = np.array([r.arch for r in records], dtype=np.int64)
    costs = budgets.costs(archs)
    df = pd.DataFrame({
        "arch": [list(r.arch) for r in records],
        "ops": [",".join(space.op_names(r.arch)) for r in records],
        "score": [r.score for r in records],
        **{c.name: costs[c.name] for c in budgets.constraints},
        "source": [r.source for r in records],
        "generation": np.array([r.generation for r in records], dtype=np.int64),
    })
    return df


def _summary(row: Optional[Record], budgets: Budgets, space: SearchSpace) -> Optional[dict]:
    if row is None:
        return None
    costs = budgets.costs(np.array([row.arch]))
    return {"arch": list(row.arch), "ops": space.op_names(row.arch), "score": row.score,
            **{c.name: float(costs[c.name][0]) for c in budgets.constraints}, "source": row.source}


def run_search(cfg: Config, run: RunDir, progress: Progress = print, *,
               hooks: Optional[SearchHooks] = None) -> dict:
    """Stage 2. Returns the result dict (also written to ``search/result.json``)."""
    # Finished means the result *and* the top-N it stands for: after a damaged top-N is
    # deleted (as its CorruptFileError message says), the search runs again.
    if run.exists(RESULT_FILE) and run.exists(TOPN_FILE):
        result = run.read_json(RESULT_FILE)
        progress(f"search: finished already ({run.path(RESULT_FILE)}); best score {result['best']['score']:.5g}")
        return result

    t_start = time.perf_counter()
    q = cfg.search
    hooks = hooks or SearchHooks()
    indicator_cls = get_indicator(q.indicator)
    if q.method == "exact" and not indicator_cls.additive:
        raise PipelineError(f"search.method=exact needs an indicator that is a sum over layers (bn); "
                            f"{q.indicator!r} is not: use search.method=evolution")

    ckpt = load_supernet(run)
    try:
        splits = build_datasets(cfg.data, seed=cfg.seed)
    except DataError as e:
        raise PipelineError(str(e)) from None
    space = checked_space(cfg, ckpt, splits)
    budgets = make_budgets(q, space)
    budgets.check_feasible()
    progress(f"search: {space.name} ({space.num_layers} layers x {space.num_choices} choices, "
             f"{space.size:.3g} architectures), indicator {q.indicator}, method {q.method}, "
             f"budget: {budgets.describe()}")
    payload = indicator_cls.prepare(cfg=cfg, space=space, checkpoint=ckpt, splits=splits)

    # ---- exact solver: only for additive indicators, and in milliseconds
    exact: list[Record] = []
    exact_s, exact_note = None, None
    if q.method in ("exact", "both"):
        if indicator_cls.additive:
            table = indicator_cls(payload).table
            t0 = time.perf_counter()
            found = exact_search(table, budgets, q.top_n)
            exact_s = time.perf_counter() - t0
            if not found:
                raise PipelineError(f"no architecture in {space.name} meets all budgets together "
                                    f"({budgets.describe()}); loosen one of them")
            exact = [Record(a, s, "exact", -1) for s, a in found]
            progress(f"search: exact optimum {found[0][0]:.5g} [{_fmt_costs(budgets, found[0][1])}] "
                     f"in {exact_s * 1e3:.1f} ms (top {len(found)})")
        else:
            exact_note = (f"the exact solver does not apply: indicator {q.indicator!r} is not a sum over layers; "
                          "evolution only")
            progress(f"search: {exact_note}")

    # ---- evolution on the Ray actor pool
    records: list[Record] = []
    evo_s, pool_stats, evolution_note = None, {}, None
    if q.method in ("evolution", "both"):
        ensure_ray(cfg)
        key = _scoring_key(cfg, ckpt)
        cache = _load_cache(run, key, progress)

        def save_generation(recs: list[Record], cache: dict) -> None:
            # After every generation: what a rerun needs to skip the scoring done so far.
            run.write_parquet(CACHE_FILE, pd.DataFrame({
                "arch": [list(a) for a in cache], "score": list(cache.values()), "key": key}))
            if hooks.on_generation:
                hooks.on_generation(recs[-1].generation)

        pool = ScorerPool(indicator_cls, payload, num_actors=q.num_actors, num_cpus=q.cpus_per_actor,
                          num_gpus=q.gpus_per_actor, hooks=hooks)
        t0 = time.perf_counter()
        try:
            records = evolve(budgets, lambda a: pool.score(a, q.batch_archs), q, cfg.seed, cache=cache,
                             progress=progress, on_generation=save_generation)
        except NoCandidatesError as e:
            if not exact:
                raise
            # A budget so tight that random sampling misses it: the exact answer stands.
            evolution_note = str(e)
            progress(f"search: evolution skipped: {e}")
        finally:
            pool.shutdown()
        evo_s = time.perf_counter() - t0
        pool_stats = {"n_scored_by_actors": pool.n_scored, "actor_replacements": pool.replacements,
                      "archs_per_sec": pool.n_scored / pool.busy_s if pool.busy_s > 0 else None}

    # ---- compare, rank, write
    evo_ranked = sorted(records, key=lambda r: (-r.score, r.arch))
    evo_best = evo_ranked[0] if evo_ranked else None
    exact_best = exact[0] if exact else None
    gap = None
    if exact_best and evo_best:
        gap = exact_best.score - evo_best.score
        if gap < -1e-9 * max(1.0, abs(exact_best.score)):
            progress(f"search: WARNING evolution beat the exact solver by {-gap:.3g}: a bug, please report")
        if evo_best.arch == exact_best.arch or abs(gap) <= 1e-12 * max(1.0, abs(exact_best.score)):
            progress("search: evolution reached the exact optimum")
        else:
            progress(f"search: evolution's best {evo_best.score:.6g} differs from the exact optimum "
                     f"{exact_best.score:.6g}: gap {gap:.4g} ({100 * gap / abs(exact_best.score):.3g}%)")

    top = exact if exact else evo_ranked[:q.top_n]
    seen = {r.arch for r in records}
    scored = records + [r for r in exact if r.arch not in seen]
    scored_df = _rows(space, budgets, scored)
    top_df = _rows(space, budgets, top).drop(columns=["generation"])
    top_df.insert(0, "rank", np.arange(1, len(top_df) + 1, dtype=np.int64))
    run.write_parquet(SCORED_FILE, scored_df)
    run.write_parquet(TOPN_FILE, top_df)

    budget_dict = {}
    for c in budgets.active:
        if c.lo > 0:
            budget_dict[f"min_{c.name}"] = c.lo
        if c.hi < math.inf:
            budget_dict[f"max_{c.name}"] = c.hi
    elapsed = time.perf_counter() - t_start
    result = {
        "space": space.name,
        "fingerprint": space.fingerprint,
        "indicator": q.indicator,
        "method": q.method,
        "budgets": budget_dict,
        "best": _summary(top[0], budgets, space),
        "exact_best": _summary(exact_best, budgets, space),
        "evolution_best": _summary(evo_best, budgets, space),
        "gap": gap,
        "evolution_reached_exact": None if gap is None else bool(abs(gap) <= 1e-12 * max(1.0, abs(exact_best.score))),
        "exact_note": exact_note,
        "evolution_note": evolution_note,
        "topn": [list(r.arch) for r in top],
        "n_scored": len(scored),
        "generations": (records[-1].generation + 1) if records else 0,
        "exact_s": exact_s,
        "evolution_s": evo_s,
        "elapsed_s": elapsed,
        "archs_per_sec": pool_stats.get("archs_per_sec"),
        "n_scored_by_actors": pool_stats.get("n_scored_by_actors", 0),
        "actor_replacements": pool_stats.get("actor_replacements", 0),
        "supernet_epoch": ckpt.get("epoch"),
        "supernet_mode": ckpt.get("mode"),
    }
    run.write_json(RESULT_FILE, result)  # last: its presence marks the stage finished

    show = top_df.copy()
    for c in budgets.constraints:
        if c.name != "latency":
            show[c.name] = [_human(v) for v in show[c.name]]
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        progress(f"search: top {len(show)} ({'exact' if exact else 'evolution'}), {len(scored)} architectures "
                 f"scored in {elapsed:.1f}s\n" + show.drop(columns=["arch"]).to_string(index=False))
    return result
