"""What Ray costs: the default job through the pipeline, and as the same work in plain PyTorch.

Both sides run in one invocation, on the default config (``--set`` overrides apply to
both), one after the other:

- **pipeline**: Ray started locally (timed as its own row), then ``run_pipeline`` for
  stages 1-3: Ray Train workers, the actor search, Ray Tune trials with checkpoints.
- **plain**: the same work with no Ray, calling the same code directly. Stage 1: one
  process per seed (``SupernetTrainer``, one torch thread each, as each Ray Train
  worker has), the same seeds and steps. Stage 2: the exact solver and the evolution
  with the seeds' mean BN table, in this process. Stage 3: every trial the pipeline
  ran, for the epochs it ran (``retrain/trials.parquet``: ASHA's decisions taken as
  given), ``cpus / cpus_per_trial`` at once, one process each, with the pipeline's
  retraining code (``retrain.Standalone``: the trial's setup, epochs and validation),
  each epoch on the threads the pipeline's trial had for it (``retrain/history.parquet``:
  a survivor's freed CPUs included); then, as the pipeline's stage 3 ends, the winner's
  test evaluation and export.

The ratio pipeline / plain per stage and for the whole run is the overhead a user pays
for Ray (start-up, worker groups, checkpoints, actors, Tune's bookkeeping).

    .venv/bin/python bench/bench_overhead.py                      # the default job (~13 min on 2 cores)
    .venv/bin/python bench/bench_overhead.py --repeat 2           # two pairs, summed (~26 min)
    .venv/bin/python bench/bench_overhead.py --set data.fraction=0.2
    .venv/bin/python bench/bench_overhead.py --stages supernet --set supernet.epochs=3 --out overhead_supernet

Writes bench/results/overhead.{md,csv} (``--out`` names them).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_table  # noqa: E402

STAGES = ("supernet", "search", "retrain")


def _supernet_seed(job: dict) -> list:
    """Plain stage 1, one seed: the pipeline's trainer, no Ray, no checkpoints."""
    import torch

    from pipeline.data import build_datasets
    from pipeline.train_supernet import SupernetTrainer, seed_of
    from search_spaces import bn_indicator

    torch.set_num_threads(job["threads"])
    cfg = job["cfg"]
    trainer = SupernetTrainer(cfg, build_datasets(cfg.data, seed=cfg.seed), seed=seed_of(cfg, job["index"]))
    for epoch in range(cfg.supernet.epochs):
        trainer.train_epoch(epoch)
    return bn_indicator(trainer.model).tolist()


def _trial(job: dict) -> dict:
    """Plain stage 3, one trial: the pipeline's retraining code, each epoch on as many
    threads as the pipeline's trial had for it (``retrain/history.parquet``). Its weights."""
    import torch

    from pipeline.common import resolve_space
    from pipeline.data import build_datasets
    from pipeline.retrain import Standalone

    cfg, index = job["cfg"], job["index"]
    splits = build_datasets(cfg.data, seed=cfg.seed)
    info = splits.info
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    trial = Standalone(cfg, space, job["arch"], seed=cfg.seed, index=index, splits=splits)
    for epoch, threads in enumerate(job["threads"]):
        torch.set_num_threads(threads)
        trial.train_epoch(epoch)
        trial.validate()
    return trial.model.state_dict()


