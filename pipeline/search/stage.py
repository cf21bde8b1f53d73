"""Stage 2: find the best subnets of a trained supernet under FLOPs / params / latency budgets.

Reads ``supernet/final.pt`` (written by stage 1) and writes, under ``search/``:

- ``scored.parquet``: every architecture scored (arch, ops, score, flops, params,
  [latency], source, generation);
- ``topn.parquet``: the best ``search.top_n`` distinct architectures within budget
  (rank, arch, ops, score, flops, params, [latency], source);
- ``cache.parquet``: the scores so far, saved after every generation: a search
  interrupted part-way (crash, Ctrl-C) replays the seeded evolution on a rerun and
  scores only what the cache lacks;
- ``result.json`` LAST: its presence means the stage finished; a rerun returns it.

``run_search`` reads top to bottom: check the inputs, then the exact solver (additive
indicators only, milliseconds), then the evolution (scored on the Ray actor pool, or in
the driver for an additive indicator on a search of up to ``search.driver_max_archs``),
then compare the two and write the outputs. The helpers follow in that order.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from search_spaces import SearchSpace, space_from_dict
from search_spaces.space import SpaceError

from ..budgets import Budgets, human, make_budgets
from ..common import PipelineError, Progress, ensure_ray, resolve_space
from ..config import Config, SearchConfig
from ..data import DataError, Splits, build_datasets
from ..ranking import agreement_line, arch_agreement
from ..seeding import derive_seed
from ..storage import RunDir, StorageError
from ..train_supernet import FINAL as SUPERNET_FILE, load_supernet
from ..util import one_line
from .evolution import NoCandidatesError, Record, evolve
from .exact import exact_search
from .indicators import Indicator, get_indicator
from .pool import DriverScorer, ScorerPool, SearchHooks

SCORED_FILE = "search/scored.parquet"
TOPN_FILE = "search/topn.parquet"
RESULT_FILE = "search/result.json"
CACHE_FILE = "search/cache.parquet"


def run_search(cfg: Config, run: RunDir, progress: Progress = print, *,
               hooks: Optional[SearchHooks] = None) -> dict:
    """Stage 2. Returns the result dict (also written to ``search/result.json``)."""
    # Finished means the result *and* the top-N it stands for: after a damaged top-N is
    # deleted (as its CorruptFileError message says), the search runs again.
    if run.exists(RESULT_FILE) and run.exists(TOPN_FILE) and run.exists(SCORED_FILE):
        result = run.read_json(RESULT_FILE)
        progress(f"search: finished already ({run.path(RESULT_FILE)}); best score {result['best']['score']:.5g}")
        return result

    t_start = time.perf_counter()
    q = cfg.search
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
    indicator_cls.check_space(space, q)
    budgets = make_budgets(q, space)
    budgets.check_feasible()
    progress(f"search: {space.name} ({space.num_layers} layers x {space.num_choices} choices, "
             f"{space.size:.3g} architectures), indicator {q.indicator}, method {q.method}, "
             f"budget: {budgets.describe()}")
    payload = indicator_cls.prepare(cfg=cfg, space=space, checkpoint=ckpt, splits=splits)

    exact = _Exact()
    if q.method in ("exact", "both"):
        exact = _run_exact(q, indicator_cls, payload, budgets, space, progress)
    evolution = _Evolution()
    if q.method in ("evolution", "both"):
        evolution = _run_evolution(cfg, run, ckpt, indicator_cls, payload, budgets, hooks or SearchHooks(),
                                   progress, exact_found=bool(exact.records))
    gap = _compare(exact.best, evolution.best, progress)

    top = exact.records if exact.records else evolution.ranked[:q.top_n]
    if len(top) < q.top_n:
        progress(f"search: search.top_n={q.top_n} but only {len(top)} architectures "
                 f"{'meet the budgets' if exact.records else 'within the budgets were found'}; "
                 f"going on with those {len(top)}")
    seen = {r.arch for r in evolution.records}
    scored = evolution.records + [r for r in exact.records if r.arch not in seen]
    top_df = _write_tables(run, space, budgets, scored, top)
    agreement = None
    if not indicator_cls.additive and ckpt.get("seed_models"):
        agreement = _arch_seed_agreement(cfg, space, ckpt, splits, indicator_cls, scored, progress)
    elapsed = time.perf_counter() - t_start
    result = {
        "space": space.name,
        "fingerprint": space.fingerprint,
        "indicator": q.indicator,
        "method": q.method,
        "budgets": _budget_dict(budgets),
        "best": _summary(top[0], budgets, space),
        "exact_best": _summary(exact.best, budgets, space),
        "evolution_best": _summary(evolution.best, budgets, space),
        "gap": gap,
        "evolution_reached_exact": None if gap is None else bool(_same_score(gap, exact.best.score)),
        "exact_note": exact.note,
        "evolution_note": evolution.note,
        "topn": [list(r.arch) for r in top],
        "n_scored": len(scored),
        "generations": (evolution.records[-1].generation + 1) if evolution.records else 0,
        "exact_s": exact.seconds,
        "evolution_s": evolution.seconds,
        "elapsed_s": elapsed,
        "archs_per_sec": evolution.pool_stats.get("archs_per_sec"),
        "scored_in": evolution.pool_stats.get("scored_in"),  # driver (small additive searches) | actors
        "n_scored_by_actors": evolution.pool_stats.get("n_scored_by_actors", 0),
        "actor_replacements": evolution.pool_stats.get("actor_replacements", 0),
        "supernet_epoch": ckpt.get("epoch"),
        "supernet_mode": ckpt.get("mode"),
        # Non-additive indicators (acc): the seeds' agreement on a sample of architectures.
        # The BN indicator's is stage 1's (supernet/result.json), per layer.
        "seed_agreement": agreement,
    }
    run.write_json(RESULT_FILE, result)  # last: its presence marks the stage finished
    _show_top(top_df, budgets, "exact" if exact.records else "evolution", len(scored), elapsed, progress)
    return result


# ============================================================================ inputs

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


# ============================================================================ exact solver

@dataclass
class _Exact:
    records: list[Record] = field(default_factory=list)  # best first
    seconds: Optional[float] = None
    note: Optional[str] = None

    @property
    def best(self) -> Optional[Record]:
        return self.records[0] if self.records else None


def _run_exact(q: SearchConfig, indicator_cls: type[Indicator], payload: dict, budgets: Budgets,
               space: SearchSpace, progress: Progress) -> _Exact:
    if not indicator_cls.additive:
        note = f"the exact solver does not apply: indicator {q.indicator!r} is not a sum over layers; evolution only"
        progress(f"search: {note}")
        return _Exact(note=note)
    table = indicator_cls(payload).table
    t0 = time.perf_counter()
    found = exact_search(table, budgets, q.top_n)
    seconds = time.perf_counter() - t0
    if not found:
        raise PipelineError(f"no architecture in {space.name} meets all budgets together "
                            f"({budgets.describe()}); loosen one of them")
    progress(f"search: exact optimum {found[0][0]:.5g} [{budgets.fmt_costs(found[0][1])}] "
             f"in {seconds * 1e3:.1f} ms (top {len(found)})")
    return _Exact([Record(a, s, "exact", -1) for s, a in found], seconds)


# ============================================================================ evolution

@dataclass
class _Evolution:
    records: list[Record] = field(default_factory=list)  # in the order scored
    seconds: Optional[float] = None
    pool_stats: dict = field(default_factory=dict)
    note: Optional[str] = None

    @property
    def ranked(self) -> list[Record]:
        return sorted(self.records, key=lambda r: (-r.score, r.arch))

    @property
    def best(self) -> Optional[Record]:
        ranked = self.ranked
        return ranked[0] if ranked else None


def _run_evolution(cfg: Config, run: RunDir, ckpt: dict, indicator_cls: type[Indicator], payload: dict,
                   budgets: Budgets, hooks: SearchHooks, progress: Progress, *, exact_found: bool) -> _Evolution:
    q = cfg.search
    in_driver = indicator_cls.additive and q.population * q.generations <= q.driver_max_archs
    key = _scoring_key(cfg, ckpt)
    cache = _load_cache(run, key, progress)

    def save_generation(recs: list[Record], cache: dict) -> None:
        # After every generation: what a rerun needs to skip the scoring done so far.
        run.write_parquet(CACHE_FILE, pd.DataFrame({
            "arch": [list(a) for a in cache], "score": list(cache.values()), "key": key}))
        if hooks.on_generation:
            hooks.on_generation(recs[-1].generation)

    out = _Evolution()
    if in_driver:
        pool = DriverScorer(indicator_cls, payload)
        progress(f"search: scoring in the driver (indicator {q.indicator} is a table lookup; "
                 f"{q.population * q.generations} architectures at most <= search.driver_max_archs)")
    else:
        ensure_ray(cfg)
        pool = ScorerPool(indicator_cls, payload, num_actors=q.num_actors, num_cpus=q.cpus_per_actor,
                          num_gpus=q.gpus_per_actor, hooks=hooks)
    t0 = time.perf_counter()
    try:
        out.records = evolve(budgets, lambda a: pool.score(a, q.batch_archs), q, cfg.seed, cache=cache,
                             progress=progress, on_generation=save_generation)
    except NoCandidatesError as e:
        if not exact_found:
            raise
        # A budget so tight that random sampling misses it: the exact answer stands.
        out.note = str(e)
        progress(f"search: evolution skipped: {e}")
    finally:
        pool.shutdown()
    out.seconds = time.perf_counter() - t0
    out.pool_stats = {"scored_in": "driver" if in_driver else "actors",
                      "n_scored_by_actors": pool.n_scored_by_actors, "actor_replacements": pool.replacements,
                      "archs_per_sec": pool.n_scored / pool.busy_s if pool.busy_s > 0 else None}
    return out


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
        progress(f"search: ignoring {CACHE_FILE} ({one_line(e)})")
        return {}
    if len(df) == 0 or (df["key"] != key).any():
        progress(f"search: {CACHE_FILE} is from another supernet or indicator setting; not reused")
        return {}
    progress(f"search: resuming with {len(df)} cached scores from an interrupted search")
    return {tuple(int(v) for v in a): float(s) for a, s in zip(df["arch"], df["score"])}


# ============================================================================ seed agreement

AGREEMENT_ARCHS = 20  # architectures each seed's supernet scores for a non-additive indicator


def _arch_seed_agreement(cfg: Config, space: SearchSpace, ckpt: dict, splits: Splits,
                         indicator_cls: type[Indicator], scored: list[Record], progress: Progress) -> dict:
    """Score a seeded sample of the searched architectures on every seed's supernet (in this
    process: a few dozen evaluations) and measure how well the seeds' rankings agree."""
    rng = np.random.default_rng(derive_seed(cfg.seed, "seed_agreement"))
    pick = rng.choice(len(scored), size=min(AGREEMENT_ARCHS, len(scored)), replace=False)
    archs = np.array([scored[i].arch for i in sorted(pick)], dtype=np.int64)
    scores = [[scored[i].score for i in sorted(pick)]]  # seed 0: the search's own scores
    t0 = time.perf_counter()
    for model in ckpt["seed_models"]:
        payload = indicator_cls.prepare(cfg=cfg, space=space, checkpoint={**ckpt, "model": model}, splits=splits)
        scores.append(indicator_cls(payload).score(archs).tolist())
    agreement = arch_agreement(scores, seed=cfg.seed)
    agreement = {**agreement, "archs_scored": [list(map(int, a)) for a in archs], "scores": scores,
                 "seconds": time.perf_counter() - t0}
    progress(f"search: {agreement_line(agreement, f'{cfg.search.indicator} indicator')}")
    return _jsonable(agreement)


