"""Stage 2: indicators, Ray scorer actors, evolutionary and exact search (issue 4).

Everything runs on tiny supernets (mobilenet_small at 16 px, synthetic data) so that the
module finishes in about a minute on 2 contended cores; one Ray instance is shared.
"""

import os
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from torch import nn

from pipeline.common import PipelineError, resolve_space
from pipeline.config import Config, DataConfig, SearchConfig, SpaceConfig, SupernetConfig, validate
from pipeline.data import build_datasets, make_loader
from pipeline.budgets import allowed_mask, load_latency_table, make_budgets
from pipeline.search import (AccIndicator, BNIndicator, INDICATORS, ScorerPool, SearchHooks, evolve, exact_search,
                             register_indicator, run_search)
from pipeline.storage import RunDir
from search_spaces import space_from_dict as ss_space_from_dict
from search_spaces import (Supernet, arch_scores, bn_indicator, build_subnet, cost_tables, get_space,
                           subnet_state_from_supernet)

SMALL_EVOLUTION = dict(population=12, generations=4, parents=4, mutations=5, crossovers=5, batch_archs=3)


def make_cfg(tmp_path, space="mobilenet_small", seed=0, **search) -> Config:
    cfg = Config(
        seed=seed, run_dir=str(tmp_path / "run"),
        data=DataConfig(name="synthetic", synthetic_train=96, synthetic_test=16, synthetic_classes=4,
                        synthetic_size=16, val_size=32, augment=False),
        space=SpaceConfig(space),
        supernet=SupernetConfig(batch_size=16),
        search=SearchConfig(**search),
    )
    validate(cfg)
    return cfg


def data_space(cfg):
    return resolve_space(cfg, in_channels=3, num_classes=4, image_size=16)


