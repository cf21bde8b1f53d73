"""The run's report: plots and a Markdown summary under ``RUN/report/``.

``write_report(run)`` reads whatever the stages have written and produces

* ``rank_stability.png``   -- paper Fig. 5: ``pipeline.ranking.rank_distance`` (the number
  stage 1 prints per epoch) between every pair of supernet epochs (plus each epoch's
  distance to the previous and to the final epoch);
* ``indicator_heatmap.png`` -- the final epoch's [layers x choices] BN-indicator table;
* ``search_scatter.png``    -- every scored architecture's BN score against multiply-adds,
  coloured by where it came from, with the budget, the top-N and the winner marked;
* ``retrain_curves.png``    -- validation accuracy (and loss) per epoch of every retrained
  trial, early stops (ASHA or sync halving) marked, the winner highlighted;
* ``summary.md``            -- the chosen architecture, its cost, score and accuracy, time
  per stage, the top-N and trial tables, and links to the plots.

A part whose input is missing (the stage has not run) or unreadable is skipped and the
reason recorded; the report never fails a run that otherwise finished. Plots are drawn
on ``matplotlib.figure.Figure`` objects (rendered by Agg), never through pyplot, so no
GUI backend or global figure state is involved.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any, Callable

import numpy as np
import pandas as pd

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # leave an interactive session's backend alone
    matplotlib.use("Agg")  # Figure.savefig renders PNGs with Agg either way; pyplot is never used
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import ranking  # noqa: E402
from .storage import RunDir, StorageError  # noqa: E402

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FILES = {
    "rank_stability": "rank_stability.png",
    "indicator_heatmap": "indicator_heatmap.png",
    "search_scatter": "search_scatter.png",
    "retrain_curves": "retrain_curves.png",
    "summary": "summary.md",
}
STAGES = ("supernet", "search", "retrain")
SOURCE_STYLE = {  # colour, marker, z-order: rarer sources drawn on top
    "random": ("#9e9e9e", "o", 2),
    "mutation": ("#1f77b4", "o", 3),
    "crossover": ("#ff7f0e", "o", 3),
    "exact": ("#d62728", "D", 5),
}
DPI = 130


class _Skip(Exception):
    """A report part that cannot be made from what is in the run directory."""


# ============================================================================ small helpers

def _uri(run: RunDir, rel: str) -> str:
    return f"{run.uri.rstrip('/')}/{rel}"


def _read(run: RunDir, rel: str, kind: str = "parquet", what: str = "") -> Any:
    """Read ``rel`` or raise _Skip saying which stage has not produced it."""
    if not run.exists(rel):
        raise _Skip(f"{rel} not found ({what or 'its stage has not run'})")
    try:
        if kind == "parquet":
            return run.read_parquet(rel)
        if kind == "json":
            return run.read_json(rel)
        return run.read_text(rel)
    except StorageError as e:
        raise _Skip(str(e)) from None


def _maybe(run: RunDir, rel: str, kind: str = "parquet") -> Any:
    """Like _read, but None when missing or unreadable."""
    try:
        return _read(run, rel, kind)
    except _Skip:
        return None


def _arch_key(x: Any) -> tuple[int, ...] | None:
    """An architecture as a tuple of ints, from what the stages write: a list (JSON) or
    the array Parquet reads a list column back as; None for anything else."""
    if x is None or isinstance(x, (str, bytes, dict)):
        return None
    try:
        return tuple(int(v) for v in x)
    except (TypeError, ValueError):
        return None


def _arch_str(x: Any) -> str:
    k = _arch_key(x)
    if k is None:
        return "" if x is None else str(x)
    return "[" + ",".join(map(str, k)) + "]"


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _is_num(x: Any) -> bool:
    return not math.isnan(_num(x))


def _to_pct(values: Any) -> np.ndarray:
    """Accuracies as percent: a series whose finite values are all <= 1 is a fraction."""
    a = np.asarray(values, dtype=float)
    finite = a[np.isfinite(a)]
    if finite.size and finite.max() <= 1.0:
        a = a * 100.0
    return a


def _fmt_pct(x: Any) -> str:
    v = _num(x)
    if math.isnan(v):
        return "-"
    return f"{_to_pct([v])[0]:.2f}%"


def _fmt_m(x: Any, digits: int = 2) -> str:
    """A count in millions: 12345678 -> '12.35M'."""
    v = _num(x)
    if math.isnan(v):
        return "-"
    m = v / 1e6
    if abs(m) >= 100:
        return f"{m:.0f}M"
    if abs(m) >= 0.1 or m == 0:
        return f"{m:.{digits}f}M"
    return f"{m:.3g}M"


def _fmt_float(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "-" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def _fmt_time(x: Any) -> str:
    v = _num(x)
    if math.isnan(v):
        return "-"
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{int(v // 60)}m{int(round(v % 60)):02d}s"
    return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"


def _fmt_bool(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "yes" if bool(x) else "no"


def _md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (pandas.to_markdown needs tabulate, not a dependency)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = align or "l" * len(header)
    seps = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join(seps[a] for a in align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _save(run: RunDir, fig: Figure, name: str) -> str:
    rel = f"{REPORT_DIR}/{name}"
    fig.tight_layout()
    with run.local_file(rel) as local:
        fig.savefig(local, dpi=DPI, format="png")
    return _uri(run, rel)


def _lookup_ops(run: RunDir) -> Callable[[Any], str]:
    """arch -> op-name string, from the search tables (the only place ops are written)."""
    table: dict[tuple[int, ...], str] = {}
    for rel in ("search/topn.parquet", "search/scored.parquet"):
        df = _maybe(run, rel)
        if df is None or "arch" not in df or "ops" not in df:
            continue
        for a, o in zip(df["arch"], df["ops"]):
            k = _arch_key(a)
            if k is not None and isinstance(o, str):
                table.setdefault(k, o)

    def ops(arch: Any) -> str:
        return table.get(_arch_key(arch), "")

    return ops


def _ops_text(ops: Any) -> str:
    """Op names as one string, comma-separated like search/scored.parquet's ``ops``."""
    if ops is None or (isinstance(ops, float) and math.isnan(ops)):
        return ""
    if isinstance(ops, str):
        return ops
    try:
        return ",".join(map(str, ops))
    except TypeError:
        return str(ops)


