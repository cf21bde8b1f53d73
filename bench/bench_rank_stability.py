"""Rank stability: epochs until the per-layer op ranking settles, BN-only against SPOS.

Three supernets of the same space, data, seed, batch and steps per epoch, trained in
this process one after the other with the pipeline's own single-rank trainer
(``pipeline.train_supernet.SupernetTrainer``, no Ray): ``bn_last`` (the authors' code),
``bn_all`` (the paper's text) and ``all`` (SPOS, every parameter). After every epoch the
trainer ranks the ops of every layer by the BN indicator (mean |gamma| of the op's last
BN) and this script records two normalised L1 rank distances (``rank_distance``: 0 = the
same ranking in every layer, 1 = every layer reversed):

- ``d_prev``: to the previous epoch (what the pipeline logs and early-stops on);
- ``d_final``: to the last epoch of the run.

The settle epoch of a mode is the first epoch from which the distance stays at or
below ``--tol`` to the end of the run, for at least ``--patience`` epochs (a run that
only gets there in its last epochs has not shown that it stays: reported as ">E").
The paper (Fig. 5, ImageNet): BN-only training settles by about epoch 10, all-parameter
training by about epoch 30.

The learning rate is constant by default (``--schedule constant``): the pipeline's linear
decay to zero would make every ranking "settle" at the end of any run, whatever it
learned. ``--schedule linear`` runs the pipeline's schedule as it is.

    .venv/bin/python bench/bench_rank_stability.py          # quick: a few min on 2 cores
    .venv/bin/python bench/bench_rank_stability.py --full   # full Fashion-MNIST, 40 epochs

Writes bench/results/rank_stability.{md,csv} (per epoch) and rank_stability_summary.csv.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, default_device, machine, write_table  # noqa: E402
from pipeline.config import Config, DataConfig, SupernetConfig  # noqa: E402
from pipeline.data import Splits, build_datasets  # noqa: E402
from pipeline.ranking import rank_distance  # noqa: E402
from pipeline.train_supernet import SupernetTrainer  # noqa: E402

MODES = ("bn_last", "bn_all", "all")


# ============================================================== shared with the other bench scripts

def supernet_config(mode: str, epochs: int, *, fraction: float, batch_size: int = 128, seed: int = 0,
                    lr: Optional[float] = None, schedule: str = "linear", data: str = "fashion_mnist") -> Config:
    """The pipeline's Config for one in-process supernet run (the default space and recipe elsewhere)."""
    # The pipeline's default recipe for the BN-only modes; SPOS (all) initialises every gamma at 1.
    sc = SupernetConfig(mode=mode, epochs=epochs, batch_size=batch_size, num_workers=1, seeds=1,
                        schedule="linear" if schedule == "constant" else schedule,
                        **({"gamma_init": 1.0} if mode == "all" else {}))
    if lr is not None:
        sc.lr = lr
    return Config(seed=seed, data=DataConfig(name=data, fraction=fraction), supernet=sc)


def train_supernet_inprocess(cfg: Config, splits: Splits, *, constant_lr: bool = False, device: str = "cpu",
                             progress: Callable[[str], None] = print) -> SupernetTrainer:
    """Train one supernet with the pipeline's single-rank trainer; returns the trainer
    (``.model``, ``.indicator_history`` one table per epoch, ``.history`` one row per epoch)."""
    trainer = SupernetTrainer(cfg, splits, rank=0, world_size=1, device=device)
    if constant_lr:  # replace the linear decay by a constant lr (the optimizer's base lr)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda t: 1.0)
    sc = cfg.supernet
    for epoch in range(sc.epochs):
        row = trainer.train_epoch(epoch)
        d = row["rank_distance"]
        progress(f"  {sc.mode:7s} epoch {epoch + 1:2d}/{sc.epochs}  loss {row['loss']:.4f}  acc {100 * row['acc']:5.1f}%  "
                 f"{row['images_per_sec']:6.0f} img/s  d_prev {'-' if math.isnan(d) else f'{d:.3f}'}  "
                 f"({row['time_s']:.1f} s)")
    return trainer


# ============================================================== this benchmark

