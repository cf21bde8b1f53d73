"""Ranking quality: Kendall's tau between supernet indicators and standalone accuracy.

M fixed-depth architectures of the default space (its fixed layers are identity in every
one) are sampled across the cost range the default search sees: equal-width FLOPs bins
from the cheapest network to ``search.max_flops``, one seeded random architecture per
bin. Each is trained standalone from scratch with the pipeline's retraining recipe
(``pipeline.retrain``: SGD + Nesterov, cosine, label smoothing) with ``--truth-seeds``
seeds (init, data order, augmentation); the ground truth is the mean test accuracy over
those seeds, and the tau between two seeds' accuracies is the **ceiling**: no indicator
can rank the architectures better than they rank themselves.

Each supernet recipe (``RECIPES``) is trained with ``--supernet-seeds`` seeds as the
pipeline trains them (``SupernetTrainer``, the default run's steps and schedule), and
scores the M architectures with both indicators of ``pipeline.search``:

- ``bn``: the sum over layers of the ops' mean |gamma| (BN-NAS; free), from the seeds'
  mean table, as the search uses it;
- ``acc``: validation accuracy after BN recalibration (SPOS; forward passes), the mean
  over the seeds.

Kendall's tau-b against the ground truth, with a bootstrap 95% interval over the
architectures, and paired bootstrap intervals of the difference to FLOPs (the trivial
baseline: a sample stratified by cost rewards any indicator that merely tracks size) and
to SPOS (``acc`` on the ``all`` supernet). Every training runs in its own process with
one torch thread, ``--jobs`` at once, so the figures do not depend on the job count.

    .venv/bin/python bench/bench_ranking.py            # CPU setting: M=20, 2+2 seeds, < 1 h on 2 idle cores
    .venv/bin/python bench/bench_ranking.py --m 30 --fraction 1 --train-epochs 5 --jobs 16   # a bigger machine

Writes bench/results/ranking.{md,csv} (taus) and ranking_archs.csv (per architecture).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_search import random_archs  # noqa: E402
from bench.common import RESULTS, machine, write_table  # noqa: E402
from pipeline.ranking import kendall_tau_b  # noqa: E402

# name -> (space, supernet settings, what it is). The settings not named are the
# pipeline's defaults (1 epoch per seed, batch 128, lr 0.25 per 512, linear decay).
RECIPES: dict[str, tuple[str, dict, str]] = {
    "bn_last": ("mobilenet_small", {"mode": "bn_last", "gamma_init": 1.0, "train_classifier": False},
                "the authors' code: each op's last BN, gamma from 1, frozen random classifier"),
    "bn_all": ("mobilenet_small", {"mode": "bn_all", "gamma_init": 1.0, "train_classifier": False},
               "the paper's text: every BN, otherwise as bn_last"),
    "default": ("mobilenet_small_res", {},
                "the pipeline's default (BENCHMARKS.md section 7): shortcut, every BN, gamma from 0, classifier trained"),
    "all": ("mobilenet_small_res", {"mode": "all", "gamma_init": 1.0},
            "SPOS: every parameter trained, the same steps as the BN-only recipes"),
}


def tau_null_sd(n: int) -> float:
    """Standard deviation of tau between two independent rankings of n items (no ties)."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def stratified_by_flops(space, m: int, seed: int, lo: float, hi: float,
                        pool: int = 50000) -> tuple[np.ndarray, np.ndarray]:
    """m distinct architectures with FLOPs in [lo, hi], one per equal-width FLOPs bin of a
    random pool (an empty bin takes the nearest architecture not yet picked)."""
    from search_spaces import cost_tables

    rng = np.random.default_rng(seed)
    cands = random_archs(space, pool, rng)
    flops, _ = cost_tables(space).costs(cands)
    keep = (flops >= lo) & (flops <= hi)
    cands, flops = cands[keep], flops[keep]
    if len(np.unique(cands, axis=0)) < m:
        raise SystemExit(f"only {len(np.unique(cands, axis=0))} distinct architectures between "
                         f"{lo / 1e6:.2f}M and {hi / 1e6:.2f}M FLOPs; lower --m or raise --max-flops")
    edges = np.linspace(flops.min(), flops.max(), m + 1)
    picked, seen = [], set()
    for b in range(m):
        centre = (edges[b] + edges[b + 1]) / 2
        for idx in np.argsort(np.abs(flops - centre) + rng.uniform(0, 1e-3, len(flops))):
            key = tuple(int(v) for v in cands[idx])
            if key not in seen:
                seen.add(key)
                picked.append(idx)
                break
    return cands[picked], flops[picked]


