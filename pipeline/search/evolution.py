"""The paper's evolutionary search (SPOS settings), seeded and budget-aware.

``evolve`` asks a scoring function (in the pipeline: the Ray actor pool) for the
scores of each generation's new candidates; everything random happens on the driver,
from one seeded generator, so the result depends on the seed only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from search_spaces import Arch

from ..budgets import Budgets
from ..common import PipelineError, Progress
from ..config import SearchConfig


class NoCandidatesError(PipelineError):
    """Random sampling found no architecture within the budgets."""


@dataclass
class Record:
    arch: Arch
    score: float
    source: str  # random | mutation | crossover | exact
    generation: int  # -1 for the exact solver's architectures


class Sampler:
    """Seeded candidate generation; every candidate is valid, within budget and unseen.

    Only the free layers (more than one allowed choice) draw: a layer fixed to one
    choice (identity, in a fixed-depth space) is filled in, and mutation, crossover and
    random draws spend nothing on it. So a search over a space with fixed layers makes
    exactly the draws, and finds exactly the architectures, of the same search over
    the space with those layers removed.
    """

    def __init__(self, budgets: Budgets, rng: np.random.Generator):
        self.budgets, self.rng = budgets, rng
        allowed = budgets.allowed
        n_allowed = allowed.sum(1)
        self.free = np.flatnonzero(n_allowed > 1)
        self.n_free = n_allowed[self.free]
        # choice_of[i, j]: the j-th allowed choice of the i-th free layer.
        self.choice_of = np.zeros((len(self.free), allowed.shape[1]), dtype=np.int64)
        for i, l in enumerate(self.free):
            ks = np.flatnonzero(allowed[l])
            self.choice_of[i, :len(ks)] = ks
        # Every layer's only (or first) allowed choice: what the fixed layers hold.
        self.base = allowed.argmax(1).astype(np.int64)
        self.draws = 0

    def _full(self, free_part: np.ndarray) -> np.ndarray:
        """[n x free layers] choices -> [n x layers] architectures, fixed layers filled in."""
        out = np.broadcast_to(self.base, (len(free_part), len(self.base))).copy()
        out[:, self.free] = free_part
        return out

    def _uniform_free(self, n: int) -> np.ndarray:
        j = (self.rng.random((n, len(self.free))) * self.n_free).astype(np.int64)
        return self.choice_of[np.arange(len(self.free)), j]

    def _uniform(self, n: int) -> np.ndarray:
        return self._full(self._uniform_free(n))

    def _keep(self, cands: np.ndarray, seen: set, out: list, want: int) -> None:
        for a in cands[self.budgets.within(cands)].tolist():
            t = tuple(a)
            if t not in seen:
                seen.add(t)
                out.append(t)
                if len(out) == want:
                    return

    def _guided(self, n: int) -> np.ndarray:
        """Architectures drawn layer by layer (in a random order of the free layers) among
        the choices that still leave every budget reachable with the unassigned layers.
        Not uniform over the feasible set, but it finds architectures under budgets so
        tight that uniform draws almost never fit (e.g. 280M in spos_shufflenet, cheapest
        270M)."""
        allowed = self.budgets.allowed
        L, K = allowed.shape
        active = self.budgets.active
        tables = [np.nan_to_num(c.table) for c in active]
        fixed = np.setdiff1d(np.arange(L), self.free)
        # The fixed layers cost what their one choice costs, in every candidate.
        spent = [np.full(n, c.fixed + float(t[fixed, self.base[fixed]].sum())) for c, t in zip(active, tables)]
        rest_min = [float(np.nanmin(c.table[self.free], 1).sum()) for c in active]
        rest_max = [float(np.nanmax(c.table[self.free], 1).sum()) for c in active]
        archs = np.broadcast_to(self.base, (n, L)).copy()
        ok = np.ones(n, dtype=bool)
        for l in self.rng.permutation(self.free):
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
            archs[:, l] = np.where(count > 0, k, self.base[l])
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
            base = np.array(parents)[self.rng.integers(len(parents), size=n)][:, self.free]
            flip = self.rng.random(base.shape) < prob
            cands = self._full(np.where(flip, self._uniform_free(n), base))
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
            p = np.array(parents)[:, self.free]
            pick = np.stack([self.rng.choice(len(parents), size=2, replace=False) for _ in range(n)])
            mask = self.rng.random((n, p.shape[1])) < 0.5
            cands = self._full(np.where(mask, p[pick[:, 0]], p[pick[:, 1]]))
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
                 f"best {best.score:.5g} [{budgets.fmt_costs(best.arch)}], {time.perf_counter() - t0:.1f}s")
        if on_generation:
            on_generation(records, cache)
    return records
