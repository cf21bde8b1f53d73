"""GPU paths of the pipeline's trainer, checked on a GPU machine (no Ray needed).

bf16 autocast + channels_last on CUDA for each training mode, one epoch of the
single-rank ``SupernetTrainer``: frozen weights stay bit-identical, trainable BN
parameters move, the loss is finite, and the indicator table has the space's shape.
Also: a resumed trainer (state_dict round trip on the GPU) takes the same next step
as an uninterrupted one (bit-identical, or within 1e-3 where cuDNN sums in another
order). Exits non-zero on any failure.

    python bench/gpu_smoke.py          # cuda
    python bench/gpu_smoke.py cpu      # the same checks on the CPU (fp32): a dry run
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import Config, DataConfig, SupernetConfig  # noqa: E402
from pipeline.data import build_datasets  # noqa: E402
from pipeline.train_supernet import SupernetTrainer  # noqa: E402


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; nothing to check (python bench/gpu_smoke.py cpu for a dry run)")
        return 1
    data = DataConfig(name="fashion_mnist", fraction=0.05)
    splits = build_datasets(data, seed=0)
    failures = []
    for mode in ("bn_last", "bn_all", "all"):
        cfg = Config(seed=0, data=data, supernet=SupernetConfig(mode=mode, epochs=2, batch_size=128, num_workers=1, seeds=1))
        tr = SupernetTrainer(cfg, splits, device=device)
        assert tr.autocast == (device == "cuda") and tr.channels_last
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        row = tr.train_epoch(0)
        frozen_moved = [n for n, p in tr.model.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
        trained_moved = sum(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if p.requires_grad)
        table = tr.indicator_history[-1]
        ok = (math.isfinite(row["loss"]) and not frozen_moved and trained_moved > 0
              and table.shape == (tr.space.num_layers, tr.space.num_choices))
        # resume on the GPU: a copy restored from state_dict takes the identical next epoch
        state = tr.state_dict()
        twin = SupernetTrainer(cfg, splits, device=device, state=state)
        a, b = tr.train_epoch(1), twin.train_epoch(1)
        same = all(torch.equal(p, q) for p, q in zip(tr.model.parameters(), twin.model.parameters()))
        # cuDNN's backward kernels may sum in another order: near-identical is the GPU's bar
        diff = max((p - q).abs().max().item() for p, q in zip(tr.model.parameters(), twin.model.parameters()))
        print(f"gpu_smoke {mode:7s}: loss {row['loss']:.4f} acc {row['acc']:.3f} {row['images_per_sec']:.0f} img/s; "
              f"frozen moved {len(frozen_moved)}, trainable moved {trained_moved}; resumed epoch bit-identical: {same}, max diff {diff:.2e} "
              f"(loss {a['loss']:.6f} vs {b['loss']:.6f})")
        if not (ok and diff < 1e-3):
            failures.append(mode)
    print("gpu_smoke:", "FAILED " + ", ".join(failures) if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