def _config(job: dict):
    from pipeline.config import Config, DataConfig, RetrainConfig, SearchConfig, SpaceConfig, SupernetConfig

    return Config(seed=job["seed"], data=DataConfig(name="fashion_mnist", fraction=job["fraction"]),
                  space=SpaceConfig(job.get("space", "mobilenet_small_res")),
                  supernet=SupernetConfig(**{"num_workers": 1, "seeds": 1, **job.get("supernet", {})}),
                  retrain=RetrainConfig(epochs=job.get("epochs", 1)),
                  search=SearchConfig(calib_batches=job.get("calib", 20), val_batches=job.get("val", 10)))


def _standalone(job: dict) -> dict:
    """One architecture from scratch with the retraining recipe, seed ``job['index']``."""
    import torch

    from pipeline.common import resolve_space
    from pipeline.data import build_datasets
    from pipeline.retrain import Standalone
    from pipeline.seeding import derive_seed

    torch.set_num_threads(1)
    cfg = _config(job)
    splits = build_datasets(cfg.data, seed=cfg.seed)  # the same split for every seed
    info = splits.info
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    trial = Standalone(cfg, space, job["arch"], seed=derive_seed(cfg.seed, "standalone", job["index"]), index=0,
                       splits=splits)
    t0 = time.perf_counter()
    for epoch in range(cfg.retrain.epochs):
        trial.train_epoch(epoch)
    seconds = time.perf_counter() - t0
    test_acc, _ = trial.validate("test")
    return {"kind": "standalone", "arch_i": job["arch_i"], "index": job["index"], "test_acc": test_acc,
            "seconds": seconds}


def _supernet(job: dict) -> dict:
    """One seed of one recipe as the pipeline trains it; its BN table and acc scores."""
    import torch

    from pipeline.common import resolve_space
    from pipeline.config import validate
    from pipeline.data import build_datasets
    from pipeline.search import AccIndicator
    from pipeline.train_supernet import SupernetTrainer, seed_of
    from search_spaces import bn_indicator

    torch.set_num_threads(1)
    cfg = _config(job)
    validate(cfg)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    info = splits.info
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    trainer = SupernetTrainer(cfg, splits, seed=seed_of(cfg, job["index"]))
    t0 = time.perf_counter()
    rows = [trainer.train_epoch(e) for e in range(cfg.supernet.epochs)]
    seconds = time.perf_counter() - t0
    ckpt = {"model": {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}}
    acc = AccIndicator(AccIndicator.prepare(cfg=cfg, space=space, checkpoint=ckpt, splits=splits)).score(
        np.asarray(job["archs"]))
    return {"kind": "supernet", "recipe": job["recipe"], "index": job["index"],
            "table": bn_indicator(trainer.model).tolist(), "acc": [float(a) for a in acc],
            "train_acc": rows[-1]["acc"], "steps": trainer.steps_per_epoch * len(rows), "seconds": seconds}


def _run(job: dict) -> dict:
    return _standalone(job) if job["kind"] == "standalone" else _supernet(job)


