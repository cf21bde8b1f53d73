"""Reliability (issue 8): faults injected into real processes, and bad input at the CLI.

What this module adds to the fault and bad-input tests that live next to each stage
(docs/reliability.md lists them all, with what each one proves):

* a worker *node* of a multi-node Ray cluster removed mid-epoch (``ray.cluster_utils``);
* a Tune trial's process killed with SIGKILL while its siblings keep training;
* the driver of a whole small run killed with SIGKILL again and again, at moments
  triggered by what has appeared in the run directory, and the final result compared
  with an uninterrupted run of the same seed;
* truncated stage outputs (checkpoint, Parquet, JSON) reported, not loaded;
* the rows of the bad-input matrix that had no CLI-level test: one line on stderr,
  exit code 2, and every file of the existing run directory byte-for-byte unchanged.

The multi-process tests are marked ``slow``; the module sets up its own Ray where it
needs one (a Cluster, subprocesses) and only then the shared ``ray_local``: keep the
slow tests above the ones that use ``ray_local``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.run import main
from pipeline.storage import RunDir, StorageError, sha256_tree

REPO = Path(__file__).resolve().parents[1]

# A small space (4 searchable layers: 2 x 3 x 2 x 3 = 36 architectures) that trains and
# exports in a fraction of a second per epoch on 16 px synthetic images.
TINY_SPACE = """\
name: tiny
input_size: 16
in_channels: 3
num_classes: 4
stem:
  - {type: conv, out: 8, kernel: 3, stride: 1}
stages:
  - {channels: 16, depth: 2, stride: 2, ops: [mbconv_k3_e3, mbconv_k5_e3, mbconv_k7_e3]}
  - {channels: 24, depth: 2, stride: 2, ops: [mbconv_k3_e3, mbconv_k5_e3, mbconv_k7_e3]}
