"""Stage 1: BN-only supernet training on Ray Train.

Ray runs are expensive here (each worker group imports torch), so one uninterrupted
4-epoch run on 2 CPU workers is shared by the module (``reference``); the resume and
failure tests must end exactly where it ended. Everything else runs in-process through
``SupernetTrainer`` or on pure functions.
"""

import math

import numpy as np
import pytest
import torch

from pipeline.common import PipelineError
from pipeline.config import Config, DataConfig, SpaceConfig, SupernetConfig
from pipeline.data import build_datasets
from pipeline.storage import RunDir
from pipeline.faults import FAULT_ENV
from pipeline.ranking import rank_distance
from pipeline.schedules import lr_factor
from pipeline.ranking import seed_agreement
from pipeline.train_supernet import (HISTORY, INDICATORS, RESULT, SEED_INDICATORS, PathSampler, SupernetTrainer,
                                     init_supernet, load_supernet, paths_digest, seed_of, supernet_from_final,
                                     train_supernet)
from search_spaces import freeze, get_space, last_bn, space_from_dict

SEED = 7
EPOCHS = 4
STEPS = 4  # 320 synthetic images - 64 val = 256 train; / 2 workers / batch 32


@pytest.fixture(scope="module", autouse=True)
def fast_train_polling():
    # Train V2's controller takes one report per worker per poll, every 2 s by default:
    # with sub-second test epochs that poll, not training, sets the pace. Must be set
    # before ray_local starts Ray (the controller inherits the raylet's environment).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        yield


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Two intra-op threads on a busy 2-core machine run ~8x slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(run_dir, **supernet) -> Config:
    # One seed: these tests are about data parallelism and resume (two seeds: their own test).
    # The paper's recipe on the plain space (what these tests were written for).
    sn = dict(epochs=EPOCHS, batch_size=32, lr=2.0, num_workers=2, max_failures=0, checkpoints_to_keep=2, seeds=1,
              mode="bn_last", gamma_init=1.0, train_classifier=False)
    sn.update(supernet)
    return Config(
        seed=SEED, run_dir=str(run_dir), space=SpaceConfig("mobilenet_small"),
        data=DataConfig(name="synthetic", synthetic_train=320, synthetic_test=32, synthetic_size=16,
                        synthetic_classes=4, val_size=64),
        supernet=SupernetConfig(**sn),
    )


def fit(cfg: Config):
    lines = []
    result = train_supernet(cfg, RunDir(cfg.run_dir), progress=lines.append)
    return result, lines


def epoch_lines(lines):
    return [ln for ln in lines if ln.startswith("supernet epoch")]


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One uninterrupted 4-epoch run, 2 CPU workers, bn_last, uniform paths."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("reference"))
    result, lines = fit(cfg)
    return cfg, result, lines


def space_for(cfg: Config):
    return get_space(cfg.space.name).with_data(in_channels=3, num_classes=4, input_size=16)


# ----------------------------------------------------------------------------- Ray runs