def trained_like_supernet(space, seed=0) -> Supernet:
    """A supernet whose BN parameters and statistics look trained (random, seeded)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Supernet(space)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.9 + 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def write_supernet(run: RunDir, model: Supernet) -> dict:
    ckpt = {"space": model.space.to_dict(), "fingerprint": model.space.fingerprint, "mode": "bn_last",
            "epoch": 5, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "indicator": bn_indicator(model), "indicator_history": []}
    run.write_torch("supernet/final.pt", ckpt)
    return ckpt


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("x"))
    return trained_like_supernet(data_space(cfg))


def setup_run(tmp_path, model, **kw):
    cfg = make_cfg(tmp_path, **kw)
    run = RunDir(cfg.run_dir)
    write_supernet(run, model)
    return cfg, run


# ------------------------------------------------------------------ brute force

def brute_force(space, table, budgets, top_n):
    """Every architecture of the space, scored and costed by broadcasting: the reference."""
    allowed = allowed_mask(space)
    choices = [np.flatnonzero(row) for row in allowed]
    shape = tuple(len(c) for c in choices)

    def total(t, fixed=0.0):
        out = np.full(shape, fixed, dtype=np.float64)
        for l, ks in enumerate(choices):
            view = [1] * len(shape)
            view[l] = len(ks)
            out = out + t[l, ks].reshape(view)
        return out.ravel()

    score = total(table)
    ok = np.ones(score.shape, dtype=bool)
    for c in budgets.active:
        cost = total(c.table, c.fixed)
        ok &= (cost >= c.lo) & (cost <= c.hi)
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((idx, -score[idx]))][:top_n]  # score desc, then enumeration order
    archs = [tuple(int(choices[l][j]) for l, j in enumerate(np.unravel_index(i, shape))) for i in best]
    return [(float(score[i]), a) for i, a in zip(best, archs)], int(ok.sum())


def random_table(space, seed):
    rng = np.random.default_rng(seed)
    allowed = allowed_mask(space)
    table = np.where(allowed, rng.uniform(0.1, 2.0, allowed.shape), np.nan)
    for layer in space.layers:
        if "identity" in layer.ops and layer.allowed[layer.ops.index("identity")]:
            table[layer.index, layer.ops.index("identity")] = 0.0  # as the BN indicator does
    return table


# ================================================================== 1. exact == brute force

def test_exact_solver_matches_brute_force(tmp_path):
    space = get_space("mobilenet_small")  # 6 free layers x 6 ops (layer 1 fixed): 46,656 architectures
    ct = cost_tables(space)
    fmin, fmax = ct.fixed_flops + np.nanmin(ct.flops, 1).sum(), ct.fixed_flops + np.nanmax(ct.flops, 1).sum()
    pmin, pmax = ct.fixed_params + np.nanmin(ct.params, 1).sum(), ct.fixed_params + np.nanmax(ct.params, 1).sum()
    f = lambda x: fmin + x * (fmax - fmin)  # noqa: E731
    p = lambda x: pmin + x * (pmax - pmin)  # noqa: E731
    lat = np.where(allowed_mask(space), np.random.default_rng(9).uniform(0.5, 3.0, allowed_mask(space).shape), np.nan)
    lat_file = tmp_path / "lat.csv"
    np.savetxt(lat_file, np.vstack([lat, np.r_[1.5, np.zeros(lat.shape[1] - 1)]]), delimiter=",")
    lat_table, lat_fixed = load_latency_table(str(lat_file), space)
    assert lat_fixed == 1.5 and np.allclose(lat_table, lat, equal_nan=True)
    cases = [
        dict(),
        dict(max_flops=f(0.3)),
        dict(max_flops=f(0.05)),
        dict(max_params=p(0.25)),
        dict(min_flops=f(0.4), max_flops=f(0.45)),
        dict(max_flops=f(0.5), max_params=p(0.3), min_params=p(0.2)),
        dict(latency_table=str(lat_file), max_latency=1.5 + float(np.nanmean(lat)) * 8 * 0.8, max_flops=f(0.6)),
    ]
    for seed, case in enumerate(cases):
        table = random_table(space, seed)
        budgets = make_budgets(SearchConfig(**case), space)
        t0 = time.perf_counter()
        got = exact_search(table, budgets, 5)
        elapsed = time.perf_counter() - t0
        want, n_ok = brute_force(space, table, budgets, 5)
        assert n_ok > 5, case
        assert [a for _, a in got] == [a for _, a in want], case
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-12)
        assert budgets.within(np.array([a for _, a in got])).all()
        assert elapsed < 2.0, (case, elapsed)


def test_exact_solver_on_ties_and_224_spaces():
    # An untrained supernet: every op scores 1.0 (gamma init), the 4 fixed identities 0 -> massive ties.
    space = get_space("bnnas_mobilenet")
    allowed = allowed_mask(space)
    table = np.where(allowed, 1.0, np.nan)
    table[allowed[:, 6], 6] = 0.0
    budgets = make_budgets(SearchConfig(max_flops=475e6), space)
    t0 = time.perf_counter()
    got = exact_search(table, budgets, 3)
    assert time.perf_counter() - t0 < 1.0
    assert [s for s, _ in got] == [17.0, 17.0, 17.0] and len({a for _, a in got}) == 3
    for name, budget in [("spos_shufflenet", 330e6), ("bnnas_mobilenet", 475e6), ("fairnas_mobilenet", 330e6)]:
        space = get_space(name)
        budgets = make_budgets(SearchConfig(max_flops=budget, min_flops=0.9 * budget), space)
        t0 = time.perf_counter()
        got = exact_search(random_table(space, 1), budgets, 10)
        assert time.perf_counter() - t0 < 1.0, name
        assert len(got) == 10 and budgets.within(np.array([a for _, a in got])).all()
        assert [s for s, _ in got] == sorted((s for s, _ in got), reverse=True)


def test_evolution_reaches_exact_on_enumerable_space(ray_local, tmp_path):
    """A 6 x 3 space (324 architectures): evolution must find the exact optimum."""
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(
        "name: tiny\ninput_size: 16\nin_channels: 3\nnum_classes: 4\n"
        "stem: [{type: conv, out: 8, kernel: 3, stride: 1}]\n"
        "stages:\n"
        "  - {channels: 8, depth: 3, stride: 1, ops: [mbconv_k3_e3, mbconv_k5_e3, mbconv_k7_e3]}\n"
        "  - {channels: 16, depth: 3, stride: 2, ops: [mbconv_k3_e3, mbconv_k5_e3, mbconv_k7_e3]}\n"
        "identity_layers: [2]\n"
        "head: {channels: 32}\n")
    cfg = make_cfg(tmp_path, space=str(yaml_path), method="both", max_flops=0, top_n=3, num_actors=1)
    space = data_space(cfg)
    assert space.size == 243
    ct = cost_tables(space)
    cfg.search.max_flops = float(ct.fixed_flops + np.nanmean(ct.flops, 1).sum())
    run = RunDir(cfg.run_dir)
    model = trained_like_supernet(space, seed=3)
    write_supernet(run, model)
    lines = []
    result = run_search(cfg, run, progress=lines.append)
    budgets = make_budgets(cfg.search, space)
    want, _ = brute_force(space, bn_indicator(model), budgets, 3)
    assert result["exact_best"]["arch"] == list(want[0][1])
    assert result["topn"] == [list(a) for _, a in want]
    assert result["evolution_reached_exact"] is True and result["gap"] == pytest.approx(0.0, abs=1e-12)
    assert any("evolution reached the exact optimum" in line for line in lines)
    # The space runs out before 20 generations: the search stops early, having seen
    # every architecture within budget exactly once.
    scored = run.read_parquet("search/scored.parquet")
    evo = scored[scored.source != "exact"]
    assert len({tuple(a) for a in evo.arch}) == len(evo)
    assert len(evo) == budgets.within(_all_archs(space)).sum()


def _all_archs(space):
    allowed = allowed_mask(space)
    grids = np.meshgrid(*[np.flatnonzero(r) for r in allowed], indexing="ij")
    return np.stack([g.ravel() for g in grids], 1)


@pytest.fixture(scope="module")
def both_run(ray_local, tmp_path_factory, small_model):
    """One search with method=both under FLOPs, params and latency budgets (shared by
    the gap test and the outputs test: actor start-up costs seconds)."""
    tmp = tmp_path_factory.mktemp("both")
    space = small_model.space
    allowed = allowed_mask(space)
    lat = np.where(allowed, np.random.default_rng(0).uniform(0.1, 1.0, allowed.shape), np.nan)
    np.save(tmp / "lat.npy", lat)
    ct = cost_tables(space)
    budgets = dict(
        max_flops=float(ct.fixed_flops + np.nanmin(ct.flops, 1).sum() * 0.6 + np.nanmax(ct.flops, 1).sum() * 0.4),
        max_params=float(ct.fixed_params + np.nanmean(ct.params, 1).sum()),
        latency_table=str(tmp / "lat.npy"), max_latency=float(np.nanmean(lat) * 8))
    cfg, run = setup_run(tmp, small_model, method="both", top_n=4, num_actors=1, population=16, generations=5,
                         parents=5, mutations=6, crossovers=6, **budgets)
    lines = []
    result = run_search(cfg, run, progress=lines.append)
    return cfg, run, result, lines, budgets


def test_evolution_reaches_exact_or_reports_gap(both_run, small_model):
    cfg, run, result, lines, _ = both_run
    space = small_model.space
    want, _ = brute_force(space, bn_indicator(small_model), make_budgets(cfg.search, space), 4)
    assert result["exact_best"]["arch"] == list(want[0][1])
    assert result["topn"] == [list(a) for _, a in want]
    assert result["best"] == result["exact_best"]
    gap = result["exact_best"]["score"] - result["evolution_best"]["score"]
    assert result["gap"] == pytest.approx(gap) and gap >= 0
    if result["evolution_best"]["arch"] == result["exact_best"]["arch"]:
        assert result["evolution_reached_exact"]
        assert any("evolution reached the exact optimum" in line for line in lines)
    else:
        assert not result["evolution_reached_exact"] and gap > 0
        assert any("differs from the exact optimum" in line and f"gap {gap:.4g}" in line for line in lines)
    assert 80 <= result["n_scored"] <= 16 * 5 + 4


# ================================================================== 1b. fixed depth (issue 13)

def _small_evolution_config(**kw):
    return SearchConfig(population=30, generations=6, parents=8, mutations=12, crossovers=12, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bn_search_on_bnnas_space_keeps_the_authors_depth(seed):
    # Any indicator table: every top-N architecture, exact and evolution, has identity
    # exactly at layers 1, 5, 6, 9 (the authors' fixed depth), an MBConv op elsewhere.
    space = get_space("bnnas_mobilenet")
    table = random_table(space, seed)
    q = _small_evolution_config(max_flops=475e6, top_n=5)
    budgets = make_budgets(q, space)
    exact = [a for _, a in exact_search(table, budgets, q.top_n)]
    records = evolve(budgets, lambda archs: arch_scores(table, archs), q, seed, progress=lambda s: None)
    evolved = [r.arch for r in sorted(records, key=lambda r: -r.score)[:q.top_n]]
    assert len(exact) == len(evolved) == 5
    for arch in exact + evolved + [r.arch for r in records]:
        identity = [l for l, op in enumerate(space.op_names(arch)) if op == "identity"]
        assert identity == [1, 5, 6, 9]
        assert [a for a in space.authors_arch(arch) if a == -1] == [-1] * 4
    assert budgets.within(np.array(exact + evolved)).all()


def test_evolution_spends_no_draws_on_fixed_layers():
    # mobilenet_small fixes layer 1 to identity; the same space without that layer (stage 0
    # one layer deep) costs the same for every architecture. Evolution with the same seed
    # must make the same draws and so find the same architectures, layer 1 aside.
    full = get_space("mobilenet_small")
    d = full.to_dict()
    d.pop("identity_layers")
    d["stages"][0]["depth"] = 1
    reduced = ss_space_from_dict(d)
    t_full = random_table(full, 5)
    t_red = np.delete(t_full, 1, axis=0)[:, :6]
    ct = cost_tables(full)
    fmin, fmax = ct.fixed_flops + np.nanmin(ct.flops, 1).sum(), ct.fixed_flops + np.nanmax(ct.flops, 1).sum()
    for q in (_small_evolution_config(max_flops=fmin + 0.4 * (fmax - fmin), top_n=3),  # loose: uniform draws
              _small_evolution_config(max_flops=fmin + 0.03 * (fmax - fmin))):  # tight: budget-guided draws
        b_full, b_red = make_budgets(q, full), make_budgets(q, reduced)
        assert b_full.costs(np.array([[0, 6, 1, 2, 3, 4, 5]])) == b_red.costs(np.array([[0, 1, 2, 3, 4, 5]]))
        r_full = evolve(b_full, lambda a: arch_scores(t_full, a), q, 11, progress=lambda s: None)
        r_red = evolve(b_red, lambda a: arch_scores(t_red, a), q, 11, progress=lambda s: None)
        assert len(r_full) == len(r_red) > 20
        assert [r.arch[:1] + r.arch[2:] for r in r_full] == [r.arch for r in r_red]
        assert all(r.arch[1] == 6 for r in r_full)
        assert [r.source for r in r_full] == [r.source for r in r_red]
        np.testing.assert_allclose([r.score for r in r_full], [r.score + t_full[1, 6] for r in r_red])
        # The exact solver honours the fixed layer the same way.
        e_full, e_red = exact_search(t_full, b_full, 3), exact_search(t_red, b_red, 3)
        assert [a[:1] + a[2:] for _, a in e_full] == [a for _, a in e_red]


FREE_DEPTH_SPACE = ("name: free_depth\ninput_size: 16\nin_channels: 3\nnum_classes: 4\n"
                    "stem: [{type: conv, out: 8, kernel: 3, stride: 1}]\n"
                    "stages:\n  - {channels: 8, depth: 3, stride: 1, ops: [mbconv_k3_e3, identity]}\n"
                    "head: {channels: 16}\n")


def test_bn_indicator_refuses_a_free_depth_space(tmp_path, capsys):
    from pipeline.run import main

    space = tmp_path / "free.yaml"
    space.write_text(FREE_DEPTH_SPACE)
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--set", f"space.name={space}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bnnas: error: search.indicator=bn cannot score identity")
    assert "space 'free_depth' lets it compete with ops at layer(s) 1, 2" in err
    assert "fix the depth (identity_layers" in err and "search.indicator=acc" in err
    assert "search.identity_scores_zero=true" in err
    assert not run_dir.exists()  # nothing written
    # The same check guards stage 2 when it is called on its own.
    cfg = make_cfg(tmp_path, space=str(space))
    run = RunDir(cfg.run_dir)
    write_supernet(run, trained_like_supernet(data_space(cfg)))
    with pytest.raises(PipelineError, match="cannot score identity"):
        run_search(cfg, run, progress=lambda s: None)
    assert not run.exists("search/scored.parquet")


@pytest.mark.parametrize("override", ["search.indicator=acc", "search.identity_scores_zero=true"])
def test_free_depth_is_accepted_under_acc_or_the_explicit_opt_in(tmp_path, override):
    from pipeline.run import build_config, parse_args

    space = tmp_path / "free.yaml"
    space.write_text(FREE_DEPTH_SPACE)
    cfg = build_config(parse_args(["--run-dir", str(tmp_path / "run"), "--set", f"space.name={space}",
                                   "--set", override]))
    assert cfg.space.name == str(space)


# ================================================================== 2. actors in parallel

def test_actors_run_in_parallel_and_match_single_process(ray_local, tmp_path, small_model):
    cfg = make_cfg(tmp_path, indicator="acc", calib_batches=3, val_batches=2)
    space = small_model.space
    splits = build_datasets(cfg.data, seed=cfg.seed)
    ckpt = {"model": small_model.state_dict()}
    payload = AccIndicator.prepare(cfg=cfg, space=space, checkpoint=ckpt, splits=splits)
    rng = np.random.default_rng(0)
    archs = np.array([[rng.choice(np.flatnonzero(l.allowed)) for l in space.layers] for _ in range(12)])

    pool = ScorerPool(AccIndicator, payload, num_actors=2, num_cpus=1)
    try:
        got = pool.score(archs, batch_size=3)
    finally:
        pool.shutdown()
    pids = {e["pid"] for e in pool.log}
    assert len(pids) == 2 and os.getpid() not in pids
    assert sorted(e["batch"] for e in pool.log) == [0, 1, 2, 3]
    by_pid = {pid: [(e["start"], e["end"]) for e in pool.log if e["pid"] == pid] for pid in pids}
    a, b = by_pid.values()
    overlaps = [min(e1, e2) - max(s1, s2) for s1, e1 in a for s2, e2 in b]
    assert max(overlaps) > 0, f"the two actors never ran at the same time: {pool.log}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (1 CPU each)
    try:
        local = AccIndicator(payload)
        for e in pool.log:
            batch = archs[e["batch"] * 3:(e["batch"] + 1) * 3]
            np.testing.assert_array_equal(got[e["batch"] * 3:(e["batch"] + 1) * 3], local.score(batch))
    finally:
        torch.set_num_threads(threads)
    assert ((got > 0) & (got < 1)).any()


def test_acc_search_measures_seed_agreement_on_every_seed_supernet(ray_local, tmp_path, small_model):
    """supernet.seeds=2 and the acc indicator: 20 of the searched architectures are scored
    on the second seed's supernet too, and their Kendall tau is reported (issue 14)."""
    from pipeline.ranking import arch_agreement

    cfg, run = setup_run(tmp_path, small_model, indicator="acc", method="evolution", calib_batches=2,
                         val_batches=2, num_actors=1, population=12, generations=2, parents=4, mutations=4,
                         crossovers=4, batch_archs=6)
    other = trained_like_supernet(small_model.space, seed=11)
    ckpt = run.read_torch("supernet/final.pt")
    run.write_torch("supernet/final.pt", {**ckpt, "seed_models": [other.state_dict()]})
    lines = []
    result = run_search(cfg, run, progress=lines.append)
    agree = result["seed_agreement"]
    archs = np.array(agree["archs_scored"])
    assert agree["seeds"] == 2 and agree["archs"] == len(archs) == 20
    scored = run.read_parquet("search/scored.parquet")
    by_arch = {tuple(map(int, a)): s for a, s in zip(scored.arch, scored.score)}
    assert agree["scores"][0] == [by_arch[tuple(a)] for a in archs]  # seed 0: the search's own scores
    splits = build_datasets(cfg.data, seed=cfg.seed)
    payload = AccIndicator.prepare(cfg=cfg, space=small_model.space, checkpoint={"model": other.state_dict()},
                                   splits=splits)
    np.testing.assert_array_equal(agree["scores"][1], AccIndicator(payload).score(archs))
    assert agree["tau"] == pytest.approx(arch_agreement(agree["scores"])["tau"])
    assert any("acc indicator ranking" in ln and "seed agreement tau" in ln for ln in lines)


