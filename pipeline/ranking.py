"""Comparing rankings: the one rank distance (rank stability) and Kendall's tau-b.

``rank_distance`` is what stage 1 prints and records per epoch, what its early stop
compares with ``supernet.stable_tol``, and, through ``rank_distance_matrix``, what the
report draws as the paper's Fig. 5: one function, so the console and the plot show the
same number.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each entry of a 1-D array: 0 = highest; ties share their average rank."""
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="stable")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def rank_distance(prev: Optional[np.ndarray], cur: np.ndarray) -> float:
    """Normalised L1 distance between two [layers x choices] tables' per-layer op rankings.

    Per layer, the allowed ops (finite in both tables; NaN marks a forbidden choice) are
    ranked by score, highest first, ties sharing their average rank: an untrained
    supernet is full of ties (every gamma still 1), and breaking them in a fixed order
    would invent an ordering that then seems to change. The L1 distance between the two
    rank vectors is divided by its largest possible value, floor(n^2 / 2) for n ops
    (reached by reversing the ranking), and the result is averaged over the layers with
    at least two allowed ops, so that every layer weighs the same whatever its number of
    ops. 0 = the same ranking in every layer, 1 = every layer reversed. Without a previous
    table (the first epoch) it is NaN: there is nothing to compare with.
    """
    if prev is None:
        return math.nan
    prev, cur = np.asarray(prev, dtype=float), np.asarray(cur, dtype=float)
    if prev.shape != cur.shape:
        raise ValueError(f"indicator tables differ in shape: {prev.shape} vs {cur.shape}")
    total, layers = 0.0, 0
    for p, c in zip(prev, cur):
        allowed = np.isfinite(p) & np.isfinite(c)
        n = int(allowed.sum())
        if n < 2:
            continue
        total += float(np.abs(average_ranks(p[allowed]) - average_ranks(c[allowed])).sum()) / (n * n // 2)
        layers += 1
    return total / layers if layers else 0.0


def rank_distance_matrix(tables: Sequence[np.ndarray]) -> np.ndarray:
    """[T x T] ``rank_distance`` between every pair of the T tables (symmetric, 0 on the diagonal)."""
    n = len(tables)
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = m[j, i] = rank_distance(tables[i], tables[j])
    return m


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (ties in either corrected), O(n^2) with numpy.

    NaN when either vector is constant (tau-b is undefined there).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    denom = math.sqrt((n0 - int((dx == 0).sum())) * (n0 - int((dy == 0).sum())))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


#: Mean per-layer Kendall tau between seeds from which an op ranking counts as reproducible.
REPRODUCIBLE_TAU = 0.5


def seed_agreement(tables: Sequence[np.ndarray], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """How well supernets trained with different seeds agree on each layer's op ranking.

    ``tables`` are [layers x choices] indicator tables, one per seed (NaN = not a choice).
    Per layer with at least two allowed ops (fixed layers have nothing to rank), Kendall's
    tau-b between every pair of seeds, averaged over the pairs; ``tau`` is the mean over
    those layers, ``ci95`` a percentile bootstrap over the layers, and ``null_sd`` the
    standard deviation ``tau`` would have if every ranking were random (two seeds:
    Var(tau) = 2(2n+5) / (9n(n-1)) for n ops, averaged over the layers). 1 = the same
    ranking in every layer, 0 = no better than chance.
    """
    tables = [np.asarray(t, dtype=float) for t in tables]
    out = {"seeds": len(tables), "tau": math.nan, "ci95": [math.nan, math.nan], "null_sd": math.nan,
           "per_layer": {}, "reproducible": None, "threshold": REPRODUCIBLE_TAU}
    if len(tables) < 2:
        return out
    per_layer, null_var = {}, []
    for l in range(tables[0].shape[0]):
        allowed = np.logical_and.reduce([np.isfinite(t[l]) for t in tables])
        n = int(allowed.sum())
        if n < 2:
            continue
        taus = [kendall_tau_b(tables[i][l][allowed], tables[j][l][allowed])
                for i in range(len(tables)) for j in range(i + 1, len(tables))]
        taus = [t for t in taus if math.isfinite(t)]
        if taus:
            per_layer[l] = float(np.mean(taus))
            null_var.append(2 * (2 * n + 5) / (9 * n * (n - 1)))
    if not per_layer:
        return out
    values = np.array(list(per_layer.values()))
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tau = float(values.mean())
    out.update(tau=tau, ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
               null_sd=float(math.sqrt(np.mean(null_var) / len(values))), per_layer=per_layer,
               reproducible=bool(tau >= REPRODUCIBLE_TAU))
    return out


def agreement_line(a: dict, what: str) -> str:
    """One line: is the op ranking reproducible across seeds? A plain warning when it is not."""
    if not a or a.get("seeds", 1) < 2:
        return (f"{what} ranking: reproducibility not measured (supernet.seeds=1); set supernet.seeds=2 "
                "to see whether it is signal or noise")
    tau, (lo, hi) = a.get("tau"), a.get("ci95") or [None, None]
    if tau is None or not math.isfinite(tau) or lo is None or hi is None:
        return f"{what} ranking: seed agreement undefined (the seeds' scores are all tied)"
    over = f"{a['archs']} architectures, " if a.get("archs") else ""
    figure = (f"seed agreement tau {tau:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}, {over}{a['seeds']} seeds, "
              f"chance SD {a['null_sd']:.2f})")
    if a.get("reproducible"):
        return f"{what} ranking is reproducible across seeds: {figure}"
    return (f"WARNING: the {what} ranking is not reproducible across seeds: {figure}, below "
            f"{a['threshold']:.1f}; the pick is effectively random among architectures of similar cost")


def arch_agreement(scores: Sequence[Sequence[float]], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Seed agreement of an indicator that scores whole architectures (SPOS's ``acc``).

    ``scores[i]`` are seed i's scores of the same M architectures. ``tau`` is Kendall's
    tau-b between the seeds (averaged over pairs), ``ci95`` a percentile bootstrap over
    the architectures, ``null_sd`` its SD under random rankings, sqrt(2(2M+5) / (9M(M-1))).
    """
    s = [np.asarray(x, dtype=float) for x in scores]
    m = len(s[0]) if s else 0
    out = {"seeds": len(s), "archs": m, "tau": math.nan, "ci95": [math.nan, math.nan], "null_sd": math.nan,
           "reproducible": None, "threshold": REPRODUCIBLE_TAU}
    if len(s) < 2 or m < 3:
        return out

    def tau(idx: np.ndarray) -> float:
        vals = [kendall_tau_b(s[i][idx], s[j][idx]) for i in range(len(s)) for j in range(i + 1, len(s))]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    t = tau(np.arange(m))
    rng = np.random.default_rng(seed)
    boot = np.array([tau(rng.integers(0, m, size=m)) for _ in range(n_boot)])
    boot = boot[np.isfinite(boot)]
    out.update(tau=t, null_sd=math.sqrt(2 * (2 * m + 5) / (9 * m * (m - 1))),
               ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot.size else out["ci95"],
               reproducible=None if math.isnan(t) else bool(t >= REPRODUCIBLE_TAU))
    return out
