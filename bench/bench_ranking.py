"""Ranking quality: Kendall's tau between supernet indicators and standalone accuracy.

M architectures of mobilenet_small are sampled across its FLOPs range (equal-width
FLOPs bins, one seeded random architecture per bin), each is trained standalone from
scratch with the pipeline's retraining recipe (``pipeline.retrain``: SGD + Nesterov,
cosine, label smoothing) for the same short budget, and its test accuracy is the
ground truth. Three supernets of the same data, seed and steps are trained in-process
with the pipeline's trainer (``bn_last``, ``bn_all``, ``all``); every supernet scores the
M architectures with both indicators of ``pipeline.search``:

- ``bn``: the sum over layers of the ops' mean |gamma| (BN-NAS; free);
- ``acc``: validation accuracy after BN recalibration (SPOS; costs forward passes).

Kendall's tau-b (numpy, no scipy) between each indicator and the standalone accuracy;
FLOPs and parameter count are listed as the trivial baselines: a sample stratified by
FLOPs rewards any indicator that merely tracks size. The paper (Fig. 9): the BN
indicator of a BN-only supernet ranks about as well as SPOS's accuracy indicator.

    .venv/bin/python bench/bench_ranking.py          # quick: M=6, a few min on 2 cores, taus are noisy
    .venv/bin/python bench/bench_ranking.py --full   # M=30, full data, longer training (~9 h on 2 cores, ~20 min on one H200)

Writes bench/results/ranking.{md,csv} (taus) and ranking_archs.csv (per architecture).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_rank_stability import supernet_config, train_supernet_inprocess  # noqa: E402
from bench.bench_search import random_archs  # noqa: E402
from bench.common import RESULTS, default_device, machine, write_table  # noqa: E402
from pipeline.common import resolve_space  # noqa: E402
from pipeline.config import Config, DataConfig, RetrainConfig, SearchConfig  # noqa: E402
from pipeline.data import build_datasets, make_loader  # noqa: E402
from pipeline.ranking import kendall_tau_b  # noqa: E402
from pipeline.retrain import _optimizer, _steps_per_epoch, _train_epoch, evaluate  # noqa: E402
from pipeline.schedules import cosine_schedule  # noqa: E402
from pipeline.search import AccIndicator  # noqa: E402
from pipeline.seeding import derive_seed  # noqa: E402
from search_spaces import arch_scores, build_subnet, cost_tables  # noqa: E402

MODES = ("bn_last", "bn_all", "all")


def tau_null_sd(n: int) -> float:
    """Standard deviation of tau between two independent rankings of n items (no ties)."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def stratified_by_flops(space, m: int, seed: int, pool: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """m distinct architectures, one per equal-width FLOPs bin of a random pool."""
    rng = np.random.default_rng(seed)
    cands = random_archs(space, pool, rng)
    flops, _ = cost_tables(space).costs(cands)
    edges = np.linspace(flops.min(), flops.max(), m + 1)
    picked, seen = [], set()
    for b in range(m):
        inside = np.flatnonzero((flops >= edges[b]) & (flops <= edges[b + 1]))
        if len(inside) == 0:  # an empty bin: the architecture nearest its centre
            inside = np.argsort(np.abs(flops - (edges[b] + edges[b + 1]) / 2))[:50]
        for idx in rng.permutation(inside):
            key = tuple(int(v) for v in cands[idx])
            if key not in seen:
                seen.add(key)
                picked.append(idx)
                break
    return cands[picked], flops[picked]


def train_standalone(space, arch, splits, cfg: Config, epochs: int, device: str = "cpu") -> dict:
    """One architecture from scratch with the pipeline's retraining recipe; test accuracy."""
    r = cfg.retrain
    device = torch.device(device)
    torch.manual_seed(derive_seed(cfg.seed, "init", 0))  # as retrain_trial seeds trial 0
    model = build_subnet(space, tuple(int(a) for a in arch)).to(device, memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg)
    drop_last = len(splits.train) > r.batch_size
    scheduler = cosine_schedule(optimizer, epochs * _steps_per_epoch(len(splits.train), r.batch_size, drop_last))
    criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        torch.manual_seed(derive_seed(cfg.seed, "augment", 0, epoch))
        loader = make_loader(splits.train, r.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, drop_last=drop_last)
        _train_epoch(model, loader, optimizer, criterion, device, scheduler)
    train_s = time.perf_counter() - t0
    test_acc, _ = evaluate(model, make_loader(splits.test, r.batch_size, shuffle=False), device)
    val_acc, _ = evaluate(model, make_loader(splits.val, r.batch_size, shuffle=False), device)
    return {"test_acc": test_acc, "val_acc": val_acc, "train_s": train_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--m", type=int, help="architectures (quick 6, full 30)")
    ap.add_argument("--fraction", type=float, help="data.fraction of Fashion-MNIST (quick 0.05, full 1.0)")
    ap.add_argument("--epochs", type=int, help="supernet epochs of the BN-only modes (quick 2, full 10)")
    ap.add_argument("--all-epochs", type=int, help="supernet epochs of mode all (quick = --epochs, full 30)")
    ap.add_argument("--train-epochs", type=int, help="standalone epochs per architecture (quick 3, full 5)")
    ap.add_argument("--calib-batches", type=int, help="acc indicator calibration batches (quick 5, full 20)")
    ap.add_argument("--val-batches", type=int, help="acc indicator validation batches (quick 2, full 10)")
    ap.add_argument("--lr", type=float, help="supernet.lr for a batch of 512 (full: the pipeline's 0.25; quick: 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device(), help="cuda when there is a GPU (bf16 autocast), else cpu")
    args = ap.parse_args(argv)
    full = args.full
    m = args.m or (30 if full else 6)
    fraction = args.fraction or (1.0 if full else 0.05)
    epochs = args.epochs or (10 if full else 2)
    lr = args.lr if args.lr is not None else (None if full else 1.0)
    all_epochs = args.all_epochs or (30 if full else epochs)
    train_epochs = args.train_epochs or (5 if full else 3)
    calib = args.calib_batches or (20 if full else 5)
    val_batches = args.val_batches or (10 if full else 2)

    print(f"== ranking quality ({'full' if full else 'quick'}): {machine()}", flush=True)
    t_start = time.perf_counter()
    data = DataConfig(name="fashion_mnist", fraction=fraction)
    splits = build_datasets(data, seed=args.seed)
    info = splits.info
    cfg = Config(seed=args.seed, data=data, retrain=RetrainConfig(),
                 search=SearchConfig(calib_batches=calib, val_batches=val_batches))
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    archs, flops = stratified_by_flops(space, m, args.seed)
    _, params = cost_tables(space).costs(archs)
    df = pd.DataFrame({"arch": [list(map(int, a)) for a in archs], "ops": [",".join(space.op_names(a)) for a in archs],
                       "flops_M": flops / 1e6, "params_K": params / 1e3})

    # ---- ground truth: standalone training, same budget for every architecture
    print(f"standalone: {len(archs)} architectures x {train_epochs} epochs on {len(splits.train)} images "
          f"(FLOPs {flops.min() / 1e6:.2f}M .. {flops.max() / 1e6:.2f}M)", flush=True)
    truth = []
    for i, a in enumerate(archs):
        res = train_standalone(space, a, splits, cfg, train_epochs, args.device)
        truth.append(res)
        print(f"  arch {i + 1}/{len(archs)} {flops[i] / 1e6:5.2f}M  test acc {100 * res['test_acc']:.2f}%  "
              f"({res['train_s']:.1f} s)", flush=True)
    df["test_acc"] = [t["test_acc"] for t in truth]
    df["val_acc"] = [t["val_acc"] for t in truth]
    standalone_s = sum(t["train_s"] for t in truth)

    # ---- the supernets and their indicators
    taus = [{"indicator": "FLOPs (baseline)", "supernet": "-", "supernet_epochs": 0,
             "tau_test": kendall_tau_b(df["flops_M"], df["test_acc"]),
             "tau_val": kendall_tau_b(df["flops_M"], df["val_acc"]), "score_s": 0.0, "supernet_s": 0.0},
            {"indicator": "params (baseline)", "supernet": "-", "supernet_epochs": 0,
             "tau_test": kendall_tau_b(df["params_K"], df["test_acc"]),
             "tau_val": kendall_tau_b(df["params_K"], df["val_acc"]), "score_s": 0.0, "supernet_s": 0.0}]
    for mode in MODES:
        e = all_epochs if mode == "all" else epochs
        scfg = supernet_config(mode, e, fraction=fraction, seed=args.seed, lr=lr)
        scfg.search = cfg.search
        t0 = time.perf_counter()
        tr = train_supernet_inprocess(scfg, splits, device=args.device)
        supernet_s = time.perf_counter() - t0
        table = tr.indicator_history[-1]
        t0 = time.perf_counter()
        bn = arch_scores(table, archs)
        bn_s = time.perf_counter() - t0
        ckpt = {"model": {k: v.detach().contiguous() for k, v in tr.model.state_dict().items()}}
        t0 = time.perf_counter()
        acc = AccIndicator(AccIndicator.prepare(cfg=scfg, space=space, checkpoint=ckpt, splits=splits),
                           args.device).score(archs)
        acc_s = time.perf_counter() - t0
        df[f"bn[{mode}]"], df[f"acc[{mode}]"] = bn, acc
        for name, s, secs in (("bn", bn, bn_s), ("acc", acc, acc_s)):
            taus.append({"indicator": name, "supernet": mode, "supernet_epochs": e,
                         "tau_test": kendall_tau_b(s, df["test_acc"]), "tau_val": kendall_tau_b(s, df["val_acc"]),
                         "score_s": secs, "supernet_s": supernet_s})
        print(f"  {mode}: tau(bn) {taus[-2]['tau_test']:+.3f}  tau(acc) {taus[-1]['tau_test']:+.3f}", flush=True)

    tau_df = pd.DataFrame(taus)
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS / "ranking_archs.csv", index=False)
    sd = tau_null_sd(len(archs))
    t = tau_df.set_index(["indicator", "supernet"])["tau_test"]
    lines = [
        f"M = {len(archs)} architectures of mobilenet_small (FLOPs {flops.min() / 1e6:.2f}M..{flops.max() / 1e6:.2f}M, "
        f"equal-width FLOPs bins), each trained standalone {train_epochs} epochs on {len(splits.train)} Fashion-MNIST "
        f"images (fraction {fraction:g}); ground truth = accuracy on {len(splits.test)} test images (tau_test) and "
        f"{len(splits.val)} validation images (tau_val). Supernets: {epochs} epochs (bn_last, bn_all), "
        f"{all_epochs} (all), supernet.lr {lr or 0.25} per batch of 512, one rank in-process on {args.device}. acc indicator: {calib} calibration + {val_batches} validation "
        f"batches of 128.",
        "",
        f"- BN-NAS (bn indicator, bn_last supernet): tau {t[('bn', 'bn_last')]:+.3f}; bn_all: "
        f"{t[('bn', 'bn_all')]:+.3f}; SPOS (acc indicator, all supernet): {t[('acc', 'all')]:+.3f}; "
        f"FLOPs alone: {t[('FLOPs (baseline)', '-')]:+.3f}.",
        f"- Two unrelated rankings of {len(archs)} items give tau with standard deviation {sd:.2f}: differences "
        f"between taus smaller than about {2 * sd:.2f} are noise.",
        f"- Time: standalone training {standalone_s:.0f} s in all; bn scoring of all M "
        f"{tau_df[tau_df.indicator == 'bn'].score_s.max() * 1e3:.2f} ms, acc scoring "
        f"{tau_df[tau_df.indicator == 'acc'].score_s.mean():.1f} s per supernet.",
        "- Paper (Fig. 9, ImageNet): BN-NAS's BN indicator ranks about as well as SPOS's accuracy indicator.",
    ]
    if not full:
        lines.append("- QUICK MODE: taus from so few architectures, supernet steps and standalone epochs are noisy; "
                     "they show the benchmark runs, not the answer. Use --full (or a larger --m) for a reading.")
    lines.append(f"- total wall time {time.perf_counter() - t_start:.0f} s.")
    write_table("ranking", tau_df.round(4), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