# ================================================================== 3. acc by hand

def test_acc_indicator_matches_hand_computed_accuracy(tmp_path, small_model):
    cfg = make_cfg(tmp_path, indicator="acc", calib_batches=3, val_batches=2)
    space = small_model.space
    splits = build_datasets(cfg.data, seed=cfg.seed)
    arch = space.validate([1, 6, 3, 5, 4, 0, 2])
    payload = AccIndicator.prepare(cfg=cfg, space=space, checkpoint={"model": small_model.state_dict()},
                                   splits=splits)

    # By hand: a standalone subnet with the supernet's weights, BN statistics reset and
    # re-estimated (cumulative average) on the first 3 shuffled training batches, then
    # accuracy on the first 2 validation batches.
    net = build_subnet(space, arch)
    net.load_state_dict(subnet_state_from_supernet(small_model.state_dict(), arch))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    calib = make_loader(splits.train, 16, shuffle=True, seed=cfg.seed, drop_last=True)
    val = make_loader(splits.val, 16, shuffle=False)
    net.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(calib):
            if i == 3:
                break
            net(x)
        net.eval()
        correct = total = 0
        for i, (x, y) in enumerate(val):
            if i == 2:
                break
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    expected = correct / total
    assert total == 32

    got = AccIndicator(payload).score(np.array([arch, arch]))
    assert got[0] == got[1] == expected
    assert 0 < expected < 1