def plain(cfg, trials: pd.DataFrame | None, history: pd.DataFrame | None, cpus: int, out: str,
          stages: Sequence[str] = STAGES) -> dict[str, float]:
    """The same work as the pipeline's ``stages`` (a prefix of ``STAGES``), no Ray; wall
    seconds per stage (``out``: a folder for the exported model)."""
    from pipeline.budgets import make_budgets
    from pipeline.common import resolve_space
    from pipeline.data import build_datasets
    from pipeline.export import export_model
    from pipeline.retrain import test_accuracy
    from pipeline.storage import RunDir
    from pipeline.search.evolution import evolve
    from pipeline.search.exact import exact_search
    from search_spaces import arch_scores

    times = {}
    sc, ctx = cfg.supernet, mp.get_context("spawn")
    threads = max(1, int(sc.cpus_per_worker))
    t0 = time.perf_counter()
    with ctx.Pool(sc.seeds) as pool:
        tables = pool.map(_supernet_seed, [{"cfg": cfg, "index": i, "threads": threads} for i in range(sc.seeds)])
    times["supernet"] = time.perf_counter() - t0
    if "search" not in stages:
        return times

    t0 = time.perf_counter()
    splits = build_datasets(cfg.data, seed=cfg.seed)
    space = resolve_space(cfg, splits.info.in_channels, splits.info.num_classes, splits.info.image_size)
    table = np.mean([np.asarray(t, dtype=float) for t in tables], 0)
    budgets = make_budgets(cfg.search, space)
    q = cfg.search
    if q.method in ("exact", "both"):
        exact_search(table, budgets, q.top_n)
    if q.method in ("evolution", "both"):
        evolve(budgets, lambda archs: arch_scores(table, archs), q, cfg.seed,
               progress=lambda s: None)
    times["search"] = time.perf_counter() - t0
    if "retrain" not in stages:
        return times

    r = cfg.retrain
    t0 = time.perf_counter()
    at_once = max(1, int(cpus // r.cpus_per_trial))
    if r.max_concurrent:
        at_once = min(at_once, r.max_concurrent)
    # ASHA's decisions and the freed CPUs as the pipeline's run had them: the epochs each
    # trial ran, each on the threads it had (a race in the pipeline decides whether a
    # survivor gets a freed core one epoch sooner or later; replaying it keeps that out).
    jobs = [{"cfg": cfg, "index": int(row["trial"]), "arch": [int(a) for a in row["arch"]],
             "threads": [int(t) for t in history[history.trial == row["trial"]].sort_values("epoch")["threads"]]}
            for row in trials.to_dict("records")]
    with ctx.Pool(min(at_once, len(jobs))) as pool:
        states = pool.map(_trial, jobs, chunksize=1)
    # As stage 3 ends: the winner (the pipeline's, the same decision) tested and exported.
    win = int(np.flatnonzero(trials["winner"].to_numpy())[0])
    test = test_accuracy(cfg, space, jobs[win]["arch"], states[win])  # loads the data, as stage 3 does
    export_model(RunDir(out), space, jobs[win]["arch"], states[win], rel="model", info={"test_acc": test["test_acc"]})
    times["retrain"] = time.perf_counter() - t0
    return times


def _pipeline(cfg, stages: list[str]) -> tuple[dict[str, float], tuple[pd.DataFrame | None, pd.DataFrame | None], int]:
    """The pipeline's stages (and Ray's start) in seconds, its trials and history tables
    (None without stage 3), the CPUs."""
    import ray

    from pipeline.common import ensure_ray
    from pipeline.run import run_pipeline
    from pipeline.storage import RunDir

    t0 = time.perf_counter()
    ensure_ray(cfg)
    times = {"ray start": time.perf_counter() - t0}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    times.update(run_pipeline(cfg, RunDir(cfg.run_dir), stages))
    trials = history = None
    if "retrain" in stages:
        trials = pd.read_parquet(f"{cfg.run_dir}/retrain/trials.parquet")
        history = pd.read_parquet(f"{cfg.run_dir}/retrain/history.parquet")
    ray.shutdown()
    return times, (trials, history), cpus


def main(argv=None) -> int:
    from pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="a config override, for both sides")
    ap.add_argument("--out", default="overhead", help="the name of the tables in bench/results (.md, .csv)")
    ap.add_argument("--label", default="", help="a name for this measurement (before / after a change)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (pipeline, then plain), summed at the end")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="the first stages only, e.g. 'supernet' to measure stage 1 in a quarter of the time")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    if stages != list(STAGES[:len(stages)]):
        ap.error(f"--stages must be the first of {','.join(STAGES)} in order (each needs the one before), "
                 f"not {args.stages!r}")
    print(f"== overhead: {machine()}; overrides: {' '.join(args.set) or '(none)'}; stages {','.join(stages)}; "
          f"{args.repeat} pair(s)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            cfg = load_config(None, [*args.set, f"run_dir={tmp}/run{rep}"])
            print(f"== pair {rep + 1}: pipeline", flush=True)
            t0 = time.perf_counter()
            pipe, (trials, history), cpus = _pipeline(cfg, stages)
            pipe["total"] = time.perf_counter() - t0
            print(f"== pair {rep + 1}: plain (the same work without Ray)", flush=True)
            t0 = time.perf_counter()
            flat = plain(cfg, trials, history, cpus, f"{tmp}/plain{rep}", stages)
            flat["total"] = time.perf_counter() - t0
            for stage in ("ray start", *stages, "total"):
                rows.append({"pair": rep + 1, "stage": stage, "pipeline_s": pipe[stage], "plain_s": flat.get(stage, 0.0)})
            if history is not None:
                threads = {int(t): list(g.sort_values("epoch")["threads"]) for t, g in history.groupby("trial")}
                print(f"== pair {rep + 1}: epochs {trials['epochs_run'].tolist()}, threads per epoch {threads}",
                      flush=True)
    df = pd.DataFrame(rows)
    pooled = df.groupby("stage", sort=False)[["pipeline_s", "plain_s"]].sum().reset_index()
    pooled.insert(0, "pair", "all")
    df = pd.concat([df, pooled], ignore_index=True) if args.repeat > 1 else df
    df["ratio"] = [p / f if f > 0 else float("nan") for p, f in zip(df.pipeline_s, df.plain_s)]
    df.insert(0, "label", args.label or "-")
    trained = ("" if trials is None else
               f"trials retrained: {len(trials)}, epochs {trials['epochs_run'].tolist()} (last pair); ")
    write_table(args.out, df.round(3), f"stages {','.join(stages)}; {' '.join(args.set) or 'no overrides'}; {trained}"
                f"{cpus} CPUs; pair 'all' = the sums over pairs. Targets: total <= 1.10, every stage over 30 s <= 1.15.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