def _search_result(run: RunDir) -> dict | None:
    """search/result.json with the fields the report uses lifted to the top: its
    ``best`` ({arch, ops, score, flops, params}) as best_*, flops and params,
    ``budgets.max_flops`` as max_flops, and the scores of exact_best / evolution_best."""
    raw = _maybe(run, "search/result.json", "json")
    if not isinstance(raw, dict):
        return None
    best = raw.get("best") or {}
    out = dict(raw)
    out.update({
        "best_arch": best.get("arch"),
        "best_ops": _ops_text(best.get("ops")),
        "best_score": _num(best.get("score")),
        "flops": _num(best.get("flops")),
        "params": _num(best.get("params")),
        "max_flops": _num((raw.get("budgets") or {}).get("max_flops")),
        "exact_best": _num((raw.get("exact_best") or {}).get("score")),
        "evolution_best": _num((raw.get("evolution_best") or {}).get("score")),
        "gap": _num(raw.get("gap")),
    })
    return out


def _retrain_result(run: RunDir) -> dict | None:
    raw = _maybe(run, "retrain/result.json", "json")
    if not isinstance(raw, dict):
        return None
    out = dict(raw)
    out["ops"] = _ops_text(raw.get("ops"))
    out["score"] = _num(raw.get("bn_score", raw.get("score")))
    return out


def _trials(run: RunDir) -> pd.DataFrame | None:
    """retrain/trials.parquet with a ``trial`` index, ``score`` and ``_key`` (arch tuple)."""
    t = _maybe(run, "retrain/trials.parquet")
    if t is None:
        return None
    t = t.reset_index(drop=True).copy()
    if "trial" not in t:
        t["trial"] = np.arange(len(t))
    if "score" not in t and "bn_score" in t:
        t["score"] = t["bn_score"]
    t["_key"] = [_arch_key(a) for a in t["arch"]] if "arch" in t else None
    return t


