"""Search budgets: multiply-adds, parameters and latency as additive costs with limits.

Stage 2 searches under them; stage 1 checks them before it trains (an impossible budget
depends on the space alone, so it fails in a second, not after the supernet). Hence a
module of its own that imports neither stage.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from search_spaces import Arch, SearchSpace, cost_tables

from .common import PipelineError
from .config import SearchConfig


def allowed_mask(space: SearchSpace) -> np.ndarray:
    """[layers x choices] bool: True where the choice exists in its layer and is allowed there."""
    mask = np.zeros((space.num_layers, space.num_choices), dtype=bool)
    for layer in space.layers:
        mask[layer.index, :len(layer.allowed)] = layer.allowed
    return mask


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


def human(x: float) -> str:
    """A count with a K / M / G suffix, 4 significant digits."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


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
        return f"{x:.4g} ms" if self.name == "latency" else human(x)

    def cheapest(self) -> float:
        return self.fixed + float(np.nanmin(self.table, axis=1).sum())

    def dearest(self) -> float:
        return self.fixed + float(np.nanmax(self.table, axis=1).sum())


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

    def fmt_costs(self, arch: Arch) -> str:
        """One architecture's costs for a progress line: 'flops 3.98M, params 157K'."""
        costs = self.costs(np.array([arch]))
        return ", ".join(f"{c.name} {c.fmt(float(costs[c.name][0]))}" for c in self.constraints)

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