def bootstrap(x, y, *, n_boot: int, rng: np.random.Generator, baseline=None) -> tuple:
    """tau_b(x, y) with a 95% bootstrap interval over the items; with ``baseline`` also the
    paired interval of tau_b(x, y) - tau_b(baseline, y) (the same resamples)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    taus, diffs = [], []
    for _ in range(n_boot):
        i = rng.integers(len(x), size=len(x))
        t = kendall_tau_b(x[i], y[i])
        taus.append(t)
        if baseline is not None:
            diffs.append(t - kendall_tau_b(np.asarray(baseline, float)[i], y[i]))
    lo, hi = np.nanpercentile(taus, [2.5, 97.5])
    out = (kendall_tau_b(x, y), float(lo), float(hi))
    if baseline is not None:
        dlo, dhi = np.nanpercentile(diffs, [2.5, 97.5])
        out += (float(dlo), float(dhi))
    return out


def main(argv=None) -> int:
    from pipeline.common import resolve_space
    from pipeline.config import SearchConfig
    from pipeline.data import build_datasets
    from search_spaces import arch_scores, cost_tables

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=20, help="architectures")
    ap.add_argument("--truth-seeds", type=int, default=2, help="standalone seeds per architecture")
    ap.add_argument("--supernet-seeds", type=int, default=2, help="seeds per supernet recipe (the default run's 2)")
    ap.add_argument("--fraction", type=float, default=0.5, help="data.fraction of Fashion-MNIST for standalone training")
    ap.add_argument("--train-epochs", type=int, default=3, help="standalone epochs per architecture")
    ap.add_argument("--supernet-fraction", type=float, default=1.0,
                    help="data.fraction for the supernets (1.0: the default run's 429 steps per seed)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--max-flops", type=float, default=SearchConfig().max_flops, help="the budget's upper end")
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (1 torch thread each)")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)}")
    if args.truth_seeds < 2:
        ap.error("--truth-seeds must be >= 2: the ceiling is the tau between two seeds")

    print(f"== ranking quality: {machine()}", flush=True)
    t_start = time.perf_counter()
    base = _config({"seed": args.seed, "fraction": args.fraction})
    splits = build_datasets(base.data, seed=args.seed)
    space = resolve_space(base, splits.info.in_channels, splits.info.num_classes, splits.info.image_size)
    costs = cost_tables(space)
    cheapest = costs.fixed_flops + float(np.nanmin(costs.flops, 1).sum())
    archs, flops = stratified_by_flops(space, args.m, args.seed, cheapest, args.max_flops)
    _, params = costs.costs(archs)
    df = pd.DataFrame({"arch": [list(map(int, a)) for a in archs], "ops": [",".join(space.op_names(a)) for a in archs],
                       "flops_M": flops / 1e6, "params_K": params / 1e3})
    print(f"{len(archs)} architectures of {space.name}, {flops.min() / 1e6:.2f}M .. {flops.max() / 1e6:.2f}M FLOPs; "
          f"{args.truth_seeds} standalone seeds x {args.train_epochs} epochs on {len(splits.train)} images; "
          f"recipes {', '.join(recipes)} x {args.supernet_seeds} seeds", flush=True)

    jobs = [{"kind": "supernet", "recipe": r, "index": i, "seed": args.seed, "fraction": args.supernet_fraction,
             "space": RECIPES[r][0], "supernet": RECIPES[r][1], "archs": df["arch"].tolist()}
            for r in recipes for i in range(args.supernet_seeds)]
    jobs += [{"kind": "standalone", "arch_i": a, "arch": df["arch"][a], "index": s, "seed": args.seed,
              "fraction": args.fraction, "epochs": args.train_epochs}
             for s in range(args.truth_seeds) for a in range(len(df))]
    outs = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for o in pool.imap_unordered(_run, jobs):
            outs.append(o)
            what = (f"{o['recipe']} seed {o['index']}: train acc {100 * o['train_acc']:.1f}% after {o['steps']} steps"
                    if o["kind"] == "supernet" else
                    f"arch {o['arch_i'] + 1} seed {o['index']}: test acc {100 * o['test_acc']:.2f}%")
            print(f"  [{len(outs)}/{len(jobs)}] {what} ({o['seconds']:.0f} s)", flush=True)

    truth = np.full((args.truth_seeds, len(df)), np.nan)
    for o in outs:
        if o["kind"] == "standalone":
            truth[o["index"], o["arch_i"]] = o["test_acc"]
    for s in range(args.truth_seeds):
        df[f"test_acc_seed{s}"] = truth[s]
    df["test_acc"] = truth.mean(0)
    rng = np.random.default_rng(args.seed)
    flops_col = df["flops_M"].to_numpy()
    rows = []

    def add(indicator, supernet, scores, **extra):
        t, lo, hi, dlo, dhi = bootstrap(scores, df["test_acc"], n_boot=args.boot, rng=rng, baseline=flops_col)
        rows.append({"indicator": indicator, "supernet": supernet, "tau": t, "ci_lo": lo, "ci_hi": hi,
                     "vs_flops_lo": dlo, "vs_flops_hi": dhi, **extra})

    ceiling = bootstrap(truth[0], truth[1], n_boot=args.boot, rng=rng)
    rows.append({"indicator": "ceiling: standalone seed 0 vs seed 1", "supernet": "-", "tau": ceiling[0],
                 "ci_lo": ceiling[1], "ci_hi": ceiling[2]})
    add("FLOPs (baseline)", "-", flops_col)
    add("params (baseline)", "-", df["params_K"].to_numpy())
    sup = {r: sorted((o for o in outs if o["kind"] == "supernet" and o["recipe"] == r), key=lambda o: o["index"])
           for r in recipes}
    for r in recipes:
        tables = [np.array(o["table"], dtype=float) for o in sup[r]]
        bn = arch_scores(np.mean(tables, 0), archs)
        acc = np.mean([o["acc"] for o in sup[r]], 0)
        df[f"bn[{r}]"], df[f"acc[{r}]"] = bn, acc
        extra = {"train_acc": float(np.mean([o["train_acc"] for o in sup[r]])),
                 "steps_per_seed": sup[r][0]["steps"], "s_per_seed": float(np.mean([o["seconds"] for o in sup[r]]))}
        add("bn", r, bn, tau_seed0=kendall_tau_b(arch_scores(tables[0], archs), df["test_acc"]), **extra)
        add("acc", r, acc, tau_seed0=kendall_tau_b(sup[r][0]["acc"], df["test_acc"]), **extra)
    taus = pd.DataFrame(rows)
    if "all" in recipes:  # the paired difference to SPOS, for every other indicator
        spos = df["acc[all]"].to_numpy()
        for i, row in taus.iterrows():
            if row["supernet"] in recipes and (row["indicator"], row["supernet"]) != ("acc", "all"):
                col = f"{row['indicator']}[{row['supernet']}]"
                _, _, _, dlo, dhi = bootstrap(df[col], df["test_acc"], n_boot=args.boot, rng=rng, baseline=spos)
                taus.loc[i, ["vs_spos_lo", "vs_spos_hi"]] = dlo, dhi

    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS / "ranking_archs.csv", index=False)
    standalone_s = sum(o["seconds"] for o in outs if o["kind"] == "standalone")
    notes = [
        f"M = {len(df)} fixed-depth architectures of {space.name} ({flops.min() / 1e6:.2f}M..{flops.max() / 1e6:.2f}M "
        f"FLOPs: the default search's range, equal-width bins), each trained standalone {args.train_epochs} epochs on "
        f"{len(splits.train)} Fashion-MNIST images (fraction {args.fraction:g}) with {args.truth_seeds} seeds; ground "
        f"truth = mean accuracy over the seeds on {len(splits.test)} test images "
        f"({100 * df['test_acc'].min():.2f}%..{100 * df['test_acc'].max():.2f}%). Supernets: {args.supernet_seeds} "
        f"seeds each, as the pipeline trains them (fraction {args.supernet_fraction:g}); bn from the seeds' mean "
        f"table, acc the seeds' mean. 95% intervals: bootstrap over the architectures ({args.boot} resamples); "
        f"vs_flops / vs_spos: paired intervals of the difference in tau.",
        "",
        f"- Two unrelated rankings of {len(df)} items give tau with SD {tau_null_sd(len(df)):.2f}.",
        f"- Standalone training {standalone_s:.0f} s of CPU in all; total wall {time.perf_counter() - t_start:.0f} s "
        f"with {args.jobs} jobs.",
        *(f"- `{r}`: {RECIPES[r][2]}" for r in recipes),
    ]
    write_table("ranking", taus.round(4), "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