def _jsonable(d: dict) -> dict:
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    return {k: [fix(x) for x in v] if k == "ci95" else fix(v) for k, v in d.items()}


# ============================================================================ compare and write

def _same_score(gap: float, reference: float) -> bool:
    return abs(gap) <= 1e-12 * max(1.0, abs(reference))


def _compare(exact_best: Optional[Record], evo_best: Optional[Record], progress: Progress) -> Optional[float]:
    """The exact optimum minus evolution's best (None unless both ran); says how they compare."""
    if not (exact_best and evo_best):
        return None
    gap = exact_best.score - evo_best.score
    if gap < -1e-9 * max(1.0, abs(exact_best.score)):
        progress(f"search: WARNING evolution beat the exact solver by {-gap:.3g}: a bug, please report")
    if evo_best.arch == exact_best.arch or _same_score(gap, exact_best.score):
        progress("search: evolution reached the exact optimum")
    else:
        progress(f"search: evolution's best {evo_best.score:.6g} differs from the exact optimum "
                 f"{exact_best.score:.6g}: gap {gap:.4g} ({100 * gap / abs(exact_best.score):.3g}%)")
    return gap


def _rows(space: SearchSpace, budgets: Budgets, records: list[Record]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=["arch", "arch_authors", "ops", "score", *[c.name for c in budgets.constraints],
                                     "source", "generation"])
    archs = np.array([r.arch for r in records], dtype=np.int64)
    costs = budgets.costs(archs)
    return pd.DataFrame({
        "arch": [list(r.arch) for r in records],
        "arch_authors": [space.authors_arch(r.arch) for r in records],  # -1 = identity
        "ops": [",".join(space.op_names(r.arch)) for r in records],
        "score": [r.score for r in records],
        **{c.name: costs[c.name] for c in budgets.constraints},
        "source": [r.source for r in records],
        "generation": np.array([r.generation for r in records], dtype=np.int64),
    })