# ================================================================== 4. errors

def test_infeasible_budget_names_cheapest_cost(tmp_path, small_model):
    space = small_model.space
    ct = cost_tables(space)
    cheapest = ct.fixed_flops + np.nanmin(ct.flops, 1).sum()
    dearest_params = ct.fixed_params + np.nanmax(ct.params, 1).sum()
    assert 1.0e6 < cheapest < 1.1e6  # 1.07M at 16 px (layer 1 fixed to identity, the rest an op)
    cfg, run = setup_run(tmp_path, small_model, max_flops=5e5)
    with pytest.raises(PipelineError) as e:
        run_search(cfg, run, progress=lambda s: None)
    assert str(e.value) == (f"search.max_flops=500K is below the cheapest architecture in mobilenet_small "
                            f"({cheapest / 1e6:.4g}M multiply-adds); raise it")

    cfg.search.max_flops, cfg.search.min_params = 0.0, dearest_params * 1.1
    with pytest.raises(PipelineError, match=r"search.min_params=.* is above the most expensive architecture "
                                            r"in mobilenet_small \(.*parameters\); lower it"):
        run_search(cfg, run, progress=lambda s: None)

    # Each budget reachable alone, not together: the exact solver says so.
    cfg.search.min_params = ct.fixed_params + np.nanmax(ct.params, 1).sum() * 0.9
    cfg.search.max_flops = float(cheapest * 1.05)
    with pytest.raises(PipelineError, match="meets all budgets together"):
        run_search(cfg, run, progress=lambda s: None)
    assert not run.exists("search/result.json")