def _retrain_history(run: RunDir) -> pd.DataFrame:
    """Per-trial, per-epoch validation metrics: retrain/history.parquet, else the Tune
    experiment's own per-trial result logs (retrain_tune/<trial>/result.json, one JSON
    object per reported epoch, carrying arch_index)."""
    if run.exists("retrain/history.parquet"):
        return _read(run, "retrain/history.parquet")
    rows = []
    for d in run.listdir("retrain_tune"):
        rel = f"retrain_tune/{d}/result.json"
        if not run.exists(rel):
            continue
        try:
            lines = run.read_text(rel).splitlines()
        except (OSError, StorageError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                m = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            trial = m.get("arch_index", (m.get("config") or {}).get("arch_index"))
            if trial is None or "val_acc" not in m:
                continue
            rows.append({"trial": int(trial), "epoch": m.get("epoch", m.get("training_iteration")),
                         "val_acc": m.get("val_acc"), "val_loss": m.get("val_loss"),
                         "train_loss": m.get("train_loss")})
    if not rows:
        raise _Skip("retrain/history.parquet not found and no Tune results under retrain_tune/ "
                    "(retrain stage has not run)")
    # A resumed trial may report an epoch twice: keep the last report of each epoch.
    return pd.DataFrame(rows).drop_duplicates(["trial", "epoch"], keep="last").reset_index(drop=True)


# ============================================================================ rank stability

def _layer_tables(indicators: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, layers, choices, scores[epochs x layers x choices]) from the long table."""
    need = {"epoch", "layer", "choice", "score"}
    if not need <= set(indicators.columns):
        raise ValueError(f"indicator table lacks columns {sorted(need - set(indicators.columns))}")
    df = indicators.dropna(subset=["epoch", "layer", "choice"])
    epochs = np.sort(df["epoch"].unique())
    layers = np.sort(df["layer"].unique())
    choices = np.sort(df["choice"].unique())
    scores = np.full((len(epochs), len(layers), len(choices)), np.nan)
    e = np.searchsorted(epochs, df["epoch"].to_numpy())
    l_ = np.searchsorted(layers, df["layer"].to_numpy())
    c = np.searchsorted(choices, df["choice"].to_numpy())
    scores[e, l_, c] = df["score"].to_numpy(dtype=float)
    return epochs, layers, choices, scores


def rank_distance_matrix(indicators: pd.DataFrame) -> np.ndarray:
    """[epochs x epochs] ``pipeline.ranking.rank_distance`` between the epochs of the long
    indicator table (epoch, layer, choice, score), epochs in ascending order."""
    _, _, _, scores = _layer_tables(indicators)
    return ranking.rank_distance_matrix(list(scores))


def _plot_rank_stability(run: RunDir) -> str:
    ind = _read(run, "supernet/indicators.parquet", what="supernet stage has not run")
    if ind.empty:
        raise _Skip("supernet/indicators.parquet is empty")
    epochs = np.sort(ind["epoch"].unique())
    if len(epochs) < 2:
        raise _Skip(f"only {len(epochs)} supernet epoch recorded; rank stability needs two")
    m = rank_distance_matrix(ind)
    n = len(epochs)

    fig = Figure(figsize=(12.5, 5.4))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    vmax = max(float(m.max()), 1e-6)
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, origin="upper", interpolation="nearest")
    step = next(k * 10**p for p in range(6) for k in (1, 2, 5) if n / (k * 10**p) <= 10)
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks, [str(int(epochs[t])) for t in ticks])
    ax.set_yticks(ticks, [str(int(epochs[t])) for t in ticks])
    ax.set_xlabel("epoch j")
    ax.set_ylabel("epoch i")
    ax.set_title("Rank stability: distance between epochs' op rankings")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < 0.6 * vmax else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("normalised L1 rank distance\n(0 = same ranking, 1 = all reversed)")

    prev = np.r_[np.nan, np.diag(m, 1)]
    ax2.plot(epochs, prev, "o-", label="to previous epoch", color="#1f77b4")
    ax2.plot(epochs, m[:, -1], "s--", label=f"to final epoch ({int(epochs[-1])})", color="#ff7f0e")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("normalised L1 rank distance")
    ax2.set_title("When does the ranking settle?")
    ax2.set_ylim(bottom=0)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    ax2.legend()
    return _save(run, fig, FILES["rank_stability"])


# ============================================================================ indicator heatmap

def _plot_indicator_heatmap(run: RunDir) -> str:
    ind = _read(run, "supernet/indicators.parquet", what="supernet stage has not run")
    if ind.empty:
        raise _Skip("supernet/indicators.parquet is empty")
    last = ind["epoch"].max()
    df = ind[ind["epoch"] == last]
    table = df.pivot_table(index="layer", columns="choice", values="score", aggfunc="first", dropna=False)
    table = table.sort_index().sort_index(axis=1)
    vals = table.to_numpy(dtype=float)
    n_l, n_c = vals.shape

    # One op name per choice when every layer agrees; else "choice k" and names in cells.
    names_by_choice: dict[Any, list[str]] = {}
    if "op" in df:
        for c, g in df.groupby("choice"):
            names_by_choice[c] = sorted(set(g["op"].dropna().astype(str)))
    xlabels = []
    for c in table.columns:
        names = names_by_choice.get(c, [])
        xlabels.append(names[0] if len(names) == 1 else f"choice {c}")

    fig = Figure(figsize=(min(3.2 + 1.25 * n_c, 18), min(2.2 + 0.38 * n_l, 22)))
    ax = fig.subplots()
    # The colour scale spans the ops that compete: identity (no BN, 0 by definition) and
    # layers with a single choice would stretch it to 0..1 and hide a spread of 0.01.
    is_identity = np.zeros_like(vals, dtype=bool)
    if "op" in df:
        ident = df[df["op"] == "identity"]
        rows, cols = list(table.index), list(table.columns)
        for l, c in zip(ident["layer"], ident["choice"]):
            is_identity[rows.index(l), cols.index(c)] = True
    competing = np.isfinite(vals) & ~is_identity & (np.isfinite(vals).sum(1, keepdims=True) > 1)
    masked = np.ma.masked_where(~np.isfinite(vals) | is_identity, vals)
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="white")
    finite = vals[competing] if competing.any() else vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_c), xlabels, rotation=30 if max(map(len, xlabels)) > 6 else 0, ha="right"
                  if max(map(len, xlabels)) > 6 else "center")
    ytick = range(n_l) if n_l <= 40 else range(0, n_l, max(1, n_l // 20))
    ax.set_yticks(list(ytick), [str(table.index[i]) for i in ytick])
    ax.set_xlabel("candidate op" + ("   (blank = not allowed in that layer)" if np.isnan(vals).any() else ""))
    ax.set_ylabel("searchable layer")
    ax.set_title(f"BN indicator (mean |γ| of each op's last BN), epoch {int(last)}")
    # Thin grid between cells so blank (forbidden) cells read as blanks, not as gaps.
    ax.set_xticks(np.arange(-0.5, n_c, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_l, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if n_l * n_c <= 400:
        for i in range(n_l):
            for j in range(n_c):
                v = vals[i, j]
                if is_identity[i, j]:
                    ax.text(j, i, "identity", ha="center", va="center", fontsize=6.5, color="grey")
                elif np.isfinite(v):
                    frac = min(max((v - vmin) / (vmax - vmin), 0.0), 1.0)
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7.5,
                            color="white" if frac > 0.55 else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    cb.set_label("BN indicator score (ops that compete)")
    return _save(run, fig, FILES["indicator_heatmap"])


# ============================================================================ search scatter

def _winner_arch(run: RunDir) -> tuple[tuple[int, ...] | None, str]:
    """The final architecture: the retrained winner, else the search's best."""
    r = _retrain_result(run) or {}
    k = _arch_key(r.get("arch"))
    if k is not None:
        return k, "best retrained"
    s = _search_result(run) or {}
    k = _arch_key(s.get("best_arch"))
    return k, "search best"


def _plot_search_scatter(run: RunDir) -> str:
    scored = _read(run, "search/scored.parquet", what="search stage has not run")
    if scored.empty:
        raise _Skip("search/scored.parquet is empty")
    topn = _maybe(run, "search/topn.parquet")
    res = _search_result(run) or {}
    budget = _num(res.get("max_flops"))

    fig = Figure(figsize=(9.5, 6.2))
    ax = fig.subplots()
    x_all = scored["flops"].to_numpy(dtype=float) / 1e6
    y_all = scored["score"].to_numpy(dtype=float)
    sources = scored["source"].astype(str) if "source" in scored else pd.Series(["random"] * len(scored))
    order = [s for s in SOURCE_STYLE if s in set(sources)] + sorted(set(sources) - set(SOURCE_STYLE))
    for s in order:
        sel = (sources == s).to_numpy()
        color, marker, z = SOURCE_STYLE.get(s, ("#2ca02c", "o", 3))
        big = s == "exact"
        ax.scatter(x_all[sel], y_all[sel], s=60 if big else 16, c=color, marker=marker, alpha=0.9 if big else 0.55,
                   edgecolors="black" if big else "none", linewidths=0.6, zorder=z,
                   label=f"{s} ({int(sel.sum())})")

    if topn is not None and not topn.empty:
        ax.scatter(topn["flops"].to_numpy(dtype=float) / 1e6, topn["score"].to_numpy(dtype=float), s=110,
                   facecolors="none", edgecolors="black", linewidths=1.3, zorder=6,
                   label=f"top-{len(topn)} (retrained)")

    win, how = _winner_arch(run)
    if win is not None:
        match = scored[[(_arch_key(a) == win) for a in scored["arch"]]]
        if not match.empty:
            wx, wy = float(match["flops"].iloc[0]) / 1e6, float(match["score"].iloc[0])
        else:
            wx, wy = _num(res.get("flops")) / 1e6, _num(res.get("best_score"))
        if _is_num(wx) and _is_num(wy):
            ax.scatter([wx], [wy], s=380, marker="*", c="gold", edgecolors="black", linewidths=1.2,
                       zorder=8, label=f"winner ({how})")
            ax.annotate(f"{_fmt_m(wx * 1e6)}, score {wy:.3f}", (wx, wy), xytext=(14, 10), textcoords="offset points",
                        fontsize=9, zorder=9,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.margins(x=0.04, y=0.1)

    if _is_num(budget) and budget > 0:
        ax.axvline(budget / 1e6, color="#d62728", linestyle="--", linewidth=1.5, zorder=4,
                   label=f"budget {_fmt_m(budget)}")
        lo, hi = ax.get_xlim()
        if hi > budget / 1e6:
            ax.axvspan(budget / 1e6, hi, color="#d62728", alpha=0.05, zorder=0, label="over budget")
        ax.set_xlim(lo, hi)
    ax.set_xlabel("multiply-adds (M)")
    ax.set_ylabel("BN score (sum over layers of mean |γ|)")
    ind = res.get("indicator")
    title = f"Searched architectures: {len(scored)} scored"
    if ind:
        title += f" ({ind} indicator)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return _save(run, fig, FILES["search_scatter"])


# ============================================================================ retrain curves

def _winner_trial(run: RunDir, trials: pd.DataFrame) -> Any:
    """The winning trial's index: marked ``winner``, else the retrain result's arch, else
    the one with a test accuracy, else the best validation accuracy."""
    if "winner" in trials and trials["winner"].fillna(False).astype(bool).any():
        return trials.loc[trials["winner"].fillna(False).astype(bool), "trial"].iloc[0]
    r = _retrain_result(run) or {}
    k = _arch_key(r.get("arch"))
    if k is not None and "_key" in trials:
        hit = trials[[key == k for key in trials["_key"]]]
        if not hit.empty:
            return hit["trial"].iloc[0]
    if "test_acc" in trials and trials["test_acc"].notna().any():
        return trials.loc[trials["test_acc"].notna(), "trial"].iloc[0]
    if "best_val_acc" in trials and trials["best_val_acc"].notna().any():
        return trials.loc[trials["best_val_acc"].idxmax(), "trial"]
    return None


def _plot_retrain_curves(run: RunDir) -> str:
    hist = _retrain_history(run)
    if hist.empty:
        raise _Skip("retrain/history.parquet is empty")
    trials = _trials(run)
    if "trial" not in hist:  # match the history's arch to the trial table's, else number them
        by_arch = dict(zip(trials["_key"], trials["trial"])) if trials is not None else {}
        codes, _ = pd.factorize(hist["arch"].astype(str))
        hist = hist.assign(trial=[by_arch.get(_arch_key(a), f"#{c}") for a, c in zip(hist["arch"], codes)])

    winner = _winner_trial(run, trials) if trials is not None else None
    stopped: set = set()
    if trials is not None and "stopped_early" in trials:
        stopped = set(trials.loc[trials["stopped_early"].fillna(False).astype(bool), "trial"])

    has_loss = "val_loss" in hist and hist["val_loss"].notna().any()
    fig = Figure(figsize=(13 if has_loss else 8.5, 5.4))
    axes = fig.subplots(1, 2 if has_loss else 1)
    axes = np.atleast_1d(axes)
    acc_all = _to_pct(hist["val_acc"])
    hist = hist.assign(_acc=acc_all)
    ids = list(pd.unique(hist["trial"]))
    colors = matplotlib.colormaps["tab10" if len(ids) <= 10 else "tab20"]
    for n, t in enumerate(ids):
        h = hist[hist["trial"] == t].sort_values("epoch")
        is_win = winner is not None and t == winner
        color = colors(n % colors.N)
        kw = {"linewidth": 3.0 if is_win else 1.3, "alpha": 1.0 if is_win else 0.75, "zorder": 5 if is_win else 3,
              "color": color}
        best = h["_acc"].max()
        # 1-based, as the command line numbers trials
        label = f"trial {int(t) + 1}{' (winner)' if is_win else ''}: best {best:.2f}%"
        axes[0].plot(h["epoch"], h["_acc"], marker="o", markersize=3.5, label=label, **kw)
        if has_loss:
            axes[1].plot(h["epoch"], h["val_loss"], marker="o", markersize=3.5, **kw)
        if t in stopped:
            axes[0].plot(h["epoch"].iloc[-1], h["_acc"].iloc[-1], marker="x", markersize=11,
                         markeredgewidth=2.5, color="#d62728", zorder=7)
            if has_loss:
                axes[1].plot(h["epoch"].iloc[-1], h["val_loss"].iloc[-1], marker="x", markersize=11,
                             markeredgewidth=2.5, color="#d62728", zorder=7)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].set_title("Retraining the top-N: validation accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    if stopped:
        handles.append(Line2D([], [], marker="x", color="#d62728", linestyle="none", markersize=10,
                              markeredgewidth=2.5))
        labels.append(f"stopped by {_scheduler(_retrain_result(run))[0]} ({len(stopped)})")
    axes[0].legend(handles, labels, fontsize=8.5, loc="lower right", framealpha=0.9)
    if has_loss:
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("validation loss")
        axes[1].set_title("Validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(run, fig, FILES["retrain_curves"])


# ============================================================================ summary

def _stage_times(run: RunDir, timings: dict[str, float] | None) -> dict[str, dict[str, float]]:
    """{stage: {"elapsed": stage's own elapsed_s, "wall": this invocation's time}}."""
    out: dict[str, dict[str, float]] = {}
    for st in STAGES:
        r = _maybe(run, f"{st}/result.json", "json") or {}
        out[st] = {"elapsed": _num(r.get("elapsed_s")), "wall": _num((timings or {}).get(st))}
    for st, v in (timings or {}).items():
        out.setdefault(st, {"elapsed": math.nan, "wall": _num(v)})
    return out


def _stage_time(t: dict[str, float]) -> float:
    # The stage's own measurement survives reruns that skip it; this invocation's wall
    # time is the fallback.
    return t["elapsed"] if _is_num(t["elapsed"]) else t["wall"]


def _reproducibility(sup: dict | None) -> str:
    """Stage 1's verdict on its indicator: reproducible across seeds or not (one line)."""
    if not sup:
        return "-"
    return ranking.agreement_line(sup.get("seed_agreement") or {}, "BN indicator")


def _run_reproducibility(run: RunDir) -> str:
    """The verdict for the indicator the search used: acc's from stage 2, bn's from stage 1."""
    s = _search_result(run) or {}
    if s.get("seed_agreement"):
        return ranking.agreement_line(s["seed_agreement"], f"{s.get('indicator')} indicator")
    return _reproducibility(_maybe(run, "supernet/result.json", "json"))


def summary_table(run: RunDir, timings: dict[str, float] | None = None) -> pd.DataFrame:
    """One row: the final result (arch, arch_authors, ops, multiply_adds, params, bn_score, val_acc,
    test_acc, time_<stage>_s, time_total_s). Missing values are NaN / empty."""
    s = _search_result(run) or {}
    r = _retrain_result(run) or {}
    ops_of = _lookup_ops(run)
    from_retrain = _arch_key(r.get("arch")) is not None
    arch = r.get("arch") if from_retrain else s.get("best_arch")
    ops = (r.get("ops") if from_retrain else s.get("best_ops")) or (ops_of(arch) if arch is not None else "")
    score = r.get("score", math.nan) if from_retrain else math.nan
    if not _is_num(score) and _arch_key(arch) == _arch_key(s.get("best_arch")):
        score = s.get("best_score")
    if not _is_num(score):
        trials = _trials(run)
        if trials is not None and "score" in trials:
            hit = trials[[key == _arch_key(arch) for key in trials["_key"]]]
            if not hit.empty:
                score = hit["score"].iloc[0]
    row: dict[str, Any] = {
        "arch": _arch_str(arch) if arch is not None else "",
        # Written by the stage that chose it (the search, or retraining's winner); -1 = identity.
        "arch_authors": _arch_str((r if from_retrain else s.get("best") or {}).get("arch_authors")),
        "ops": ops or "",
        "multiply_adds": _num(r.get("flops")) if from_retrain else _num(s.get("flops")),
        "params": _num(r.get("params")) if from_retrain else _num(s.get("params")),
        "bn_score": _num(score),
        "val_acc": _num(r.get("val_acc")),
        "test_acc": _num(r.get("test_acc")),
        "retrain_epochs": _num(r.get("epochs")),
    }
    times = _stage_times(run, timings)
    total = 0.0
    for st, t in times.items():
        v = _stage_time(t)
        row[f"time_{st}_s"] = v
        total += v if _is_num(v) else 0.0
    row["time_total_s"] = total
    return pd.DataFrame([row])


def _scheduler(result: dict | None) -> tuple[str, str]:
    """(name, what it promises) of the scheduler stage 3 ran (``result``: retrain/result.json)."""
    kind = (result or {}).get("scheduler", "asha")  # runs before the setting were ASHA's
    if kind == "sync":
        return "sync halving", "(synchronous successive halving: the same trials stop for the same seed)"
    return "ASHA", "(asynchronous: which trials stop depends on the order of results; freed CPUs went to the survivors)"


def format_summary(run: RunDir, timings: dict[str, float] | None = None) -> str:
    """The final summary for the terminal: a small aligned key/value table."""
    row = summary_table(run, timings).iloc[0]
    s = _search_result(run) or {}
    retrain = _retrain_result(run)
    budget = _num(s.get("max_flops"))
    madds = _fmt_m(row["multiply_adds"])
    if _is_num(budget) and budget > 0:
        madds += f"  (budget {_fmt_m(budget)})"
    stage_times = "  ".join(f"{k[5:-2]} {_fmt_time(row[k])}" for k in row.index
                            if k.startswith("time_") and k != "time_total_s")
    lines = [
        ("architecture", row["ops"] or "-"),
        ("choices", row["arch"] or "-"),
        ("authors' form", row["arch_authors"] or "-"),  # -1 = identity, as in the BN-NAS code
        ("multiply-adds", madds),
        ("params", _fmt_m(row["params"])),
        ("BN score", _fmt_float(row["bn_score"])),
        ("ranking", _run_reproducibility(run)),
        ("val accuracy", _fmt_pct(row["val_acc"])),
        ("test accuracy", _fmt_pct(row["test_acc"])),
        ("retraining", f"{_fmt_float(row['retrain_epochs'], 0)} epochs, scheduler {_scheduler(retrain)[0]}"
         if retrain else "-"),
        ("time", f"{stage_times}  (total {_fmt_time(row['time_total_s'])})"),
        ("report", _uri(run, f"{REPORT_DIR}/{FILES['summary']}")),
    ]
    width = max(len(k) for k, _ in lines)
    bar = "=" * 60
    return "\n".join([bar, "BN-NAS result", bar] + [f"  {k:<{width}}  {v}" for k, v in lines] + [bar])


def _summary_md(run: RunDir, timings: dict[str, float] | None, written: dict[str, str],
                skipped: dict[str, str]) -> str:
    row = summary_table(run, timings).iloc[0]
    sup = _maybe(run, "supernet/result.json", "json")
    srch = _search_result(run)
    ret = _retrain_result(run)
    ops_of = _lookup_ops(run)
    out: list[str] = ["# BN-NAS run report", "", f"Run directory: `{run.uri}`", ""]

    out += ["## Result", ""]
    if not (srch or ret):
        out += ["_No architecture yet: the search stage has not run._", ""]
    else:
        budget = _num((srch or {}).get("max_flops"))
        madds = _fmt_m(row["multiply_adds"]) + (f" (budget {_fmt_m(budget)})" if _is_num(budget) and budget > 0
                                                else " (no budget)" if srch else "")
        out += [_md_table(["", ""], [
            ["Architecture (ops)", f"`{row['ops']}`" if row["ops"] else "-"],
            ["Choices", f"`{row['arch']}`" if row["arch"] else "-"],
            ["Multiply-adds", madds],
            ["Params", _fmt_m(row["params"])],
            ["BN score", _fmt_float(row["bn_score"])],
            ["Validation accuracy", _fmt_pct(row["val_acc"])],
            ["Test accuracy", _fmt_pct(row["test_acc"])],
        ]), ""]
        if not ret:
            out += ["_Retraining has not run: the architecture is the search's best, not yet trained._", ""]

    out += ["## Time per stage", ""]
    times = _stage_times(run, timings)
    trows = []
    for st, t in times.items():
        trows.append([st, _fmt_time(t["elapsed"]), _fmt_time(t["wall"])])
    trows.append(["**total**", _fmt_time(sum(v["elapsed"] for v in times.values() if _is_num(v["elapsed"]))),
                  _fmt_time(sum(v["wall"] for v in times.values() if _is_num(v["wall"])))])
    out += [_md_table(["stage", "stage time (its result.json)", "this invocation"], trows, "lrr"), ""]

    out += ["## Supernet", ""]
    if sup:
        fin = sup.get("final") or {}
        items = [f"epochs run: {sup.get('epochs_run', '-')}",
                 f"stopped early: {_fmt_bool(sup.get('stopped_early'))}"]
        for k, v in fin.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                items.append(f"final {k}: {_fmt_pct(v) if 'acc' in k else _fmt_float(v)}")
        items.append(f"seeds: {sup.get('seeds', 1)}; " + _reproducibility(sup))
        per_layer = (sup.get("seed_agreement") or {}).get("per_layer") or {}
        if per_layer:
            items.append("per-layer tau between seeds: " + ", ".join(
                f"layer {l} {_fmt_float(v, 2)}" for l, v in per_layer.items()))
        out += [f"- {i}" for i in items] + [""]
    else:
        out += ["_Not run yet._", ""]
    for key, caption in (("rank_stability", "Rank stability across epochs (paper Fig. 5)"),
                         ("indicator_heatmap", "Final BN-indicator table")):
        out += _img(key, caption, written, skipped)

    out += ["## Search", ""]
    if srch:
        items = [f"indicator: {srch.get('indicator', '-')}",
                 f"architectures scored: {srch.get('n_scored', '-')}"]
        if srch.get("seed_agreement"):
            items.append(ranking.agreement_line(srch["seed_agreement"], f"{srch.get('indicator')} indicator"))
        if _is_num(srch.get("exact_best")) or _is_num(srch.get("evolution_best")):
            items.append(f"exact (knapsack) best score: {_fmt_float(srch.get('exact_best'))}; "
                         f"evolution best: {_fmt_float(srch.get('evolution_best'))}; "
                         f"gap: {_fmt_float(srch.get('gap'))}")
        out += [f"- {i}" for i in items] + [""]
    else:
        out += ["_Not run yet._", ""]
    out += _img("search_scatter", "BN score vs multiply-adds", written, skipped)
    topn = _maybe(run, "search/topn.parquet")
    if topn is not None and not topn.empty:
        rows = []
        for i, t in topn.reset_index(drop=True).iterrows():
            ops = t.get("ops") if isinstance(t.get("ops"), str) else ops_of(t.get("arch"))
            rows.append([int(t["rank"]) if _is_num(t.get("rank")) else i + 1, f"`{ops or _arch_str(t.get('arch'))}`",
                         _fmt_float(t.get("score")), _fmt_m(t.get("flops")), _fmt_m(t.get("params")),
                         t.get("source", "-")])
        out += [f"### Top-{len(topn)}", "",
                _md_table(["rank", "architecture", "BN score", "multiply-adds", "params", "source"], rows, "rlrrrl"),
                ""]

    out += ["## Retraining", ""]
    if ret:
        out += [f"Scheduler: {' '.join(_scheduler(ret))} (`retrain.scheduler: {ret.get('scheduler', 'asha')}`, "
                "docs/reliability.md).", ""]
    t_idx = _trials(run)
    if t_idx is not None and not t_idx.empty:
        win = _winner_trial(run, t_idx)
        rows = []
        for _, t in t_idx.iterrows():
            ops = ops_of(t.get("arch")) or _arch_str(t.get("arch"))
            name = f"**{t['trial']} (winner)**" if win is not None and t["trial"] == win else str(t["trial"])
            rows.append([name, f"`{ops}`", t.get("epochs_run", "-"), _fmt_pct(t.get("best_val_acc")),
                         _fmt_pct(t.get("final_val_acc")),
                         f"{_scheduler(ret)[0]} stop" if bool(t.get("stopped_early")) else "completed",
                         _fmt_m(t.get("flops")), _fmt_float(t.get("score")), _fmt_pct(t.get("test_acc"))])
        out += [_md_table(["trial", "architecture", "epochs", "best val", "final val", "end", "multiply-adds",
                           "BN score", "test"], rows, "llrrrlrrr"), ""]
    elif not ret:
        out += ["_Not run yet._", ""]
    out += _img("retrain_curves", "Retraining curves", written, skipped)

    if skipped:
        out += ["## Skipped", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]

    cfg = _maybe(run, "config.yaml", "text")
    if cfg:
        out += ["## Configuration", "", "<details><summary>config.yaml</summary>", "", "```yaml",
                cfg.rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(out)


def _img(key: str, caption: str, written: dict[str, str], skipped: dict[str, str]) -> list[str]:
    if key in written:
        return [f"![{caption}]({FILES[key]})", ""]
    return [f"_{caption}: not drawn ({skipped.get(key, 'no data')})._", ""]


# ============================================================================ entry point

def write_report(run: RunDir, *, timings: dict[str, float] | None = None) -> dict:
    """Write the plots and summary.md under ``RUN/report/``.

    Returns ``{"written": {part: uri}, "skipped": {part: reason}}``; parts are
    rank_stability, indicator_heatmap, search_scatter, retrain_curves, summary.
    """
    if not isinstance(run, RunDir):
        run = RunDir(run)
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    parts = {
        "rank_stability": _plot_rank_stability,
        "indicator_heatmap": _plot_indicator_heatmap,
        "search_scatter": _plot_search_scatter,
        "retrain_curves": _plot_retrain_curves,
    }
    for key, fn in parts.items():
        try:
            written[key] = fn(run)
        except _Skip as e:
            skipped[key] = str(e)
        except Exception as e:  # noqa: BLE001 -- a plot must never fail a finished run
            log.warning("report: %s failed", key, exc_info=True)
            skipped[key] = f"failed: {type(e).__name__}: {e}"
    rel = f"{REPORT_DIR}/{FILES['summary']}"
    try:
        text = _summary_md(run, timings, written, skipped)
    except Exception as e:  # noqa: BLE001 -- still leave a summary that links the plots
        log.warning("report: summary failed", exc_info=True)
        text = "\n".join(["# BN-NAS run report", "", f"The summary could not be built ({type(e).__name__}: {e}).", ""]
                         + [f"![{k}]({FILES[k]})" for k in written] + [""])
    run.write_text(rel, text)
    written["summary"] = _uri(run, rel)
    return {"written": written, "skipped": skipped}