def test_two_workers_bn_last(reference):
    cfg, result, lines = reference
    run = RunDir(cfg.run_dir)
    assert result["epochs_run"] == EPOCHS and result["start_epoch"] == 0 and not result["stopped_early"]
    assert len(epoch_lines(lines)) == EPOCHS and "epoch 4/4" in epoch_lines(lines)[-1]

    final = load_supernet(run)
    space = space_for(cfg)
    assert final["fingerprint"] == space.fingerprint == result["fingerprint"] and final["epoch"] == EPOCHS

    # Ranks walked the same paths, and those are the seed's paths.
    sampler = PathSampler(space, "uniform", SEED)
    history = run.read_parquet(HISTORY)
    assert history["epoch"].tolist() == list(range(EPOCHS))
    visited = set()
    for e, hashes in zip(history["epoch"], history["path_hashes"]):
        paths = sampler.epoch_paths(e, STEPS)
        assert list(hashes) == [paths_digest(paths)] * 2
        visited |= {(l, int(k)) for k_row in paths[:, 0] for l, k in enumerate(k_row)}
    assert (history["images_per_sec"] > 0).all() and history["steps"].tolist() == [STEPS] * EPOCHS

    # Frozen weights are bit-identical to the seed's init; BN params moved exactly where paths went.
    fresh = init_supernet(space, SEED)
    freeze(fresh, "bn_last")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    moved_ops = set()
    for name, p0 in fresh.named_parameters():
        p1 = final["model"][name]
        if name not in trainable:
            assert torch.equal(p0, p1), f"frozen {name} changed"
        elif not torch.equal(p0, p1):
            _, l, k, _ = name.split(".", 3)
            moved_ops.add((int(l), int(k)))
    with_params = {(int(n.split(".")[1]), int(n.split(".")[2])) for n in trainable}  # identity has none
    assert trainable and moved_ops == visited & with_params

    # One indicator table per epoch; the final one is the last; NaN exactly where forbidden.
    tables = final["indicator_history"]
    assert len(tables) == EPOCHS
    np.testing.assert_array_equal(final["indicator"], tables[-1])
    forbidden = np.array([[k >= len(l.ops) or not l.allowed[k] for k in range(space.num_choices)] for l in space.layers])
    assert (np.isnan(final["indicator"]) == forbidden).all()
    assert not np.array_equal(tables[0], tables[-1])
    long = run.read_parquet(INDICATORS)
    assert len(long) == EPOCHS * int((~forbidden).sum())
    assert math.isnan(history["rank_distance"][0]) and (history["rank_distance"][1:].between(0, 1)).all()

    # The trained supernet rebuilds for stage 2.
    model = supernet_from_final(final)
    assert model(torch.zeros(2, 3, 16, 16), [1, -1] + [1] * (space.num_layers - 2)).shape == (2, 4)

    # Finished: a rerun trains nothing and returns the same result.
    again, lines2 = fit(cfg)
    assert again == result and any("skipping" in ln for ln in lines2) and not epoch_lines(lines2)


def test_resume_after_crash_matches_uninterrupted(reference, tmp_path, monkeypatch):
    ref_cfg, ref_result, _ = reference
    cfg = tiny_cfg(tmp_path)
    # The run dies at the start of epoch 3 (index 2), after the checkpoint of epoch 2.
    monkeypatch.setenv(FAULT_ENV, "2:0:1")
    with pytest.raises(PipelineError, match="rerun the same command"):
        fit(cfg)
    run = RunDir(cfg.run_dir)
    assert not run.exists(RESULT) and run.exists("supernet/.fault_2_0_1")
    monkeypatch.delenv(FAULT_ENV)

    result, lines = fit(cfg)
    assert result["start_epoch"] == 2 and result["epochs_run"] == EPOCHS
    assert any("resuming at epoch 3/4" in ln for ln in lines)
    assert [ln.split()[2] for ln in epoch_lines(lines)] == ["3/4", "4/4"]
    history = run.read_parquet(HISTORY)
    assert history["epoch"].tolist() == [0, 1, 2, 3] and history["start_epoch"].tolist() == [0, 0, 2, 2]

    final, ref = load_supernet(run), load_supernet(RunDir(ref_cfg.run_dir))
    np.testing.assert_allclose(final["indicator"], ref["indicator"], atol=1e-5, equal_nan=True)
    for name, value in ref["model"].items():  # in fact bit-for-bit on CPU
        assert torch.equal(final["model"][name], value), name