def settle_epoch(distances: list[float], tol: float, patience: int) -> Optional[int]:
    """1-based epoch from which every distance is <= tol to the end, if that stretch is
    at least ``patience`` epochs long; None when the run never shows it."""
    n = len(distances)
    start = n
    while start > 0 and not math.isnan(distances[start - 1]) and distances[start - 1] <= tol:
        start -= 1
    if n - start < max(1, patience):
        return None
    return start + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="full Fashion-MNIST train split, 40 epochs")
    ap.add_argument("--epochs", type=int, help="epochs per mode (quick 8, full 40)")
    ap.add_argument("--fraction", type=float, help="data.fraction of Fashion-MNIST (quick 0.03, full 1.0)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="supernet.lr for a batch of 512 (full: the pipeline's 0.25; quick: 1.0)")
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    ap.add_argument("--tol", type=float, default=0.05, help="rank distance counted as settled (0.014 = one adjacent swap)")
    ap.add_argument("--patience", type=int, default=2, help="epochs the distance must stay <= tol")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device(), help="cuda when there is a GPU (bf16 autocast), else cpu")
    args = ap.parse_args(argv)
    epochs = args.epochs or (40 if args.full else 8)
    fraction = args.fraction or (1.0 if args.full else 0.03)
    if args.lr is None and not args.full:
        args.lr = 1.0  # quick: so few steps that the default lr barely moves gamma
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    print(f"== rank stability ({'full' if args.full else 'quick'}): {machine()}", flush=True)
    splits = build_datasets(DataConfig(name="fashion_mnist", fraction=fraction), seed=args.seed)
    rows, summary, tables = [], [], {}
    for mode in modes:
        cfg = supernet_config(mode, epochs, fraction=fraction, batch_size=args.batch_size, seed=args.seed,
                              lr=args.lr, schedule=args.schedule)
        t0 = time.perf_counter()
        tr = train_supernet_inprocess(cfg, splits, constant_lr=args.schedule == "constant", device=args.device)
        wall = time.perf_counter() - t0
        hist = tr.indicator_history
        tables[mode] = hist
        d_prev = [row["rank_distance"] for row in tr.history]
        d_final = [rank_distance(t, hist[-1]) for t in hist]
        for e, row in enumerate(tr.history):
            rows.append({"mode": mode, "epoch": e + 1, "step": (e + 1) * tr.steps_per_epoch,
                         "d_prev": d_prev[e], "d_final": d_final[e], "loss": row["loss"], "train_acc": row["acc"],
                         "gamma_spread": float(np.nanstd(hist[e][hist[e] > 0]))})
        s_prev = settle_epoch(d_prev, args.tol, args.patience)
        s_final = settle_epoch(d_final[:-1], args.tol, args.patience)  # the last epoch is 0 by definition
        summary.append({"mode": mode, "epochs": epochs, "lr": tr.base_lr, "steps_per_epoch": tr.steps_per_epoch,
                        "settle_epoch_prev": s_prev, "settle_epoch_final": s_final,
                        "d_prev_last": d_prev[-1], "d_first_to_final": d_final[0],
                        "train_s": sum(r["time_s"] for r in tr.history), "wall_s": wall,
                        "final_train_acc": tr.history[-1]["acc"]})

    per_epoch = pd.DataFrame(rows)
    wide = per_epoch.pivot(index="epoch", columns="mode", values=["d_prev", "d_final"])
    wide.columns = [f"{m}:{k}" for k, m in wide.columns]
    wide = wide[[f"{m}:{k}" for m in modes for k in ("d_prev", "d_final")]].reset_index()
    summ = pd.DataFrame(summary)

    def fmt_settle(v):
        return f">{epochs}" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))

    lines = []
    base = summ.set_index("mode")
    for mode in modes:
        r = base.loc[mode]
        lines.append(f"- `{mode}`: settles (to previous epoch, tol {args.tol}) at epoch "
                     f"{fmt_settle(r['settle_epoch_prev'])}, (to final) at {fmt_settle(r['settle_epoch_final'])}; "
                     f"{int(r['steps_per_epoch'])} steps/epoch; train time {r['train_s']:.0f} s; "
                     f"final train acc {100 * r['final_train_acc']:.1f}%")
    if "all" in base.index:
        for mode in modes:
            if mode == "all":
                continue
            a, b = base.loc[mode, "settle_epoch_prev"], base.loc["all", "settle_epoch_prev"]
            ok = all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in (a, b))
            ratio = f"{b / a:.2f}x" if ok else "n/a (one of them did not settle within the run)"
            lines.append(f"- settle ratio all / {mode}: {ratio}; train-time ratio {mode} / all: "
                         f"{base.loc[mode, 'train_s'] / base.loc['all', 'train_s']:.2f}")
    lines.append("- paper (Fig. 5, ImageNet, ~2500 steps of 512 per epoch): BN-only settles by ~10 epochs, "
                 "all-parameter by ~30 (ratio ~3x).")
    if not args.full:
        lines.append(f"- QUICK MODE: {fraction:g} of Fashion-MNIST, {int(base.iloc[0]['steps_per_epoch'])} steps of "
                     f"{args.batch_size} per epoch: a whole run is {epochs * int(base.iloc[0]['steps_per_epoch'])} steps per mode, a "
                     "fraction of one ImageNet epoch. Read the trend, not the epoch numbers.")
    notes = (f"Setup: mobilenet_small on Fashion-MNIST (fraction {fraction:g}), seed {args.seed}, batch "
             f"{args.batch_size}, supernet.lr {args.lr if args.lr is not None else 0.25} (per batch of 512, scaled linearly), lr schedule {args.schedule}, one rank in-process on {args.device}. d_prev / d_final: normalised L1 "
             f"distance of the per-layer op ranking (by BN indicator) to the previous / the final epoch.\n\n"
             + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    per_epoch.to_csv(RESULTS / "rank_stability_per_epoch.csv", index=False)
    summ_out = summ.copy()
    for c in ("settle_epoch_prev", "settle_epoch_final"):
        summ_out[c] = [fmt_settle(v) for v in summ_out[c]]
    summ_out.to_csv(RESULTS / "rank_stability_summary.csv", index=False)
    md = summ_out.round(3).to_markdown(index=False)
    write_table("rank_stability", wide.round(3), notes + "\n\nSummary:\n\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
