"""Shared bits of the benchmark scripts: machine description and result tables."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pandas as pd

# BNNAS_BENCH_RESULTS: write elsewhere (e.g. a GPU machine's output folder) without
# overwriting the tables measured here.
RESULTS = Path(os.environ.get("BNNAS_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def write_table(name: str, df: pd.DataFrame, notes: str = "") -> Path:
    """Markdown + CSV under bench/results/, named after the script."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS / f"{name}.csv", index=False)
    md = f"## {name}\n\n{machine()} — {time.strftime('%Y-%m-%d %H:%M')}\n\n{df.to_markdown(index=False)}\n"
    if notes:
        md += f"\n{notes}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(md)
    print(md)
    return path