def test_checkpoint_from_another_space_is_refused(tmp_path, small_model):
    cfg = make_cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    other = get_space("shufflenet_small").with_data(in_channels=3, num_classes=4, input_size=16)
    write_supernet(run, trained_like_supernet(other))
    with pytest.raises(PipelineError, match=r"trained on space 'shufflenet_small'.*not the configured "
                                            r"'mobilenet_small'.*another space is refused"):
        run_search(cfg, run, progress=lambda s: None)
    # Same space, other dataset shape (10 classes): refused too.
    write_supernet(run, trained_like_supernet(get_space("mobilenet_small").with_data(
        in_channels=3, num_classes=10, input_size=16)))
    with pytest.raises(PipelineError, match="10 classes.*4 classes"):
        run_search(cfg, run, progress=lambda s: None)


def test_acc_with_exact_method_is_refused(tmp_path, small_model):
    cfg, run = setup_run(tmp_path, small_model, indicator="acc", method="exact")
    with pytest.raises(PipelineError, match="method=exact needs an indicator that is a sum over layers"):
        run_search(cfg, run, progress=lambda s: None)


# ================================================================== 5. reproducibility, actor death, resume

@pytest.fixture(scope="module")
def slow_indicator():
    """A user-registered indicator: bn slowed down so that a kill lands mid-batch.

    Defined locally, so Ray's cloudpickle ships the class by value to the actors (a test
    module is not importable there)."""

    class SlowBN(BNIndicator):
        name = "slow_bn"

        def score(self, archs):
            time.sleep(0.2)
            return BNIndicator.score(self, archs)

    register_indicator(SlowBN)
    yield "slow_bn"
    INDICATORS.pop("slow_bn", None)