identity_layers: [1]
shortcut: pad
head: {channels: 32}
"""


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _tiny_space(tmp: Path) -> str:
    p = tmp / "tiny.yaml"
    p.write_text(TINY_SPACE)
    return str(p)


# =============================================================================
# 1. A worker node lost mid-epoch (multi-node cluster on one machine)
# =============================================================================

def _registered_epoch(train_dir: Path) -> int | None:
    """The epoch of the newest checkpoint Ray Train has *registered* (what a restart
    resumes from), read from its checkpoint-manager snapshot; None if there is none."""
    try:
        state = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(state["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, mid-write, or no checkpoint yet
        return None


@pytest.mark.slow
def test_worker_node_removed_mid_epoch_resumes_on_replacement_node(tmp_path, monkeypatch):
    """Stage 1 on a head (0 CPUs) and two 1-CPU worker nodes, so its two Train workers sit
    on different nodes. After epoch 0's checkpoint is registered, one worker node is
    killed outright (no graceful shutdown) and a fresh node joins; Ray Train restarts
    the worker group from the last checkpoint and every epoch is in the history once."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import Config, DataConfig, SupernetConfig
    from pipeline.train_supernet import HISTORY, TRAIN_NAME, train_supernet

    epochs = 3
    # Controller polls and node-death detection at test speed; both are read by the
    # processes the Cluster starts, so set them before it does.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():  # this test needs its own (multi-node) Ray
        ray.shutdown()
    cfg = Config(
        seed=11, run_dir=str(tmp_path / "run"),
        # 1280 training images / 2 workers / batch 32 = 20 steps: epochs of a few seconds.
        data=DataConfig(name="synthetic", synthetic_train=1344, synthetic_test=32, synthetic_size=16,
                        synthetic_classes=4, val_size=64, augment=False),
        supernet=SupernetConfig(epochs=epochs, batch_size=32, lr=2.0, num_workers=2, cpus_per_worker=1.0,
                                max_failures=3, checkpoints_to_keep=2, seeds=1),  # one supernet on both workers
    )
    run = RunDir(cfg.run_dir)
    train_dir = Path(cfg.run_dir) / TRAIN_NAME
    cluster = Cluster(initialize_head=True, head_node_args={
        # The dashboard serves the State API that Train V2's placement-group cleaner queries.
        "num_cpus": 0, "include_dashboard": True,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    # The Cluster records its address in /tmp/ray/ray_current_cluster, where any plain
    # ray.init() on this machine would join it; this test connects by address instead.
    ray._common.utils.reset_ray_address()
    outcome: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert ray.cluster_resources().get("CPU") == 2 and len([n for n in ray.nodes() if n["Alive"]]) == 3

        # Training runs in a thread; this (main) thread removes and adds nodes, which
        # Ray only allows from the main thread (signal handlers).
        lines: list[str] = []

        def fit() -> None:
            try:
                outcome["result"] = train_supernet(cfg, run, progress=lines.append)
            except BaseException as e:  # noqa: BLE001 -- reported by the main thread
                outcome["error"] = e

        t0 = time.monotonic()
        trainer = threading.Thread(target=fit, name="train-supernet", daemon=True)
        trainer.start()
        deadline = t0 + 240
        while _registered_epoch(train_dir) is None:
            assert trainer.is_alive(), f"training ended before the fault: {outcome}"
            assert time.monotonic() < deadline, "no registered checkpoint in time"
            time.sleep(0.05)
        registered = _registered_epoch(train_dir)
        cluster.remove_node(workers[1], allow_graceful=False)  # the node dies outright
        t_removed = time.monotonic()
        cluster.add_node(num_cpus=1)  # a replacement joins
        trainer.join(max(1.0, deadline - time.monotonic()))
        print(f"\nnode removed {t_removed - t0:.0f}s in, after epoch {registered} was registered; "
              f"run took {time.monotonic() - t0:.0f}s; progress:\n" + "\n".join(lines))
        assert not trainer.is_alive(), "training did not finish after the node was replaced"
        assert "error" not in outcome, repr(outcome["error"])
        assert outcome["result"]["epochs_run"] == epochs

        history = run.read_parquet(HISTORY)
        # No epoch lost, none duplicated.
        assert history["epoch"].tolist() == list(range(epochs))
        # Exactly one restart, from a checkpoint at or after the one registered before the
        # node went: epochs before it come from the first worker group, the rest from the new one.
        starts = history["start_epoch"].tolist()
        restart = max(starts)
        assert restart >= registered + 1, starts
        assert starts == [0] * restart + [restart] * (epochs - restart), starts
        # Both ranks walked the same paths in every epoch, before and after the restart.
        assert all(len(h) == 2 and len(set(h)) == 1 for h in history["path_hashes"])
    finally:
        # Ends the training thread too, if it is still waiting for workers.
        ray.shutdown()
        cluster.shutdown()


# =============================================================================
# 2. The driver SIGKILLed again and again during a small full run
# =============================================================================

def _kill_run_config(tmp: Path) -> Path:
    """The smallest run that still exercises every stage: Ray Train, the actor search
    (evolution + exact), Tune trials and the export (the report is left out: it adds
    seconds per run and nothing to what is compared)."""
    cfg = {
        "seed": 5,
        "data": {"name": "synthetic", "synthetic_train": 640, "synthetic_test": 64, "synthetic_classes": 4,
                 "synthetic_size": 16, "val_size": 64},
        "space": {"name": _tiny_space(tmp)},
        # Batches of 2: 288 steps, epochs of a few seconds, so that the kill after the
        # first registered checkpoint lands inside the second epoch.
        "supernet": {"epochs": 2, "batch_size": 2, "num_workers": 1, "seeds": 1, "max_failures": 1},
        "search": {"method": "both", "max_flops": 0.0, "population": 8, "generations": 3, "parents": 3,
                   "mutations": 3, "crossovers": 3, "top_n": 2, "num_actors": 1, "batch_archs": 2,
                   "driver_max_archs": 0},  # on the actors, as a big search is: a kill lands mid-search
        # The reproducible scheduler (sync halving): at the rung after epoch 1 one of the
        # two trials stops, the same one whatever the order of results and the kills.
        "retrain": {"epochs": 2, "batch_size": 64, "grace_period": 1, "scheduler": "sync", "max_failures": 1},
        "ray": {"num_cpus": 2},
    }
    import yaml

    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_driver(cfg_file: Path, run_dir: Path, log: Path, stages: str = "supernet,search,retrain") -> subprocess.Popen:
    out = open(log, "w")
    try:
        # Its own session, so that whatever of its Ray outlives it can be ended by group id.
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", "--config", str(cfg_file), "--run-dir", str(run_dir),
             "--stages", stages],
            cwd=REPO, env=_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", PYTHONUNBUFFERED="1"), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def _end_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then (after Ray's fate-sharing had a moment) its process group."""
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)
    time.sleep(1.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _state(d: Path) -> dict:
    """What a rerun will find: which stage outputs exist (taken after the driver is dead)."""
    return {
        "supernet_done": (d / "supernet/result.json").exists(),
        "supernet_ckpt": _registered_epoch(d / "supernet_train"),
        "search_done": (d / "search/result.json").exists(),
        "search_cache": (d / "search/cache.parquet").exists(),
        "retrain_done": (d / "retrain/result.json").exists(),
        "tune_state": any((d / "retrain_tune").glob("experiment_state*.json")),
        "trial_ckpts": len(list((d / "retrain_tune").glob("*/checkpoint_*"))),
    }


# Kill moments, in pipeline order; each fires when its condition on the run directory
# turns true. A condition already true when an attempt starts is skipped (the previous
# attempt got further than planned), so every kill lands at a new point.
TRIGGERS = [
    ("stage 1 in epoch 2 (epoch 1 checkpointed)", lambda d: _registered_epoch(d / "supernet_train") is not None),
    ("stage 2 under way (scores cached)",
     lambda d: (d / "search/cache.parquet").exists() or (d / "search/result.json").exists()),
    ("stage 3 starting (Tune experiment)", lambda d: (d / "retrain/inputs.json").exists()),
    ("stage 3 mid-trial (a trial checkpointed)", lambda d: any((d / "retrain_tune").glob("*/checkpoint_*"))),
    ("stage 3 exporting (model files being written)", lambda d: (d / "model/weights.pt").exists()),
]


def _continuation_expected(state: dict) -> list[str]:
    """Lines the rerun must print, given what the killed attempt left behind."""
    out = []
    if state["supernet_done"]:
        out.append("supernet: already trained")
    elif state["supernet_ckpt"] is not None:
        out.append("supernet: resuming at epoch|nothing left to train")
    if state["search_done"]:
        out.append("search: finished already")
    elif state["search_cache"]:
        out.append("search: resuming with")
    if not state["retrain_done"] and state["tune_state"]:
        out.append("retrain: resuming the Tune experiment")
    return out


def _outputs(d: Path) -> dict:
    run = RunDir(str(d))
    final = run.read_torch("supernet/final.pt")
    search = run.read_json("search/result.json")
    retrain = run.read_json("retrain/result.json")
    trials = run.read_parquet("retrain/trials.parquet")
    return {
        "indicator": np.asarray(final["indicator"]),
        "history_loss": run.read_parquet("supernet/history.parquet")["loss"].tolist(),
        "topn": search["topn"], "best": search["best"], "evolution_best": search["evolution_best"],
        "n_scored": search["n_scored"],
        "winner": (retrain["arch"], retrain["val_acc"], retrain["test_acc"], retrain["scheduler"]),
        "trials": _trials_without_timings(trials),
    }


TIMINGS = ("train_time_s",)  # the only columns of retrain/trials.parquet that measure time


def _trials_without_timings(trials: pd.DataFrame) -> list[dict]:
    rows = trials.drop(columns=list(TIMINGS)).to_dict("records")
    # NaN (the test accuracy of every trial but the winner) as None: NaN != NaN.
    return [{k: ([int(x) for x in v] if k == "arch" else None if isinstance(v, float) and np.isnan(v) else v)
             for k, v in row.items()} for row in rows]


def _epoch_lines(text: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"retrain: trial (\d+)/\d+ \S.*? epoch (\d+)/\d+ val_acc", text)]