def _write_tables(run: RunDir, space: SearchSpace, budgets: Budgets, scored: list[Record],
                  top: list[Record]) -> pd.DataFrame:
    """Write scored.parquet and topn.parquet; return the top-N table."""
    top_df = _rows(space, budgets, top).drop(columns=["generation"])
    top_df.insert(0, "rank", np.arange(1, len(top_df) + 1, dtype=np.int64))
    run.write_parquet(SCORED_FILE, _rows(space, budgets, scored))
    run.write_parquet(TOPN_FILE, top_df)
    return top_df


def _budget_dict(budgets: Budgets) -> dict:
    out = {}
    for c in budgets.active:
        if c.lo > 0:
            out[f"min_{c.name}"] = c.lo
        if c.hi < math.inf:
            out[f"max_{c.name}"] = c.hi
    return out


def _summary(row: Optional[Record], budgets: Budgets, space: SearchSpace) -> Optional[dict]:
    if row is None:
        return None
    costs = budgets.costs(np.array([row.arch]))
    return {"arch": list(row.arch), "arch_authors": space.authors_arch(row.arch), "ops": space.op_names(row.arch),
            "score": row.score,
            **{c.name: float(costs[c.name][0]) for c in budgets.constraints}, "source": row.source}


def _show_top(top_df: pd.DataFrame, budgets: Budgets, source: str, n_scored: int, elapsed: float,
              progress: Progress) -> None:
    show = top_df.copy()
    for c in budgets.constraints:
        if c.name != "latency":
            show[c.name] = [human(v) for v in show[c.name]]
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        progress(f"search: top {len(show)} ({source}), {n_scored} architectures "
                 f"scored in {elapsed:.1f}s\n" + show.drop(columns=["arch", "arch_authors"]).to_string(index=False))