def _scored(run):
    return run.read_parquet("search/scored.parquet")


def in_process_evolution(model, seed):
    """The same evolution without Ray: the indicator table scored in this process."""
    q = SearchConfig(**SMALL_EVOLUTION)
    budgets = make_budgets(q, model.space)
    table = bn_indicator(model)
    records = evolve(budgets, lambda archs: arch_scores(table, archs), q, seed, progress=lambda s: None)
    return pd.DataFrame({"arch": [list(r.arch) for r in records], "score": [r.score for r in records],
                         "source": [r.source for r in records], "generation": [r.generation for r in records]})


def assert_same_search(scored, reference):
    assert [list(map(int, a)) for a in scored.arch] == list(reference.arch)
    assert list(scored.score) == list(reference.score)  # bit for bit
    assert list(scored.source) == list(reference.source)
    assert list(scored.generation) == list(reference.generation)


def test_same_seed_same_result_with_1_or_2_actors_and_a_killed_actor(ray_local, tmp_path, small_model,
                                                                       slow_indicator):
    reference = in_process_evolution(small_model, seed=0)
    assert len(reference) == 12 * 4 and len({tuple(a) for a in reference.arch}) == 48
    other_seed = in_process_evolution(small_model, seed=1)
    assert list(other_seed.arch) != list(reference.arch)  # the equalities below are not vacuous

    for n in (1, 2):
        cfg, run = setup_run(tmp_path / f"actors{n}", small_model, method="evolution", num_actors=n,
                             driver_max_archs=0, **SMALL_EVOLUTION)
        result = run_search(cfg, run, progress=lambda s: None)
        assert_same_search(_scored(run), reference)
        assert result["actor_replacements"] == 0
        assert result["scored_in"] == "actors" and result["n_scored_by_actors"] == 48

    killed = []

    def kill_one(pool, slot, n_submitted):
        if n_submitted == 3 and not killed:
            killed.append(pool.actors[slot])
            ray.kill(pool.actors[slot])  # mid-batch: slow_bn sleeps 0.2 s per batch

    cfg, run = setup_run(tmp_path / "kill", small_model, method="evolution", indicator=slow_indicator,
                         num_actors=2, driver_max_archs=0, **SMALL_EVOLUTION)
    result = run_search(cfg, run, progress=lambda s: None, hooks=SearchHooks(on_submit=kill_one))
    assert killed and result["actor_replacements"] >= 1
    assert_same_search(_scored(run), reference)


