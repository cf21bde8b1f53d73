"""One supernet training step: bn_last and bn_all against all (SPOS), as ratios.

The same space, batch and architectures for every mode, interleaved round by round so
that machine noise hits all modes alike; the median step time per mode is divided by
the median of ``all``. Memory: bytes of tensors autograd saves for backward (exact and
deterministic) and, on GPU, peak allocated memory of a step. On GPU the steps run under
bf16 autocast as the pipeline's do (``--no-amp`` for fp32).

    python bench/bench_train_step.py            # quick: mobilenet_small at 28 px, CPU
    python bench/bench_train_step.py --full     # also the 224 px spaces (slow on CPU)

On a GPU machine it runs on the GPU (same command).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import default_device, write_table  # noqa: E402
from search_spaces import Supernet, freeze, get_space  # noqa: E402

MODES = ("all", "bn_all", "bn_last")


def saved_bytes(model, x, y, arch, amp=False) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x, arch), y)
    loss.backward()
    return total


def bench_space(name, size, in_ch, batch, rounds, steps, device, channels_last, amp=False):
    space = get_space(name).with_data(in_channels=in_ch, num_classes=10, input_size=size)
    rng = random.Random(0)
    archs = [tuple(rng.choice([k for k, ok in enumerate(l.allowed) if ok]) for l in space.layers) for _ in range(steps)]
    x = torch.randn(batch, in_ch, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        m = Supernet(space).to(device)
        params = freeze(m, mode)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        models[mode] = (m, torch.optim.SGD(params, lr=0.01, momentum=0.9))
    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def step(mode, arch):
        m, opt = models[mode]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(m(xx, arch), y)
        loss.backward()
        opt.step()

    for mode in MODES:  # warm-up
        step(mode, archs[0])
    times = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for arch in archs:
                step(mode, arch)
            if device == "cuda":
                torch.cuda.synchronize()
            times[mode].append((time.perf_counter() - t) / len(archs))
    rows = []
    base = statistics.median(times["all"])
    for mode in MODES:
        m, _ = models[mode]
        sb = saved_bytes(m, xx, y, archs[0], amp)
        peak = None
        if device == "cuda":  # what one step adds on top of the weights (activations, grads, workspace)
            models[mode][1].zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(mode, archs[0])
            torch.cuda.synchronize()
            peak = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        med = statistics.median(times[mode])
        rows.append({"space": f"{name}@{size}", "mode": mode, "batch": batch, "amp": amp,
                     "step_ms": round(med * 1e3, 2), "ratio_vs_all": round(med / base, 3),
                     "saved_for_backward_MB": round(sb / 2**20, 2), "step_peak_MB": peak,
                     "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on GPU (CPU steps are always fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    amp = device == "cuda" and not args.no_amp
    big = 32 if device == "cpu" else 128
    rows = bench_space("mobilenet_small", 28, 1, 128, args.rounds, 4, device, True, amp)
    rows += bench_space("shufflenet_small", 28, 1, 128, args.rounds, 4, device, True, amp)
    if args.full:
        rows += bench_space("bnnas_mobilenet", 224, 3, big, 3 if device == "cpu" else args.rounds, 2, device, True, amp)
        rows += bench_space("spos_shufflenet", 224, 3, big, 3 if device == "cpu" else args.rounds, 2, device, True, amp)
    write_table("train_step", pd.DataFrame(rows),
                "ratio_vs_all: median step time of the mode / that of `all` (SPOS), same run, interleaved.")


if __name__ == "__main__":
    main()
