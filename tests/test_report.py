"""The report: plots and summary from a hand-made run directory."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from pipeline.report import FILES, format_summary, rank_distance_matrix, summary_table, write_report
from pipeline.storage import RunDir

OPS = ["mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6", "identity"]
N_LAYERS, N_EPOCHS = 6, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ops(arch) -> str:
    return ",".join(OPS[a] for a in arch)


def _indicators(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    base = rng.uniform(0.2, 1.0, size=(N_LAYERS, len(OPS)))
    for e in range(N_EPOCHS):
        noise = rng.normal(0, 0.3 / (1 + e), size=base.shape)  # rankings settle over epochs
        for layer in range(N_LAYERS):
            for c, op in enumerate(OPS):
                if op == "identity":
                    score = math.nan if layer % 3 == 0 else 0.0  # first layer of a stage: forbidden
                else:
                    score = float(base[layer, c] + noise[layer, c])
                rows.append({"epoch": e, "layer": layer, "choice": c, "op": op, "score": score})
    return pd.DataFrame(rows)


WINNER = [1, 3, 5, 0, 6, 2]
TOPN = [WINNER, [1, 3, 5, 0, 2, 2], [0, 3, 5, 1, 6, 2]]


def _build_run(root, stages=("supernet", "search", "retrain")) -> RunDir:
    rng = np.random.default_rng(0)
    run = RunDir(root)
    run.write_text("config.yaml", "seed: 0\nspace:\n  name: test_space\n")
    if "supernet" in stages:
        run.write_parquet("supernet/history.parquet", pd.DataFrame({
            "epoch": range(N_EPOCHS), "loss": np.linspace(2.3, 0.9, N_EPOCHS), "acc": np.linspace(0.1, 0.7, N_EPOCHS),
            "images_per_sec": 900.0, "rank_distance": np.linspace(0.5, 0.02, N_EPOCHS), "lr": 0.1, "time_s": 5.0}))
        run.write_parquet("supernet/indicators.parquet", _indicators(rng))
        run.write_json("supernet/result.json", {"epochs_run": N_EPOCHS, "stopped_early": True,
                                                "final": {"loss": 0.9, "acc": 0.7}, "fingerprint": "abc",
                                                "elapsed_s": 41.5})
    if "search" in stages:
        sources = ["random"] * 40 + ["mutation"] * 25 + ["crossover"] * 25
        archs = [list(rng.integers(0, 7, N_LAYERS)) for _ in sources] + TOPN
        sources += ["mutation", "crossover", "exact"]
        flops = rng.uniform(3e6, 9e6, len(archs))
        flops[-3:] = [6.8e6, 6.5e6, 6.9e6]
        scores = rng.uniform(2.0, 4.0, len(archs))
        scores[-3:] = [4.6, 4.4, 4.3]
        run.write_parquet("search/scored.parquet", pd.DataFrame({
            "arch": archs, "ops": [_ops(a) for a in archs], "score": scores, "flops": flops,
            "params": flops / 20, "source": sources, "generation": [i // 30 for i in range(len(archs))]}))
        run.write_parquet("search/topn.parquet", pd.DataFrame({
            "rank": [1, 2, 3], "arch": TOPN, "score": [4.6, 4.4, 4.3], "flops": [6.8e6, 6.5e6, 6.9e6],
            "params": [3.4e5, 3.25e5, 3.45e5], "source": ["mutation", "crossover", "exact"]}))
        best = {"arch": WINNER, "ops": [OPS[a] for a in WINNER], "score": 4.6, "flops": 6.8e6, "params": 3.4e5,
                "source": "mutation"}
        run.write_json("search/result.json", {
            "indicator": "bn", "budgets": {"max_flops": 7e6}, "best": best, "exact_best": best,
            "evolution_best": best, "gap": 0.0, "n_scored": len(archs), "elapsed_s": 1.25})
    if "retrain" in stages:
        hist = []
        lengths = [6, 2, 6]
        for t, (arch, n) in enumerate(zip(TOPN, lengths)):
            for e in range(n):
                acc = 0.80 + 0.02 * e - 0.01 * t
                hist.append({"trial": t, "arch": str(arch), "epoch": e + 1, "val_acc": acc,
                             "val_loss": 0.6 - 0.04 * e + 0.01 * t, "train_loss": 0.7 - 0.05 * e})
        run.write_parquet("retrain/history.parquet", pd.DataFrame(hist))
        run.write_parquet("retrain/trials.parquet", pd.DataFrame({
            "arch": TOPN, "epochs_run": lengths, "best_val_acc": [0.90, 0.81, 0.89],
            "final_val_acc": [0.90, 0.81, 0.89], "stopped_early": [False, True, False],
            "flops": [6.8e6, 6.5e6, 6.9e6], "params": [3.4e5, 3.25e5, 3.45e5], "score": [4.6, 4.4, 4.3],
            "test_acc": [0.9137, math.nan, math.nan]}))
        run.write_json("retrain/result.json", {"arch": WINNER, "val_acc": 0.90, "test_acc": 0.9137,
                                               "flops": 6.8e6, "params": 3.4e5, "epochs": 6, "elapsed_s": 120.0})
    return run


def _check_png(path, min_w=400, min_h=250):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    assert img.std() > 0.01  # not a blank canvas


# ---------------------------------------------------------------- rank_distance_matrix

def _long(tables: list[list[list[float]]]) -> pd.DataFrame:
    """[epoch][layer][choice] -> long indicator table."""
    return pd.DataFrame([{"epoch": e, "layer": l, "choice": c, "op": f"op{c}", "score": s}
                         for e, t in enumerate(tables) for l, row in enumerate(t) for c, s in enumerate(row)])


def test_rank_distance_reversed_is_one_identical_is_zero():
    e0 = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.1, math.nan, 0.3], [3.0, 1.0, 2.0, 0.0]]
    rev = [[4.0, 3.0, 2.0, 1.0], [0.1, 0.5, math.nan, 0.35], [0.0, 2.0, 1.0, 3.0]]
    m = rank_distance_matrix(_long([e0, rev, e0]))
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 0)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] == pytest.approx(1.0)
    assert m[0, 2] == pytest.approx(0.0)  # same ranking again


def test_rank_distance_partial_swap_hand_computed():
    # Layer 0 (4 ops): swap the top two -> L1 = 2, max floor(16/2) = 8 -> 0.25.
    # Layer 1 (3 allowed ops, one forbidden): unchanged -> 0.
    # Layer 2 (5 ops): swap ranks 0 and 4 -> L1 = 8, max floor(25/2) = 12 -> 2/3.
    e0 = [[4, 3, 2, 1, math.nan], [1, 2, 3, math.nan, math.nan], [5, 4, 3, 2, 1]]
    e1 = [[3, 4, 2, 1, math.nan], [1.1, 2.2, 3.3, math.nan, math.nan], [1, 4, 3, 2, 5]]
    m = rank_distance_matrix(_long([e0, e1]))
    expected = (0.25 + 0.0 + 8 / 12) / 3
    assert m[0, 1] == pytest.approx(expected)
    assert m[1, 0] == pytest.approx(expected)


def test_rank_distance_on_random_tables_is_a_bounded_symmetric_matrix():
    m = rank_distance_matrix(_indicators(np.random.default_rng(1)))
    assert m.shape == (N_EPOCHS, N_EPOCHS)
    np.testing.assert_allclose(np.diag(m), 0)
    np.testing.assert_allclose(m, m.T)
    assert (m >= 0).all() and (m <= 1).all()


# ---------------------------------------------------------------- write_report

def test_full_report(tmp_path):
    run = _build_run(tmp_path / "run")
    out = write_report(run, timings={"supernet": 50.0, "search": 2.0, "retrain": 130.0})
    assert out["skipped"] == {}
    assert set(out["written"]) == set(FILES)
    for key in ("rank_stability", "indicator_heatmap", "search_scatter", "retrain_curves"):
        p = tmp_path / "run" / "report" / FILES[key]
        assert out["written"][key] == str(p)
        _check_png(p)

    md = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert _ops(WINNER) in md
    assert "91.37%" in md  # test accuracy
    assert "90.00%" in md  # validation accuracy
    assert "6.80M" in md and "budget 7.00M" in md
    for arch in TOPN:  # the top-N table
        assert f"`{_ops(arch)}`" in md
    top = md.split("### Top-3")[1].split("##")[0]
    rows = [line for line in top.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "3"]
    assert all(f"`{_ops(a)}`" in r for a, r in zip(TOPN, rows))
    assert "ASHA stop" in md and "(winner)" in md
    for key in ("rank_stability", "indicator_heatmap", "search_scatter", "retrain_curves"):
        assert f"]({FILES[key]})" in md
    assert "seed: 0" in md  # config included


def test_summary_table_and_terminal_text(tmp_path):
    run = _build_run(tmp_path / "run")
    df = summary_table(run, {"supernet": 50.0, "search": 2.0, "retrain": 130.0})
    assert len(df) == 1
    r = df.iloc[0]
    assert r["ops"] == _ops(WINNER)
    assert r["arch"] == "[1,3,5,0,6,2]"
    assert r["multiply_adds"] == 6.8e6 and r["params"] == 3.4e5
    assert r["bn_score"] == pytest.approx(4.6)
    assert r["val_acc"] == pytest.approx(0.90) and r["test_acc"] == pytest.approx(0.9137)
    # The stage's own elapsed_s wins over this invocation's wall time.
    assert r["time_supernet_s"] == 41.5 and r["time_retrain_s"] == 120.0
    text = format_summary(run, {"supernet": 50.0})
    assert _ops(WINNER) in text and "91.37%" in text and "6.80M" in text and "params" in text
    assert "supernet 41.5s" in text


def test_missing_stages_are_skipped(tmp_path):
    run = _build_run(tmp_path / "run", stages=("supernet",))
    out = write_report(run)
    assert set(out["written"]) == {"rank_stability", "indicator_heatmap", "summary"}
    assert set(out["skipped"]) == {"search_scatter", "retrain_curves"}
    assert "search/scored.parquet not found" in out["skipped"]["search_scatter"]
    md = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "search stage has not run" in md
    assert "not drawn" in md
    assert "-" in format_summary(run)  # prints, with placeholders


def test_empty_run_dir(tmp_path):
    run = RunDir(tmp_path / "empty")
    out = write_report(run)
    assert set(out["written"]) == {"summary"}
    assert set(out["skipped"]) == {"rank_stability", "indicator_heatmap", "search_scatter", "retrain_curves"}
    assert (tmp_path / "empty" / "report" / "summary.md").exists()
    assert summary_table(run).iloc[0]["ops"] == ""


def test_single_epoch_and_no_budget(tmp_path):
    run = _build_run(tmp_path / "run", stages=("supernet", "search"))
    ind = run.read_parquet("supernet/indicators.parquet")
    run.write_parquet("supernet/indicators.parquet", ind[ind["epoch"] == 0])
    res = run.read_json("search/result.json")
    res["budgets"] = {}  # what the search writes without a budget
    run.write_json("search/result.json", res)
    out = write_report(run)
    assert "rank stability needs two" in out["skipped"]["rank_stability"]
    assert "indicator_heatmap" in out["written"] and "search_scatter" in out["written"]
    md = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert _ops(WINNER) in md  # the search's best stands in for the retrained winner
    assert "Retraining has not run" in md


def test_corrupt_file_is_skipped_not_fatal(tmp_path):
    run = _build_run(tmp_path / "run")
    (tmp_path / "run" / "retrain" / "history.parquet").write_bytes(b"PAR1 garbage")
    out = write_report(run)
    assert "retrain_curves" in out["skipped"]
    assert "corrupt" in out["skipped"]["retrain_curves"]
    assert "search_scatter" in out["written"]


def test_nested_result_layout_and_tune_logs(tmp_path):
    """The layout the stages actually write: search result with a nested ``best`` and
    ``budgets``, retrain result with ``bn_score`` and an ops list, trials with ``winner``,
    and per-epoch metrics only in Tune's own per-trial result.json logs."""
    import json

    run = _build_run(tmp_path / "run")
    s = run.read_json("search/result.json")
    best = {"arch": WINNER, "ops": [OPS[a] for a in WINNER], "score": 4.6, "flops": 6.8e6, "params": 3.4e5,
            "source": "mutation"}
    run.write_json("search/result.json", {
        "indicator": "bn", "budgets": {"max_flops": 7e6}, "best": best, "exact_best": best,
        "evolution_best": best, "gap": 0.0, "n_scored": s["n_scored"], "elapsed_s": 1.25})
    run.write_json("retrain/result.json", {"arch": WINNER, "ops": [OPS[a] for a in WINNER], "val_acc": 0.9,
                                           "test_acc": 0.9137, "flops": 6.8e6, "params": 3.4e5, "bn_score": 4.6,
                                           "epochs": 6, "elapsed_s": 120.0})
    trials = run.read_parquet("retrain/trials.parquet").rename(columns={"score": "bn_score"})
    trials["trial"] = [0, 1, 2]
    trials["winner"] = [True, False, False]
    run.write_parquet("retrain/trials.parquet", trials)
    hist = run.read_parquet("retrain/history.parquet")
    (tmp_path / "run" / "retrain" / "history.parquet").unlink()
    for t, h in hist.groupby("trial"):
        lines = [json.dumps({"epoch": int(r.epoch), "val_acc": r.val_acc, "val_loss": r.val_loss,
                             "train_loss": r.train_loss, "arch_index": int(t)}) for r in h.itertuples()]
        lines.insert(1, lines[0])  # a resumed trial reporting an epoch twice
        run.write_text(f"retrain_tune/trial_{t}/result.json", "\n".join(lines) + "\n")

    out = write_report(run)
    assert out["skipped"] == {}
    _check_png(tmp_path / "run" / "report" / FILES["retrain_curves"])
    r = summary_table(run).iloc[0]
    assert r["ops"] == _ops(WINNER) and r["bn_score"] == pytest.approx(4.6)
    md = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "budget 7.00M" in md and "91.37%" in md and "**0 (winner)**" in md
    assert "exact (knapsack) best score: 4.6000" in md
