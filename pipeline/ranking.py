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
