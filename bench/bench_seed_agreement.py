"""Is the BN indicator signal or noise? Seed agreement of the op ranking against supernet steps.

For each supernet recipe (``VARIANTS``), ``--seeds`` supernets that differ only in their
seed (init, paths, data order; ``train_supernet.seed_of``) are trained with the
pipeline's own single-rank trainer (``SupernetTrainer``, what each seed's worker runs in
the pipeline, no Ray), one process per seed, on the default task (Fashion-MNIST,
``mobilenet_small``, batch 128). At the listed steps every seed's BN-indicator table is
taken, and ``tau_seed`` is the mean over the searchable layers of Kendall's tau between
the seeds' op rankings (``ranking.seed_agreement``, with a bootstrap 95% interval over
the layers and the SD it would have by chance). An indicator that measures the ops
agrees with itself: the bar is tau_seed >= 0.5. Training accuracy says whether the
supernet learnt anything at all (10% = chance).

The lr is constant, so the table at step t is what a run of t steps would score (the
default's linear decay would freeze every ranking at its end, whatever it learnt).

    .venv/bin/python bench/bench_seed_agreement.py                      # every variant, 2 seeds
    .venv/bin/python bench/bench_seed_agreement.py --variants paper,res_g0_fc --seeds 3

Writes bench/results/seed_agreement.{md,csv} and seed_agreement.png (the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, write_table  # noqa: E402

# Every variant is the authors' recipe plus its changes (not the pipeline's defaults, which
# are this benchmark's pick: res_g0_fc_bnall).
PAPER = {"mode": "bn_last", "gamma_init": 1.0, "train_classifier": False, "lr": 0.25}

# name -> (space changes, supernet changes, what it tests)
VARIANTS: dict[str, tuple[dict, dict, str]] = {
    "paper": ({}, {}, "the authors' recipe: bn_last, gamma 1, frozen random head, lr 0.25"),
    "paper_lr4": ({}, {"lr": 4.0}, "the same at 16x the lr"),
    "fc": ({}, {"train_classifier": True}, "paper + the classifier trained"),
    "res": ({"shortcut": "pad"}, {}, "parameter-free shortcut in the shape-changing layers"),
    "res_g0": ({"shortcut": "pad"}, {"gamma_init": 0.0}, "res + scored gamma from 0"),
    "res_g0_fc": ({"shortcut": "pad"}, {"gamma_init": 0.0, "train_classifier": True}, "res_g0 + classifier"),
    "res_g0_fc_lr1": ({"shortcut": "pad"}, {"gamma_init": 0.0, "train_classifier": True, "lr": 1.0},
                      "res_g0_fc at 4x the lr"),
    "res_g0_fc_bnall": ({"shortcut": "pad"}, {"gamma_init": 0.0, "train_classifier": True, "mode": "bn_all"},
                        "res_g0_fc training every BN (the paper's text)"),
    "all": ({}, {"mode": "all"}, "SPOS: every parameter trained (its BN table, for reference)"),
    # Wider layers: each op's random features vary less from seed to seed.
    "wide_paper": ({"width": 2}, {}, "paper at twice the channels"),
    "wide_res_g0_fc_bnall": ({"width": 2, "shortcut": "pad"},
                             {"gamma_init": 0.0, "train_classifier": True, "mode": "bn_all"},
                             "res_g0_fc_bnall at twice the channels"),
}


def _space_file(changes: dict, folder: Path) -> str:
    """A YAML copy of mobilenet_small with ``changes``; the name itself when there are none."""
    if not changes:
        return "mobilenet_small"
    import yaml

    from search_spaces import get_space

    changes = dict(changes)
    width = changes.pop("width", 1)
    d = {**get_space("mobilenet_small").to_dict(), **changes}
    for part in (*d["stem"], *d["stages"]):
        for key in ("out", "channels"):
            if part.get(key):
                part[key] *= width
    d["head"]["channels"] *= width
    path = folder / f"mobilenet_small_w{width}_{'_'.join(f'{k}-{v}' for k, v in changes.items())}.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _train_one(job: dict) -> dict:
    """One seed of one variant, in its own process (1 torch thread): tables at the listed steps."""
    import torch

    from pipeline.config import Config, DataConfig, SpaceConfig, SupernetConfig, validate
    from pipeline.data import build_datasets
    from pipeline.train_supernet import SupernetTrainer, seed_of
    from search_spaces import bn_indicator

    torch.set_num_threads(1)
    steps, snaps = job["steps"], sorted(set(job["snapshots"]))
    sc = SupernetConfig(**{"num_workers": 1, "seeds": 1, "schedule": "constant", **PAPER, **job["supernet"]})
    cfg = Config(seed=job["seed"], data=DataConfig(name="fashion_mnist", fraction=job["fraction"]),
                 space=SpaceConfig(job["space"]), supernet=sc)
    validate(cfg)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    tables, accs = {}, []
    holder: dict = {}

    def on_step(epoch: int, step: int) -> None:  # before optimizer step `done`: the table after `done` steps
        done = epoch * holder["t"].steps_per_epoch + step
        if done in snaps:
            tables[done] = bn_indicator(holder["t"].model)

    trainer = SupernetTrainer(cfg, splits, seed=seed_of(cfg, job["index"]), on_step=on_step)
    holder["t"] = trainer
    sc.epochs = math.ceil(steps / trainer.steps_per_epoch)
    trainer._make_scheduler(sc.epochs)
    t0 = time.perf_counter()
    for epoch in range(sc.epochs):
        row = trainer.train_epoch(epoch)
        accs.append(row["acc"])
        if (epoch + 1) * trainer.steps_per_epoch in snaps:
            tables[(epoch + 1) * trainer.steps_per_epoch] = bn_indicator(trainer.model)
    return {"variant": job["variant"], "index": job["index"], "tables": {k: v.tolist() for k, v in tables.items()},
            "acc": accs, "seconds": time.perf_counter() - t0, "steps_per_epoch": trainer.steps_per_epoch}


def main(argv=None) -> int:
    from pipeline.ranking import seed_agreement

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=858, help="per seed (858 = 2 epochs of batch 128)")
    ap.add_argument("--snapshots", default="25,50,100,200,300,429,600,858")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (1 torch thread each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    snaps = [int(s) for s in args.snapshots.split(",") if int(s) <= args.steps]
    print(f"== seed agreement: {machine()}; {args.seeds} seeds x {args.steps} steps; variants {', '.join(names)}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            space_changes, supernet_changes, _ = VARIANTS[name]
            jobs = [{"variant": name, "index": i, "seed": args.seed, "steps": args.steps, "snapshots": snaps,
                     "fraction": args.fraction, "space": _space_file(space_changes, Path(tmp)),
                     "supernet": supernet_changes} for i in range(args.seeds)]
            t0 = time.perf_counter()
            with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
                outs = pool.map(_train_one, jobs)
            wall = time.perf_counter() - t0
            for step in snaps:
                tables = [np.array(o["tables"][step], dtype=float) for o in outs if step in o["tables"]]
                if len(tables) < 2:
                    continue
                agree = seed_agreement(tables)
                rows.append({"variant": name, "step": step, "tau_seed": agree["tau"], "ci_lo": agree["ci95"][0],
                             "ci_hi": agree["ci95"][1], "null_sd": agree["null_sd"],
                             # SD of the scores over the searchable layers' ops: how far gamma moved
                             "gamma_spread": float(np.std(np.concatenate(
                                 [t[l][np.isfinite(t[l])] for t in tables for l in range(len(t))
                                  if np.isfinite(t[l]).sum() > 1]))),
                             "train_acc_last_epoch": float(np.mean([o["acc"][-1] for o in outs])),
                             "seconds_per_seed": float(np.mean([o["seconds"] for o in outs])), "wall_s": wall})
            last = rows[-1]
            print(f"{name:>16}: tau_seed at {last['step']} steps {last['tau_seed']:+.2f} "
                  f"[{last['ci_lo']:+.2f}, {last['ci_hi']:+.2f}], acc {100 * last['train_acc_last_epoch']:.1f}%, "
                  f"{wall:.0f} s", flush=True)
            (RESULTS / "seed_agreement_raw").mkdir(parents=True, exist_ok=True)
            (RESULTS / "seed_agreement_raw" / f"{name}.json").write_text(json.dumps(outs))
    df = pd.DataFrame(rows)
    notes = "\n".join(f"- `{n}`: {VARIANTS[n][2]}" for n in names)
    write_table("seed_agreement", df.round(4), notes=f"{args.seeds} seeds, constant lr, batch 128.\n\n{notes}")
    _plot(df, RESULTS / "seed_agreement.png")
    return 0


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, g) in enumerate(df.groupby("variant", sort=False)):
        ax.plot(g["step"], g["tau_seed"], marker="o", ms=3, label=name, color=plt.cm.tab20(i % 20))
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="bar: 0.5")
    null = float(df["null_sd"].max())
    ax.axhspan(-2 * null, 2 * null, color="grey", alpha=0.15, lw=0, label="chance: +-2 SD")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("supernet steps (batch 128)")
    ax.set_ylabel("tau_seed (mean per-layer Kendall tau between seeds)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
