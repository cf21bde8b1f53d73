"""The exact solver: the constrained optimum of an additive indicator (``bn``).

The BN score and every cost are sums over layers, so the best architectures under the
budgets are a multiple-choice knapsack, solved here by branch and bound over the layers
with a dynamic-programming bound, checked against the real float costs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from search_spaces import Arch, arch_scores

from ..budgets import Budgets, Constraint


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