@pytest.mark.slow
def test_driver_sigkilled_repeatedly_final_result_equals_uninterrupted(tmp_path):
    cfg_file = _kill_run_config(tmp_path)
    timings = {}

    # The uninterrupted run.
    t0 = time.monotonic()
    ref_dir, ref_log = tmp_path / "reference", tmp_path / "reference.log"
    proc = _start_driver(cfg_file, ref_dir, ref_log)
    try:
        assert proc.wait(300) == 0, ref_log.read_text()[-3000:]
    finally:
        _end_group(proc)
    timings["reference"] = time.monotonic() - t0

    # The same run, SIGKILLed at the trigger points, rerun after each kill.
    run_dir = tmp_path / "killed"
    kills: list[dict] = []
    pending = list(TRIGGERS)
    attempt = 0
    t0 = time.monotonic()
    while True:
        # The first trigger not already true: the next new moment to kill at.
        while pending and pending[0][1](run_dir):
            pending.pop(0)
        log = tmp_path / f"attempt{attempt}.log"
        if kills:  # the rerun must say it continues from what the killed attempt left
            kills[-1]["rerun_log"] = log
        proc = _start_driver(cfg_file, run_dir, log)
        try:
            label = None
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if pending and pending[0][1](run_dir):
                    label = pending.pop(0)[0]
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            assert time.monotonic() < deadline, f"attempt {attempt} hung:\n{log.read_text()[-3000:]}"
        finally:
            _end_group(proc)
        if label is None:  # it ran to the end
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
        kills.append({"at": label, "state": _state(run_dir)})
        attempt += 1
    timings["killed runs"] = time.monotonic() - t0

    print(f"\ntimings: { {k: round(v) for k, v in timings.items()} }")
    for i, k in enumerate(kills):
        print(f"kill {i + 1}: {k['at']}; left behind {k['state']}")
    assert len(kills) >= 5, [k["at"] for k in kills]
    assert len({k["at"] for k in kills}) == len(kills)  # every kill at a different moment
    for k in kills:  # each rerun continued from what the kill left, instead of starting over
        text = k["rerun_log"].read_text()
        for pattern in _continuation_expected(k["state"]):
            assert re.search(pattern, text), f"after the kill at {k['at']}, expected /{pattern}/ in:\n{text[-3000:]}"
        # The driver itself never died of an exception (Ray's actors may log their own).
        assert not re.search(r"^Traceback", text, re.M), text[-3000:]

    ref, got = _outputs(ref_dir), _outputs(run_dir)
    np.testing.assert_array_equal(got.pop("indicator"), ref.pop("indicator"))  # bit-for-bit, NaN = forbidden
    assert got == ref
    assert {p.name for p in (run_dir / "model").iterdir()} == {p.name for p in (ref_dir / "model").iterdir()}
    # Stage 3 under retrain.scheduler=sync: one trial stopped at the rung, and no epoch of a
    # trial trained twice over all the killed attempts (each epoch line at most once).
    assert sorted(t["epochs_run"] for t in ref["trials"]) == [1, 2]
    lines = [e for i in range(attempt + 1) for e in _epoch_lines((tmp_path / f"attempt{i}.log").read_text())]
    assert len(lines) == len(set(lines)), lines

    # A second uninterrupted stage 3 on the same inputs gives the same trials table.
    again = tmp_path / "again"
    for rel in ("supernet", "search"):
        shutil.copytree(ref_dir / rel, again / rel)
    t0 = time.monotonic()
    proc = _start_driver(cfg_file, again, tmp_path / "again.log", stages="retrain,report")
    try:
        assert proc.wait(300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    finally:
        _end_group(proc)
    print(f"second uninterrupted stage 3: {time.monotonic() - t0:.0f}s")
    assert _trials_without_timings(pd.read_parquet(again / "retrain/trials.parquet")) == ref["trials"]
    assert "Scheduler: sync halving (synchronous" in (again / "report/summary.md").read_text()


# =============================================================================
# 3. A Tune trial's process killed
# =============================================================================

def _recording_trial(pid_dir: str):
    """The real trial function, but first recording this trial's process id.

    Pickled by value to the trial actors (this module is not importable there); it
    calls the worker's own, unpatched ``pipeline.retrain.retrain_trial``."""

    def trial(config, **kwargs):
        from pipeline import retrain

        Path(pid_dir, str(config["arch_index"])).write_text(str(os.getpid()))
        return retrain.retrain_trial(config, **kwargs)

    return trial


@pytest.mark.slow
def test_killed_trial_process_resumes_from_its_checkpoint_others_unaffected(tmp_path, ray_local, monkeypatch):
    import ray.cloudpickle

    import pipeline.retrain as retrain_mod
    from pipeline.config import Config, DataConfig, RetrainConfig, SpaceConfig

    epochs = 3
    cfg = Config(
        seed=0, run_dir=str(tmp_path / "run"),
        data=DataConfig(name="synthetic", synthetic_train=768, synthetic_test=128, synthetic_size=16,
                        synthetic_classes=4, val_size=128),
        space=SpaceConfig(name=_tiny_space(tmp_path)),
        # Two trials at once, no ASHA stopping (grace = max_t), two retries each; 2 CPUs
        # each take all of Ray's 4, so no trial is resized (restarted) for freed CPUs.
        retrain=RetrainConfig(epochs=epochs, batch_size=64, grace_period=epochs, max_concurrent=2, max_failures=2,
                              cpus_per_trial=2.0),
    )
    run = RunDir(cfg.run_dir)
    run.write_parquet(retrain_mod.TOPN, pd.DataFrame({
        "rank": [1, 2], "arch": [[0, 3, 0, 0], [1, 3, 1, 2]], "score": [2.0, 1.0]}))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(retrain_mod, "retrain_trial", _recording_trial(str(pid_dir)))

    killed: dict = {}
    lines: list[str] = []
    reported: dict[int, list[dict]] = {0: [], 1: []}

    class KillAfterCheckpoint(retrain_mod._ProgressCallback):
        """Tune registers a function trainable's checkpoint in a second round trip to the
        trial's process (a "save" after the result): kill only once that is done, i.e.
        once trial 1's epoch-1 checkpoint is one a retry can resume from."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # What the driver received, in order. (Tune's own result.json is not the record:
            # on a retry Tune copies the synced copy over its local file, which can drop
            # the last row before the kill if the sync had not run yet.)
            if not result.get("replayed"):  # a resumed trial first re-reports its checkpoint's epoch
                reported[trial.config["arch_index"]].append(result)
            super().on_trial_result(iteration, trials, trial, result, **info)

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            if not killed and trial.config.get("arch_index") == 0 and (trial.last_result or {}).get("epoch") == 1:
                killed["pid"] = int((pid_dir / "0").read_text())
                os.kill(killed["pid"], signal.SIGKILL)

    monkeypatch.setattr(retrain_mod, "_ProgressCallback", KillAfterCheckpoint)

    result = retrain_mod.run_retrain(cfg, run, progress=lines.append)
    print("\n" + "\n".join(lines))
    assert killed, "trial 1 never reported epoch 1"
    assert any("trial 1/2" in ln and "retrying from its last checkpoint" in ln for ln in lines)
    assert int((pid_dir / "0").read_text()) != killed["pid"]  # it really ran again, in a new process

    hit, other = reported[0], reported[1]
    # The killed trial: every epoch reported once; after the kill it resumed from its
    # checkpoint (start_epoch > 0) instead of starting over at epoch 1.
    assert [r["epoch"] for r in hit] == list(range(1, epochs + 1)), hit
    resumed = [r for r in hit if r["start_epoch"] > 0]
    assert resumed and resumed[0]["epoch"] == resumed[0]["start_epoch"] + 1
    assert all(r["start_epoch"] == 0 for r in hit[: resumed[0]["start_epoch"]])
    # The other trial never noticed: one uninterrupted sequence.
    assert [r["epoch"] for r in other] == list(range(1, epochs + 1))
    assert all(r["start_epoch"] == 0 for r in other)
    trials = run.read_parquet(retrain_mod.TRIALS)
    assert trials["epochs_run"].tolist() == [epochs, epochs] and result["trials"] == 2
    # The stored curves (the report's source) have every epoch once, the killed trial's too.
    hist = run.read_parquet(retrain_mod.HISTORY)
    for i in (0, 1):
        assert hist[hist["trial"] == i]["epoch"].tolist() == list(range(1, epochs + 1))


# =============================================================================
# 4. Bad input and damaged files at the CLI: one line, exit 2, run dir unchanged
# =============================================================================

SMALL = ["data.name=synthetic", "data.synthetic_train=96", "data.synthetic_test=16", "data.val_size=32",
         "data.synthetic_size=16", "data.synthetic_classes=4", "supernet.batch_size=16", "search.max_flops=0",
         "search.top_n=2", "search.population=8", "search.generations=2", "search.parents=2", "search.mutations=2",
         "search.crossovers=2", "search.num_actors=1"]


def _sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _make_run(tmp_path: Path, sets: list[str], *, supernet: bool = False, topn=None) -> Path:
    """A run directory as the CLI leaves it (config.yaml), plus stage outputs
    written the way the stages write them: a 'trained' supernet (stage 1 finished) and
    a top-N table (stage 2's output for stage 3)."""
    from pipeline.config import load_config

    run_dir = tmp_path / "run"
    run = RunDir(str(run_dir))
    run.write_text("config.yaml", load_config(None, [*sets, f"run_dir={run_dir}"]).to_yaml())
    if supernet:
        from search_spaces import Supernet, bn_indicator, get_space

        cfg = load_config(None, [*sets, f"run_dir={run_dir}"])
        space = get_space(cfg.space.name).with_data(in_channels=3, num_classes=4, input_size=16)
        torch.manual_seed(0)
        model = Supernet(space)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.1, 2.0)
        table = bn_indicator(model)
        run.write_torch("supernet/final.pt", {
            "space": space.to_dict(), "fingerprint": space.fingerprint, "mode": cfg.supernet.mode, "epoch": 3,
            "model": model.state_dict(), "indicator": table, "indicator_history": [table]})
        t = np.asarray(table)
        run.write_parquet("supernet/history.parquet", pd.DataFrame({"epoch": [1, 2, 3], "loss": [2.0, 1.5, 1.2]}))
        run.write_parquet("supernet/indicators.parquet", pd.DataFrame(
            [{"epoch": 2, "layer": l, "choice": k, "op": op, "score": float(t[l, k])}
             for l, layer in enumerate(space.layers) for k, op in enumerate(layer.ops) if np.isfinite(t[l, k])]))
        run.write_json("supernet/result.json", {"epochs_run": 3, "stopped_early": False, "space": space.name,
                                                "mode": cfg.supernet.mode, "fingerprint": space.fingerprint})
    if topn is not None:
        run.write_parquet("search/topn.parquet", pd.DataFrame(topn))
    return run_dir


def _fails(run_dir: Path, args: list[str], message: str, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one stderr line holding ``message``
    and leave every file in ``run_dir`` as it was."""
    before = sha256_tree(run_dir)
    capsys.readouterr()
    code = main(["--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("bnnas: error: "), err
    assert message in err, err
    assert sha256_tree(run_dir) == before
    return err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("rel,stage", [("supernet/final.pt", "search"), ("supernet/result.json", "supernet"),
                                       ("search/topn.parquet", "retrain")])
def test_truncated_stage_output_is_reported_not_loaded(tmp_path, ray_local, capsys, rel, stage):
    """A file cut short (as a crash mid-copy or a full disk leaves it) stops the stage that
    reads it with one line naming the file and what to do; nothing is overwritten."""
    run_dir = _make_run(tmp_path, SMALL, supernet=True,
                        topn={"rank": [1, 2], "arch": [[0] * 7, [1] * 7], "score": [2.0, 1.0]})
    _truncate(run_dir / rel)
    err = _fails(run_dir, [*_sets(SMALL), "--stages", stage],
                 f"{run_dir}/{rel} is truncated or corrupt", capsys)
    assert "delete it to redo the step that writes it" in err


def test_deleting_the_reported_file_redoes_its_step(tmp_path, ray_local, capsys):
    """The corrupt-file message says "delete it to redo the step that writes it": doing
    just that must work, not leave the stage 'finished' without its output."""
    run_dir = _make_run(tmp_path, SMALL, supernet=True)
    args = [*_sets(SMALL), "--run-dir", str(run_dir)]
    assert main([*args, "--stages", "search"]) == 0
    topn = run_dir / "search" / "topn.parquet"
    expected = pd.read_parquet(topn)
    _truncate(topn)
    _fails(run_dir, [*_sets(SMALL), "--stages", "retrain"], f"{topn} is truncated or corrupt", capsys)
    topn.unlink()
    assert main([*args, "--stages", "search"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(topn), expected)
    # The search's other outputs (the report reads scored.parquet, and names it if damaged).
    for rel in ("search/scored.parquet", "search/result.json"):
        before = (run_dir / rel).read_bytes()
        (run_dir / rel).unlink()
        assert main([*args, "--stages", "search"]) == 0
        assert rel.endswith(".json") or (run_dir / rel).read_bytes() == before, rel
        assert (run_dir / rel).exists(), rel
    # A damaged score cache (read by an unfinished search) is named and not used: the
    # search scores again, to the same top-N.
    expected = pd.read_parquet(topn)
    _truncate(run_dir / "search/cache.parquet")
    (run_dir / "search/result.json").unlink()
    capsys.readouterr()
    assert main([*args, "--stages", "search"]) == 0
    assert f"search: ignoring search/cache.parquet ({run_dir}/search/cache.parquet is truncated" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(topn), expected)
    # A damaged config.yaml: "delete it or use another --run-dir".
    (run_dir / "config.yaml").write_text("seed: [\n")
    _fails(run_dir, [*_sets(SMALL), "--stages", "search"], f"{run_dir}/config.yaml is corrupt; delete it", capsys)
    (run_dir / "config.yaml").unlink()
    assert main([*args, "--stages", "search"]) == 0 and (run_dir / "config.yaml").exists()


def test_fewer_feasible_architectures_than_top_n_is_said_and_the_search_goes_on(tmp_path, ray_local, capsys):
    sets = [s for s in SMALL if not s.startswith(("search.max_flops", "search.top_n"))] + [
        "search.max_flops=1120000", "search.top_n=100", "search.method=exact"]  # 22 of 46,656 at 16 px
    run_dir = _make_run(tmp_path, sets, supernet=True)
    capsys.readouterr()
    assert main(["--run-dir", str(run_dir), *_sets(sets), "--stages", "search"]) == 0
    out = capsys.readouterr().out
    n = len(pd.read_parquet(run_dir / "search/topn.parquet"))
    said = [ln for ln in out.splitlines() if "search.top_n=100 but only" in ln]
    assert 1 <= n < 100 and said == [f"search: search.top_n=100 but only {n} architectures meet the budgets; "
                                     f"going on with those {n}"], out


def test_op_without_trailing_bn_at_cli(tmp_path, capsys):
    """A user op (registered in Python, used from a space YAML) that BN-NAS cannot score
    is refused before Ray starts or the run dir is touched."""
    from search_spaces import OPS, register_op

    register_op("test_no_trailing_bn", lambda cin, cout, stride: nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 1)))
    try:
        run_dir = _make_run(tmp_path, SMALL)
        space = tmp_path / "nobn.yaml"
        space.write_text(TINY_SPACE.replace("mbconv_k5_e3, mbconv_k7_e3]}\n  - {channels: 24",
                                            "test_no_trailing_bn, mbconv_k7_e3]}\n  - {channels: 24"))
        _fails(run_dir, [*_sets(SMALL), "--set", f"space.name={space}", "--stages", "supernet", "--force"],
               "op 'test_no_trailing_bn' does not end in an affine BatchNorm2d", capsys)
    finally:
        OPS.pop("test_no_trailing_bn", None)


@pytest.mark.parametrize("case", ["wrong length", "other space"])
def test_architecture_of_wrong_length_or_other_space_at_cli(tmp_path, ray_local, capsys, case):
    """Stage 3's architectures (search/topn.parquet) that do not fit the configured space."""
    if case == "wrong length":
        topn, message = {"rank": [1], "arch": [[0, 0, 0]]}, "has 3 choices but space 'mobilenet_small_res' has 7 layers"
    else:
        topn, message = ({"rank": [1], "arch": [[0] * 7], "fingerprint": ["0123456789abcdef"]},
                         "top-N was searched in another space (fingerprint 0123456789abcdef)")
    run_dir = _make_run(tmp_path, SMALL, topn=topn)
    _fails(run_dir, [*_sets(SMALL), "--stages", "retrain"], message, capsys)


@pytest.mark.parametrize("stages", ["search", "supernet,search"])
def test_infeasible_budget_at_cli(tmp_path, ray_local, capsys, stages):
    """Refused before the supernet trains, too: the budget depends on the space alone."""
    sets = [s for s in SMALL if not s.startswith("search.max_flops")] + ["search.max_flops=1000"]
    run_dir = _make_run(tmp_path, sets, supernet=stages == "search")
    _fails(run_dir, [*_sets(sets), "--stages", stages],
           "search.max_flops=1K is below the cheapest architecture in mobilenet_small_res", capsys)
    assert not (run_dir / "supernet_train").exists()


def test_non_finite_supernet_loss_stops_stage_1_at_its_step(tmp_path, ray_local, capsys):
    """supernet.lr=1e38 (finite, so validation passes) blows the BN parameters up after the
    first step: the stage stops at the step whose loss is NaN, names it and its lr in one
    line, and nothing is saved as a finished stage."""
    run_dir = _make_run(tmp_path, SMALL)
    capsys.readouterr()
    code = main(["--run-dir", str(run_dir), *_sets(SMALL + ["supernet.lr=1e38", "supernet.mode=all"]), "--stages", "supernet", "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"supernet training stopped: non-finite loss \((nan|inf)\) at epoch 1 step [2-9] \(lr [0-9.e+]+\); "
                     r"nothing was saved as finished", err), err
    assert not (run_dir / "supernet/result.json").exists() and not (run_dir / "supernet/final.pt").exists()


def test_finite_guard_names_the_first_bad_step_and_weights_that_overflow(tmp_path):
    """The guard both stages use (pipeline.finite), without Ray: the first non-finite loss
    by step and lr, also when it is only checked every few steps (as on a GPU); BN-only
    training whose losses stay finite while its statistics overflow (bn_last, lr 1e38)
    is caught after the epoch by check_weights."""
    from pipeline.config import Config, DataConfig, SpaceConfig, SupernetConfig
    from pipeline.data import build_datasets
    from pipeline.finite import FiniteGuard, NonFinite, NonFiniteLoss, check_weights
    from pipeline.train_supernet import SupernetTrainer

    guard = FiniteGuard("cpu")
    guard.step(torch.tensor(1.0), 0, 0, 0.5)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(nan\) at epoch 3 step 2 \(lr 0.25\)$"):
        guard.step(torch.tensor(float("nan")), 2, 1, 0.25)
    guard = FiniteGuard("cpu")
    guard.every = 5  # a GPU's guard checks every few steps: the step named is still the first bad one
    for step, value in enumerate([1.0, float("inf"), float("nan"), 2.0]):
        guard.step(torch.tensor(value), 0, step, 0.1 * (step + 1))
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss \(inf\) at epoch 1 step 2 \(lr 0.2\)"):
        guard.check()
    check_weights({"w": torch.ones(3), "steps": torch.tensor(3)}, 0, 0.1)
    with pytest.raises(NonFinite, match=r"^non-finite weights \(b and 1 more\) after epoch 2 \(lr 0.1\)$"):
        check_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor(float("nan"))},
                      1, 0.1)

    cfg = Config(seed=1, data=DataConfig(name="synthetic", synthetic_train=96, synthetic_test=16, val_size=32,
                                         synthetic_size=16, synthetic_classes=4),
                 space=SpaceConfig("mobilenet_small"),  # the authors' recipe: its losses stay finite
                 supernet=SupernetConfig(batch_size=16, lr=1e38, num_workers=1, mode="bn_last", gamma_init=1.0,
                                         train_classifier=False))
    trainer = SupernetTrainer(cfg, build_datasets(cfg.data, seed=cfg.seed))
    row = trainer.train_epoch(0)
    assert np.isfinite(row["loss"])  # BN keeps the loss finite...
    with pytest.raises(NonFinite, match=r"non-finite weights \(.*running_var.*\) after epoch 1"):
        check_weights(trainer.model.state_dict(), 0, row["lr"])  # ...while its statistics overflow


def test_missing_dataset_at_cli(tmp_path, ray_local, capsys):
    sets = ["data.name=cifar10", f"data.root={tmp_path / 'nodata'}", "data.download=false"]
    run_dir = _make_run(tmp_path, sets)
    _fails(run_dir, [*_sets(sets), "--stages", "supernet"], "CIFAR-10 not found under", capsys)


def test_corrupt_dataset_files_at_cli(tmp_path, ray_local, capsys):
    """Unreadable Fashion-MNIST files: one line saying to delete them and rerun; doing so
    unpacks them again (from the Debian package, offline) and the data loads."""
    root = tmp_path / "data"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    sets = ["data.name=fashion_mnist", f"data.root={root}", "data.download=false"]
    run_dir = _make_run(tmp_path, sets)
    err = _fails(run_dir, [*_sets(sets), "--stages", "supernet"], f"Fashion-MNIST files under {raw} are unreadable",
                 capsys)
    assert err.endswith(f"delete {raw} and rerun"), err
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("no Debian Fashion-MNIST package to unpack from again (apt-get install dataset-fashion-mnist)")
    shutil.rmtree(raw)
    from pipeline.config import load_config
    from pipeline.data import build_datasets

    splits = build_datasets(load_config(None, sets).data, seed=0)  # what the rerun's first step does
    assert len(splits.train) == 55000 and len(splits.test) == 10000


def test_unreachable_ray_address_from_environment(tmp_path):
    """RAY_ADDRESS (not --address) naming a dead cluster: refused in seconds, not retried
    for minutes; a real process, since an in-process Ray would already be connected."""
    run_dir = _make_run(tmp_path, SMALL)
    before = sha256_tree(run_dir)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--run-dir", str(run_dir), *_sets(SMALL),
                           "--stages", "supernet"], cwd=REPO, env={**_env(), "RAY_ADDRESS": "127.0.0.1:1"},
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "cannot reach the Ray cluster at '127.0.0.1:1'" in err[0], err
    assert "unset RAY_ADDRESS" in err[0] and time.monotonic() - t0 < 60
    assert sha256_tree(run_dir) == before