def test_small_bn_search_is_scored_in_the_driver_with_the_actors_result(tmp_path, small_model, monkeypatch):
    """No Ray at all: 48 architectures of an additive indicator are table lookups. The
    scored table is the actors' (the test above), and the threshold is inclusive."""
    import pipeline.search.stage as stage

    def no_ray(*a, **k):
        raise AssertionError("the search started Ray or its actors")

    monkeypatch.setattr(stage, "ensure_ray", no_ray)
    monkeypatch.setattr(stage, "ScorerPool", no_ray)
    reference = in_process_evolution(small_model, seed=0)
    cfg, run = setup_run(tmp_path, small_model, method="evolution", driver_max_archs=12 * 4, **SMALL_EVOLUTION)
    lines = []
    result = run_search(cfg, run, progress=lines.append)
    assert (result["scored_in"], result["n_scored_by_actors"], result["n_scored"]) == ("driver", 0, 48)
    assert any("scoring in the driver" in line for line in lines)
    assert_same_search(_scored(run), reference)


class Crash(Exception):
    pass


def test_interrupted_search_resumes_from_its_cache(ray_local, tmp_path, small_model):
    reference = in_process_evolution(small_model, seed=0)

    def crash(gen):
        if gen == 2:
            raise Crash()

    cfg, run = setup_run(tmp_path, small_model, method="evolution", num_actors=1, driver_max_archs=0,
                         **SMALL_EVOLUTION)
    with pytest.raises(Crash):
        run_search(cfg, run, progress=lambda s: None, hooks=SearchHooks(on_generation=crash))
    assert run.exists("search/cache.parquet") and not run.exists("search/result.json")
    lines = []
    result = run_search(cfg, run, progress=lines.append)
    assert any("resuming with 36 cached scores" in line for line in lines)
    assert result["n_scored_by_actors"] == 12  # only the last generation was left to score
    assert result["n_scored"] == 48
    assert_same_search(_scored(run), reference)