def test_two_seeds_side_by_side_resume_and_agreement(ray_local, tmp_path, monkeypatch):
    """supernet.seeds=2 on 2 workers: one supernet per worker, each exactly what a lone
    worker with that seed trains; one merged Ray checkpoint resumes both after a crash."""
    cfg = tiny_cfg(tmp_path, seeds=2, num_workers=2, epochs=2)
    monkeypatch.setenv(FAULT_ENV, "1:0:1")  # seed 1's worker dies at the start of epoch 2
    with pytest.raises(PipelineError, match="rerun the same command"):
        fit(cfg)
    monkeypatch.delenv(FAULT_ENV)
    result, lines = fit(cfg)
    run = RunDir(cfg.run_dir)
    assert result["start_epoch"] == 1 and result["epochs_run"] == 2 and result["seeds"] == 2
    assert any("2 supernets (seeds) on 1 worker(s) each" in ln or "resuming at epoch 2/2" in ln for ln in lines)

    space, splits = space_for(cfg), build_datasets(cfg.data, seed=cfg.seed)
    alone = []
    for i in range(2):
        tr = SupernetTrainer(tiny_cfg("unused", seeds=1, num_workers=1, epochs=2), splits, seed=seed_of(cfg, i),
                             space=space)
        for e in range(2):
            tr.train_epoch(e)
        alone.append(tr)
    final = load_supernet(run)
    tables = [t.indicator_history[-1] for t in alone]
    assert not np.allclose(tables[0], tables[1], equal_nan=True)  # the seeds really differ
    for got, want in zip(final["indicator_seeds"], tables):
        np.testing.assert_array_equal(got, want)  # bit for bit on CPU
    np.testing.assert_array_equal(final["indicator"], (tables[0] + tables[1]) / 2)  # the search's table
    for name, value in alone[0].model.state_dict().items():
        assert torch.equal(final["model"][name], value), name
    for name, value in alone[1].model.state_dict().items():
        assert torch.equal(final["seed_models"][0][name], value), name

    agree = seed_agreement(tables)
    assert result["seed_agreement"]["tau"] == pytest.approx(agree["tau"])
    assert result["seed_agreement"]["ci95"] == pytest.approx(agree["ci95"])
    assert set(result["seed_agreement"]["per_layer"]) == {"0", "2", "3", "4", "5", "6"}  # layer 1 is fixed
    history = run.read_parquet(HISTORY)
    assert history["seed_tau"].iloc[-1] == pytest.approx(agree["tau"]) and np.isfinite(history["seed_tau"]).all()
    assert [list(a) for a in history["seed_acc"]] == [[t.history[e]["acc"] for t in alone] for e in range(2)]
    seeds = run.read_parquet(SEED_INDICATORS)
    assert sorted(set(zip(seeds["seed"], seeds["epoch"]))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "seed-tau" in epoch_lines(lines)[-1]
    verdict = [ln for ln in lines if "ranking" in ln and "seed agreement tau" in ln]
    assert len(verdict) == 1 and verdict[0].startswith(
        "supernet: BN indicator ranking is reproducible" if agree["tau"] >= 0.5 else "supernet: WARNING: the BN")


def test_finished_run_asked_for_more_epochs_continues_exactly(ray_local, tmp_path):
    """2 epochs, then the same run asked for 4: it starts at epoch 2 and ends where one
    uninterrupted 4-epoch run ends (constant LR: a decaying schedule depends on the total)."""
    ref_cfg = tiny_cfg(tmp_path / "ref", schedule="constant")
    fit(ref_cfg)
    cfg = tiny_cfg(tmp_path / "ext", schedule="constant", epochs=2)
    first, _ = fit(cfg)
    assert first["epochs_run"] == 2
    cfg.supernet.epochs = 4
    result, lines = fit(cfg)
    assert any("extending the finished 2-epoch run to 4 epochs" in ln for ln in lines)
    assert [ln.split()[2] for ln in epoch_lines(lines)] == ["3/4", "4/4"]
    assert result["start_epoch"] == 2 and result["epochs_run"] == 4
    run = RunDir(cfg.run_dir)
    assert run.read_parquet(HISTORY)["epoch"].tolist() == [0, 1, 2, 3]
    final, ref = load_supernet(run), load_supernet(RunDir(ref_cfg.run_dir))
    assert len(final["indicator_history"]) == 4
    np.testing.assert_allclose(final["indicator"], ref["indicator"], atol=1e-5, equal_nan=True)


@pytest.mark.slow
def test_worker_failure_is_restarted(reference, tmp_path, monkeypatch):
    ref_cfg, _, _ = reference
    cfg = tiny_cfg(tmp_path, max_failures=2)
    monkeypatch.setenv(FAULT_ENV, "1:2:1")  # rank 1 dies mid-epoch 2 (index 1), step 2 of 4
    result, lines = fit(cfg)
    run = RunDir(cfg.run_dir)
    assert run.exists("supernet/.fault_1_2_1")
    history = run.read_parquet(HISTORY)
    assert history["epoch"].tolist() == [0, 1, 2, 3]  # every epoch reported exactly once
    assert history["start_epoch"].tolist() == [0, 1, 1, 1]  # the restart began from epoch 1's checkpoint
    assert [ln.split()[2] for ln in epoch_lines(lines)] == ["1/4", "2/4", "3/4", "4/4"]
    assert any("resuming at epoch 2/4" in ln for ln in lines) and result["start_epoch"] == 0
    ref = load_supernet(RunDir(ref_cfg.run_dir))
    np.testing.assert_allclose(load_supernet(run)["indicator"], ref["indicator"], atol=1e-5, equal_nan=True)


class ScaledConvBN(torch.nn.Module):
    """A user's op: conv + affine BN, defined in this test module only."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                        torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def user_space():
    """An op and a space registered in the driver only, as a user's script does: the
    Ray Train workers cannot import this module, so it travels pickled by value."""
    import sys

    import ray.cloudpickle

    from search_spaces import OPS, Head, SearchSpace, Stage, StemLayer, register_op, register_space
    from search_spaces.space import _SPACES

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    register_op("test_user_conv", ScaledConvBN)

    def test_user_space() -> SearchSpace:
        return SearchSpace(name="test_user_space", input_size=16, stem=(StemLayer("conv", out=8),),
                           stages=(Stage(16, 2, 2, ("test_user_conv", "mbconv_k3_e3")),), head=Head(channels=32))

    register_space(test_user_space)
    yield "test_user_space"
    OPS.pop("test_user_conv", None)
    _SPACES.pop("test_user_space", None)
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_space_and_ops_registered_in_the_driver_reach_the_workers(ray_local, tmp_path, user_space):
    cfg = tiny_cfg(tmp_path, epochs=1, num_workers=1)
    cfg.space.name = user_space
    result, _ = fit(cfg)
    ckpt = load_supernet(RunDir(cfg.run_dir))
    assert result["epochs_run"] == 1 and ckpt["space"]["name"] == user_space
    assert ckpt["indicator"].shape == (2, 2) and np.isfinite(ckpt["indicator"]).all()


def test_impossible_resources_fail_fast(ray_local, tmp_path):
    with pytest.raises(PipelineError, match="GPU.*use_gpu=false"):
        fit(tiny_cfg(tmp_path / "gpu", use_gpu=True, num_workers=1))
    with pytest.raises(PipelineError, match="CPU"):
        fit(tiny_cfg(tmp_path / "cpu", cpus_per_worker=64.0))


def test_finished_run_with_other_mode_is_refused(reference):
    cfg, _, _ = reference
    with pytest.raises(PipelineError, match="mode"):
        fit(tiny_cfg(cfg.run_dir, mode="bn_all"))


def test_load_supernet_before_training(tmp_path):
    with pytest.raises(PipelineError, match="run stage 1"):
        load_supernet(RunDir(tmp_path))


# ----------------------------------------------------------------------------- in-process

def in_process(mode: str, sampler: str = "uniform", train_images: int = 128, **supernet):
    cfg = tiny_cfg("unused", mode=mode, sampler=sampler, num_workers=1, **supernet)
    cfg.data.synthetic_train = train_images + cfg.data.val_size
    splits = build_datasets(cfg.data, seed=SEED)
    return cfg, SupernetTrainer(cfg, splits)


@pytest.mark.parametrize("mode", ["bn_all", "all"])
def test_modes_train_what_they_say(mode):
    cfg, trainer = in_process(mode)
    trainer.train_epoch(0)
    fresh = init_supernet(trainer.space, SEED)
    freeze(fresh, mode)
    after = trainer.model.state_dict()
    for name, p in fresh.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, after[name]), f"frozen {name} changed"
    arch = [int(a) for a in trainer.sampler.epoch_paths(0, trainer.steps_per_epoch)[0, 0]]
    conv = f"layers.0.{arch[0]}.body.0.weight"  # first conv of an op on the path
    bn = f"layers.0.{arch[0]}.body.1.weight"  # its first BN: frozen in bn_last, trained in bn_all
    assert not torch.equal(fresh.state_dict()[bn], after[bn])
    assert torch.equal(fresh.state_dict()[conv], after[conv]) == (mode == "bn_all")
    assert not torch.equal(fresh.state_dict()["head.conv.1.weight"], after["head.conv.1.weight"])


def test_gamma_init_and_train_classifier():
    cfg, _ = in_process("bn_last", gamma_init=0.0, train_classifier=True)
    d = get_space("mobilenet_small").to_dict()
    d["shortcut"] = "pad"  # gamma 0 needs a residual in every layer, or no gradient reaches any gamma
    space = space_from_dict(d).with_data(in_channels=3, num_classes=4, input_size=16)
    trainer = SupernetTrainer(cfg, build_datasets(cfg.data, seed=SEED), space=space)
    scored = {id(last_bn(op).weight) for _, _, op in trainer.model.candidate_ops() if last_bn(op) is not None}
    assert all(float(last_bn(op).weight.abs().max()) == 0.0
               for _, _, op in trainer.model.candidate_ops() if last_bn(op) is not None)
    fc = {id(p) for p in trainer.model.head.fc.parameters()}
    assert {id(p) for p in trainer.trainable} == scored | {id(b.bias) for _, _, op in trainer.model.candidate_ops()
                                                            if (b := last_bn(op)) is not None} | fc
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_epoch(0)
    after = trainer.model.state_dict()
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])  # the classifier trained
    assert torch.equal(before["head.conv.0.weight"], after["head.conv.0.weight"])  # convolutions did not
    moved = [l for l, k, op in trainer.model.candidate_ops() if last_bn(op) is not None
             and float(last_bn(op).weight.abs().max()) > 0]
    assert moved  # gamma grows from 0 where the paths went
    # Without train_classifier the FC stays frozen, as in the authors' code.
    _, plain = in_process("bn_last")
    assert not any(p.requires_grad for p in plain.model.head.fc.parameters())


def test_early_stop_when_ranking_is_stable():
    cfg, trainer = in_process("bn_last", train_images=32)
    cfg.supernet.stable_patience, cfg.supernet.stable_tol = 2, 1.0  # any distance counts as stable
    for epoch in range(3):
        trainer.train_epoch(epoch)
        # epoch 0 has no previous ranking (NaN) and never counts
        assert trainer.stopped_early == (epoch == 2)
    assert trainer.state_dict()["stopped_early"]


def test_fair_sampler_takes_every_op_once_per_group():
    space = get_space("mobilenet_small")  # 6 ops per layer; layer 1 fixed to identity (choice 6)
    sampler = PathSampler(space, "fair", seed=1)
    paths = sampler.epoch_paths(0, steps=5)
    K = 6  # the most ops any layer allows, not the 7 columns of the tables
    assert sampler.group_size == K and space.num_choices == 7
    assert paths.shape == (5, K, space.num_layers)
    assert (paths[:, :, 1] == 6).all()
    for group in paths:
        for l, layer in enumerate(space.layers):
            allowed = [k for k, a in enumerate(layer.allowed) if a]
            taken = sorted(group[:, l].tolist())
            if len(allowed) == K:
                assert taken == allowed  # exactly once each
            else:  # padded by re-drawing from the allowed ops
                assert set(taken) == set(allowed) and len(taken) == K
        for arch in group:
            space.validate(arch.tolist())
    np.testing.assert_array_equal(paths, PathSampler(space, "fair", seed=1).epoch_paths(0, 5))  # reproducible
    assert not np.array_equal(paths, sampler.epoch_paths(1, 5))  # a new draw per epoch


def test_uniform_sampler_is_seeded_per_epoch():
    space = get_space("mobilenet_small")
    a, b = PathSampler(space, "uniform", 3), PathSampler(space, "uniform", 3)
    np.testing.assert_array_equal(a.epoch_paths(2, 50), b.epoch_paths(2, 50))
    assert not np.array_equal(a.epoch_paths(2, 50), a.epoch_paths(3, 50))
    paths = a.epoch_paths(0, 400)[:, 0]
    assert paths[:, 0].max() == 5 and (paths[:, 1] == 6).all()  # identity only, and always, where fixed


@pytest.mark.parametrize("kind", ["uniform", "fair"])
def test_bnnas_paths_never_run_an_op_at_the_fixed_layers(kind):
    # The authors' supernet training: layers 1, 5, 6, 9 are identity on every step; every
    # other layer runs one of its 6 MBConv ops, each as often as uniform allows.
    space = get_space("bnnas_mobilenet")
    # 17 layers x 6 ops = 102 frequencies: the largest |z| of 102 uniform ones is 2.3-3.4
    # over seeds 0-7 (seed 0 and 6 exceed 3 once), so the seed is one whose largest is 2.65.
    sampler = PathSampler(space, kind, seed=1)
    paths = sampler.epoch_paths(0, steps=10_000 // sampler.group_size).reshape(-1, space.num_layers)
    n = len(paths)
    assert n >= 9_996
    for layer in space.layers:
        counts = np.bincount(paths[:, layer.index], minlength=space.num_choices)
        if layer.index in (1, 5, 6, 9):
            assert counts[6] == n and counts.sum() == n  # identity (choice 6), never an op
            continue
        assert counts[6] == 0 and counts[:6].sum() == n  # an op in every path, never identity
        p = 1 / 6
        sigma = np.sqrt(n * p * (1 - p))
        assert (np.abs(counts[:6] - n * p) <= 3 * sigma).all(), (layer.index, counts)


def test_fair_group_is_one_optimizer_step_over_all_ops():
    cfg, trainer = in_process("bn_last", sampler="fair", train_images=32)  # one batch = one group
    row = trainer.train_epoch(0)
    assert row["steps"] == 1 and trainer.scheduler.last_epoch == 1
    assert row["images_per_sec"] * row["time_s"] == pytest.approx(32 * 6)  # 6 ops a layer: 6 paths a group
    fresh = init_supernet(trainer.space, SEED)
    freeze(fresh, "bn_last")
    after = trainer.model.state_dict()
    for name, p in fresh.named_parameters():
        if p.requires_grad:  # every op's scored BN took part in the group
            assert not torch.equal(p, after[name]), name


def test_in_process_resume_is_bit_exact():
    cfg, straight = in_process("bn_last", train_images=64)
    for e in range(3):
        straight.train_epoch(e)
    _, first = in_process("bn_last", train_images=64)
    first.train_epoch(0)
    state = first.state_dict()
    resumed = SupernetTrainer(cfg, first.splits, state=state)
    assert resumed.next_epoch == 1
    for e in (1, 2):  # both go on, interleaved: the state is a copy, so they share no momentum buffer
        first.train_epoch(e)
        resumed.train_epoch(e)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
        assert torch.equal(value, first.model.state_dict()[name]), name
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]


def test_reopened_stage_replans_the_schedule():
    # Deleting result.json and asking for more epochs continues from the checkpoint with
    # the LR schedule re-planned over the new total (not the decayed-to-zero old one).
    cfg, trainer = in_process("bn_last", train_images=64)
    cfg.supernet.epochs = 2
    trainer = SupernetTrainer(cfg, trainer.splits)
    trainer.train_epoch(0)
    trainer.train_epoch(1)
    state = trainer.state_dict()
    cfg.supernet.epochs = 4
    reopened = SupernetTrainer(cfg, trainer.splits, state=state)
    steps = reopened.steps_per_epoch
    assert reopened.next_epoch == 2 and reopened.start_epoch == 2
    expected = reopened.base_lr * lr_factor(2 * steps, 4 * steps, 0, cfg.supernet.schedule)
    assert reopened.optimizer.param_groups[0]["lr"] == pytest.approx(expected) and expected > 0


def test_rank_distance():
    t = np.array([[0.9, 0.5, 0.1, np.nan], [0.3, 0.2, 0.1, 0.0]])
    assert rank_distance(t, t) == 0.0
    reversed_ = np.array([[0.1, 0.5, 0.9, np.nan], [0.0, 0.1, 0.2, 0.3]])
    assert rank_distance(t, reversed_) == 1.0
    # One swap of neighbours in the 4-op layer: L1 = 2 of at most floor(4^2/2) = 8, so 0.25
    # there; the 3-op layer is unchanged (0). Layers weigh the same: (0 + 0.25) / 2.
    swapped = np.array([[0.9, 0.5, 0.1, np.nan], [0.2, 0.3, 0.1, 0.0]])
    assert rank_distance(t, swapped) == pytest.approx(0.125)
    assert math.isnan(rank_distance(None, t))  # first epoch: nothing to compare with


def test_lr_schedule():
    assert [lr_factor(t, 10, 2, "linear") for t in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 - 7 / 8)
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