# =============================================================================
# 5. Damaged checkpoints: the newest intact one is used, never a retry loop
# =============================================================================

def _supernet_cfg(tmp: Path):
    from pipeline.config import Config, DataConfig, SupernetConfig

    return Config(seed=2, run_dir=str(tmp / "run"),
                  data=DataConfig(name="synthetic", synthetic_train=352, synthetic_test=32, synthetic_size=16,
                                  synthetic_classes=4, val_size=32),
                  supernet=SupernetConfig(epochs=2, batch_size=32, lr=2.0, num_workers=1, seeds=1, max_failures=3,
                                          checkpoints_to_keep=2))


def _supernet_outputs(run: RunDir) -> dict:
    final = run.read_torch("supernet/final.pt")
    history = run.read_parquet("supernet/history.parquet")
    return {"model": final["model"], "indicator": np.asarray(final["indicator"]), "loss": history["loss"].tolist(),
            "acc": history["acc"].tolist(), "epoch": history["epoch"].tolist()}


def _assert_same_supernet(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["indicator"], want["indicator"])
    assert (got["loss"], got["acc"], got["epoch"]) == (want["loss"], want["acc"], want["epoch"])
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name


def test_corrupt_newest_supernet_checkpoint_resumes_from_the_older_one(tmp_path, ray_local):
    """state.pt of the newest Ray Train checkpoint cut to half, supernet/result.json and
    final.pt removed so that stage 1 must resume: the damaged file is named in one line,
    training continues from the older checkpoint and ends where the uninterrupted run
    ended."""
    from pipeline.train_supernet import TRAIN_NAME, train_supernet

    cfg = _supernet_cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    train_supernet(cfg, run, progress=lambda s: None)
    reference = _supernet_outputs(run)
    train_dir = Path(cfg.run_dir) / TRAIN_NAME

    def damage(names) -> None:
        for name in names:
            _truncate(train_dir / name / "state.pt")
        for rel in ("supernet/result.json", "supernet/final.pt"):
            (Path(cfg.run_dir) / rel).unlink()

    older, newest = sorted(p.name for p in train_dir.glob("checkpoint_*") if p.is_dir())
    damage([newest])
    # A damaged supernet/run.json (read only when resuming) is named, before Ray starts;
    # deleted as the line says, it is written again.
    _truncate(Path(cfg.run_dir) / "supernet/run.json")
    with pytest.raises(StorageError, match=r"supernet/run.json is truncated or corrupt .*delete it to redo"):
        train_supernet(cfg, run, progress=lambda s: None)
    (Path(cfg.run_dir) / "supernet/run.json").unlink()
    lines: list[str] = []
    result = train_supernet(cfg, run, progress=lines.append)
    print("\n".join(lines))
    assert run.read_json("supernet/run.json")["mode"] == cfg.supernet.mode
    named = [ln for ln in lines if "damaged" in ln]
    assert len(named) == 1 and f"{train_dir}/{newest}/state.pt is damaged" in named[0], lines
    assert any("resuming at epoch 2/2 from the checkpoint of epoch 1/2" in ln for ln in lines), lines
    assert result["start_epoch"] == 1 and not any("Traceback" in ln for ln in lines)
    _assert_same_supernet(_supernet_outputs(run), reference)
    # With none intact: from scratch (pipeline.checkpoints.load_intact gives no state;
    # tests/test_storage.py::test_load_intact_skips_damaged_checkpoints).

    # The stage's other outputs, deleted as a damaged file's message says: written again
    # from the latest checkpoint, nothing trained.
    indicators = run.read_parquet("supernet/indicators.parquet")
    for rel in ("supernet/history.parquet", "supernet/indicators.parquet"):
        (Path(cfg.run_dir) / rel).unlink()
    lines = []
    train_supernet(cfg, run, progress=lines.append)
    assert any("nothing left to train" in ln for ln in lines) and not any(ln.startswith("supernet epoch") for ln in lines)
    _assert_same_supernet(_supernet_outputs(run), reference)
    pd.testing.assert_frame_equal(run.read_parquet("supernet/indicators.parquet"), indicators)