# ================================================================== 6. outputs and rerun

def test_outputs_and_rerun_returns_saved_result(both_run, small_model):
    cfg, run, result, _, budgets = both_run
    space = small_model.space
    max_params, max_latency = budgets["max_params"], budgets["max_latency"]
    scored = run.read_parquet("search/scored.parquet")
    assert list(scored.columns) == ["arch", "arch_authors", "ops", "score", "flops", "params", "latency", "source",
                                    "generation"]
    assert all(list(b) == space.authors_arch(a) for a, b in zip(scored.arch, scored.arch_authors))
    assert all(b[1] == -1 for b in scored.arch_authors)  # mobilenet_small's fixed identity, as -1
    assert set(scored.source) <= {"random", "mutation", "crossover", "exact"}
    assert (scored.generation[scored.source == "exact"] == -1).all()
    assert sorted(set(scored.generation[scored.source != "exact"])) == [0, 1, 2, 3, 4]
    assert len({tuple(a) for a in scored.arch}) == len(scored)
    arch0 = [int(v) for v in scored.arch[0]]
    assert scored.ops[0] == ",".join(space.op_names(arch0))
    assert scored.score[0] == pytest.approx(float(arch_scores(bn_indicator(small_model), np.array([arch0]))[0]))
    assert (scored.params <= max_params).all() and (scored.latency <= max_latency).all()
    assert (scored.flops <= budgets["max_flops"]).all()

    top = run.read_parquet("search/topn.parquet")
    assert list(top.columns) == ["rank", "arch", "arch_authors", "ops", "score", "flops", "params", "latency",
                                 "source"]
    assert list(top["rank"]) == [1, 2, 3, 4] and list(top.source) == ["exact"] * 4
    assert list(top.score) == sorted(top.score, reverse=True)
    assert [list(map(int, a)) for a in top.arch] == result["topn"]
    assert top.score[0] >= scored.score.max() - 1e-12

    for key in ("best", "exact_best", "evolution_best", "gap", "n_scored", "indicator", "elapsed_s",
                "archs_per_sec", "topn", "budgets"):
        assert key in result
    assert result["n_scored"] == len(scored) and result["indicator"] == "bn"
    assert result["archs_per_sec"] > 0
    assert result["budgets"] == {k: v for k, v in budgets.items() if k != "latency_table"}

    mtime = os.path.getmtime(run.path("search/scored.parquet"))
    lines, submitted = [], []
    again = run_search(cfg, run, progress=lines.append,
                       hooks=SearchHooks(on_submit=lambda *a: submitted.append(a)))
    assert again == result and not submitted
    assert any("finished already" in line for line in lines)
    assert os.path.getmtime(run.path("search/scored.parquet")) == mtime
