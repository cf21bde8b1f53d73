"""Stage 3: retrain the top-N architectures from scratch as Ray Tune trials.

One Tune trial per architecture of ``search/topn.parquet``. Each trial builds the
standalone subnet from random init and trains it with a plain recipe (SGD or AdamW,
cosine schedule, label smoothing, the dataset's augmentation), reporting validation
accuracy and loss with a checkpoint after every epoch. ASHA compares trials at its rungs
(``grace_period * reduction_factor**k`` epochs) and stops the weak ones, so their CPUs
and GPUs go to the others. The winner is the trial with the best validation accuracy
*at max_t* among those that trained all epochs (a trial stopped at a rung never
competes: its accuracy is from a shorter schedule). The winner is evaluated once on the
test set and exported (``pipeline.export``).

Outputs in the run directory::

    retrain_tune/            the Tune experiment (trial checkpoints, experiment state)
    retrain/inputs.json      what the experiment was started with (checked on resume)
    retrain/trials.parquet   one row per trial
    model/                   weights.pt, arch.json, model.pt2 (see pipeline.export)
    retrain/result.json      the winner; written LAST: its presence means "finished"

Resume: a rerun with the same run directory restores the Tune experiment
(``Tuner.restore``): finished trials (including those ASHA stopped) are not retrained,
interrupted ones continue from their last checkpoint with the epoch count continuing.

Trials are plain function trainables, not Ray Train inside Tune: when ASHA stops a
Train-in-Tune trial, Train V2 frees its placement group through the State API, which
needs ``ray[default]``; without it the CPUs leak and the next trial hangs.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
try:
    from ray.tune import Callback
except ImportError:  # the trial's train/evaluate functions also serve bench/ on machines without Ray
    Callback = object
from torch import nn

from search_spaces import ArchitectureError, SearchSpace, build_subnet, cost_tables

from .common import (PipelineError, Progress, cluster_address, ensure_ray, read_stage_output, register_ops,
                     resolve_space, resource_shortfall, space_ops)
from .checkpoints import load_intact
from .config import Config, diff_configs
from .data import build_datasets, make_loader
from .finite import FiniteGuard, NonFinite, check_weights
from .progress import Relay, Ticker, eta, meter, send
from .schedules import cosine_schedule
from .seeding import derive_seed
from .storage import RunDir
from .util import one_line

TOPN = "search/topn.parquet"
EXPERIMENT = "retrain_tune"  # Tune's experiment folder inside the run dir
INPUTS = "retrain/inputs.json"
TRIALS = "retrain/trials.parquet"
HISTORY = "retrain/history.parquet"  # per trial and epoch, from the trials' own checkpoints
RESULT = "retrain/result.json"
MODEL_DIR = "model"
CKPT_FILE = "state.pt"  # inside each Tune checkpoint directory


# ============================================================================ entry point

def run_retrain(cfg: Config, run: RunDir, progress: Progress = print) -> dict:
    """Retrain the top-N, pick and export the winner; return ``retrain/result.json``."""
    if run.exists(RESULT):
        done = read_stage_output(run, RESULT)
        missing = [rel for rel in _outputs(done) if not run.exists(rel)]
        if not missing:
            return done
        # A deleted output (as a CorruptFileError message says to do) is written again
        # from the finished Tune experiment: no trial is retrained.
        progress(f"retrain: {missing[0]} is missing; writing the stage's outputs again")
    started = time.time()
    r = cfg.retrain

    # Everything that can be wrong with the input is checked before Ray does anything,
    # so a bad top-N or an impossible resource request is one line, not a hang.
    splits = build_datasets(cfg.data, seed=cfg.seed)
    info = splits.info
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    candidates = read_topn(run, space)
    ensure_ray(cfg)
    check_resources(r.cpus_per_trial, r.gpus_per_trial)

    archs = [c["arch"] for c in candidates]
    progress(f"retrain: {len(archs)} architectures x {r.epochs} epochs, scheduler {SCHEDULERS[r.scheduler]} "
             f"(grace {r.grace_period}, reduction {r.reduction_factor}), {r.cpus_per_trial:g} CPU / "
             f"{r.gpus_per_trial:g} GPU per trial")
    _SINKS[run.uri] = progress
    try:
        with Relay(progress) as relay:  # the trials' lines inside an epoch
            results = _tuner(cfg, run, space, archs, progress, relay.queue).fit()
    finally:
        _SINKS.pop(run.uri, None)

    rows = _trial_rows(results, candidates, r.epochs, run)
    winner = _pick_winner(rows, r.epochs)
    state = _load_checkpoint_state(winner["_checkpoint"])
    _write_history(run, rows, loaded={winner["trial"]: state})

    # The test set is touched exactly here, once, for the one chosen network.
    test = _evaluate_test(cfg, space, winner["arch"], state["model"], splits)
    winner["test_acc"] = test["test_acc"]
    for row in rows:
        row.pop("_checkpoint", None)

    _write_trials(run, rows)
    files = _export(run, space, winner, state["model"], test, progress)
    result = {
        "arch": list(winner["arch"]),
        "arch_authors": space.authors_arch(winner["arch"]),  # -1 = identity
        "ops": space.op_names(winner["arch"]),
        "space": space.name,
        "fingerprint": space.fingerprint,
        "rank": winner["rank"],
        "val_acc": winner["final_val_acc"],  # at max_t: what the winner was chosen by
        "best_val_acc": winner["best_val_acc"],
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        "test_samples": test["test_samples"],
        "flops": winner["flops"],
        "params": winner["params"],
        "bn_score": winner["bn_score"],
        "epochs": r.epochs,
        "scheduler": r.scheduler,
        "trials": len(rows),
        "stopped_early": int(sum(row["stopped_early"] for row in rows)),
        "train_time_s": round(sum(row["train_time_s"] for row in rows), 1),
        "elapsed_s": round(time.time() - started, 1),  # this invocation (a resume counts from its start)
        "model": files,
    }
    _print_table(rows, r.epochs, progress, SCHEDULERS[r.scheduler])
    progress(f"retrain: winner trial {winner['trial'] + 1} {list(winner['arch'])} val_acc {result['val_acc']:.4f} "
             f"test_acc {result['test_acc']:.4f}; model in {run.uri}/{MODEL_DIR}")
    run.write_json(RESULT, result)  # last: marks the stage finished
    return result


SCHEDULERS = {"asha": "ASHA", "sync": "sync halving"}  # as the console and the report name them


def _outputs(result: dict) -> list[str]:
    """The files a finished stage 3 stands for (its result.json lists the model's)."""
    model = result.get("model") or {}
    return [TRIALS, HISTORY] + [model[k] for k in ("weights", "program", "arch") if model.get(k)]


# ============================================================================ input checks

def read_topn(run: RunDir, space: SearchSpace) -> list[dict]:
    """The top-N as dicts (arch tuple, rank, bn_score, flops, params), each arch validated."""
    df = read_stage_output(run, TOPN, f"{run.uri}/{TOPN} not found; run the search stage first")
    if "arch" not in df.columns:
        raise PipelineError(f"{run.uri}/{TOPN} has no 'arch' column (columns: {', '.join(map(str, df.columns))}); "
                            "rerun the search stage")
    if len(df) == 0:
        raise PipelineError(f"top-N is empty ({run.uri}/{TOPN} has no rows); rerun the search stage "
                            "(are the search budgets so tight that nothing fits?)")
    if "rank" in df.columns:
        df = df.sort_values("rank", kind="stable")
    if "fingerprint" in df.columns:  # stage 2 may record the space; then it must be this one
        other = sorted(set(df["fingerprint"].astype(str)) - {space.fingerprint})
        if other:
            raise PipelineError(f"top-N was searched in another space (fingerprint {other[0]}), not {space.name!r} "
                                f"({space.fingerprint}); use the space.name and data settings of the search")
    tables = None
    out = []
    for i, row in enumerate(df.to_dict("records")):
        try:
            arch = space.validate(row["arch"])
        except ArchitectureError as e:
            raise PipelineError(f"top-N row {i} does not fit space {space.name!r}: {e}; the top-N was searched "
                                "in another space (check space.name and the dataset)") from None
        flops, params = row.get("flops"), row.get("params")
        if not _is_number(flops) or not _is_number(params):
            tables = tables or cost_tables(space)
            flops, params = tables.cost(arch)
        out.append({"arch": arch, "rank": int(row["rank"]) if _is_number(row.get("rank")) else i,
                    "bn_score": float(row["score"]) if _is_number(row.get("score")) else float("nan"),
                    "flops": float(flops), "params": float(params)})
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not (isinstance(x, float) and math.isnan(x))


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse a per-trial request no node can ever meet (Tune would wait forever)."""
    # One trial at a time is enough to make progress; each runs on one node.
    short = resource_shortfall({"CPU": cpus, "GPU": gpus}, units=1)
    if short is None:
        return
    if "CPU" in short.need:
        raise PipelineError(
            f"retrain.cpus_per_trial={cpus:g} but the largest Ray node has {short.largest_node['CPU']:g} CPUs "
            f"(cluster total {short.cluster['CPU']:g}); lower retrain.cpus_per_trial or add larger nodes")
    raise PipelineError(
        f"retrain.gpus_per_trial={gpus:g} but the largest Ray node has {short.largest_node['GPU']:g} GPUs "
        f"(cluster total {short.cluster['GPU']:g}); set retrain.gpus_per_trial=0 or add GPU nodes")


# ============================================================================ the Tune experiment

# Progress sinks by run dir. Tune pickles the RunConfig (callbacks included) into the
# experiment and a restore uses the pickled callback, so the callback must not carry the
# caller's progress function: it looks its sink up here at call time.
_SINKS: dict[str, Progress] = {}


def _tuner(cfg: Config, run: RunDir, space: SearchSpace, archs: list[tuple[int, ...]], progress: Progress,
           events=None):
    import ray
    from ray import tune

    from .rungs import StopOnNonFinite, make_scheduler

    r = cfg.retrain
    _quiet_tune()
    exp_path = _join(run.storage_path, EXPERIMENT)
    trainable = tune.with_resources(
        tune.with_parameters(retrain_trial, cfg=cfg, space=space, ops=space_ops(space), run_uri=run.uri,
                             events=events),
        {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    inputs = {"seed": cfg.seed, "space": space.name, "fingerprint": space.fingerprint,
              "archs": [list(a) for a in archs], "retrain": cfg.to_dict()["retrain"], "data": cfg.to_dict()["data"]}

    if _restorable(run, exp_path):
        if run.exists(INPUTS):
            changed = diff_configs(read_stage_output(run, INPUTS), inputs)
            if changed:
                raise PipelineError(
                    f"{run.uri}/{EXPERIMENT} was started with other inputs ({changed[0]}); rerun with the original "
                    f"settings, or delete {EXPERIMENT}/ and retrain/ in the run dir to retrain from scratch")
        else:
            run.write_json(INPUTS, inputs)  # deleted (as its CorruptFileError message says): the inputs are these
        progress(f"retrain: resuming the Tune experiment in {exp_path}")
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)

    run.write_json(INPUTS, inputs)
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=r.cpus_per_trial)
    return tune.Tuner(
        trainable,
        # One trial per architecture. The arch list travels in the config (not only in
        # with_parameters) so that a restored trial always gets the arch it started with.
        param_space={"arch_index": tune.grid_search(list(range(len(archs)))),
                     "archs": [list(a) for a in archs]},
        # asha: ASHA in a ResourceChangingScheduler (freed CPUs to the survivors); sync:
        # synchronous successive halving (pipeline/rungs.py, docs/reliability.md).
        tune_config=tune.TuneConfig(**make_scheduler(r, len(archs), largest)),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=run.storage_path,
            failure_config=tune.FailureConfig(max_failures=r.max_failures),
            # Two, not one: Tune's experiment snapshot may still name the previous
            # checkpoint when the newest one lands (it forces a snapshot every
            # num_to_keep checkpoints), and a restore needs that one to exist.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            stop=StopOnNonFinite(),  # a non-finite loss ends the stage at once
            callbacks=[_ProgressCallback(run.uri, len(archs), r.epochs, SCHEDULERS[r.scheduler])],
            verbose=0,  # Tune's tables are noisy; the callback prints one line per epoch
        ),
    )


def _quiet_tune() -> None:
    """Tune lines a user can do nothing about; the progress lines say what happens."""
    # Every resize (the trial's epoch lines show its threads), a snapshot forced by the
    # checkpoints a resumed trial reports, the wrapper's one-off note when
    # ResourceChangingScheduler checks reuse_actors (which it must be off for).
    logging.getLogger("ray.tune.schedulers.resource_changing_scheduler").setLevel(logging.WARNING)
    # Its "Wrote the latest version of all result files" at the end (warnings still show).
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer output engine prints its "Configuration for experiment" box, the results
    # path and a TensorBoard hint even at verbose=0 (experiment_started ignores the level);
    # its older reporter, which this selects, is silent at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(getattr(f, "bnnas", False) for f in controller.filters):
        def drop(record: logging.LogRecord) -> bool:
            return "_reuse_actors interface" not in str(record.msg)
        drop.bnnas = True
        controller.addFilter(drop)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else posixpath.join(base, name)


def _restorable(run: RunDir, exp_path: str) -> bool:
    from ray import tune

    # tuner.pkl is written when the Tuner is built, the experiment state only once the
    # run loop saved it; with no state there is nothing to resume, so start afresh.
    return tune.Tuner.can_restore(exp_path) and any(
        n.startswith("experiment_state") for n in run.listdir(EXPERIMENT))


class _ProgressCallback(Callback):
    """Concise progress lines from the driver: one per trial epoch, one per trial end."""

    def __init__(self, key: str, n: int, max_t: int, scheduler: str = "ASHA"):
        self.key, self.n, self.max_t, self.scheduler = key, n, max_t, scheduler

    def _say(self, line: str) -> None:
        _SINKS.get(self.key, print)(line)

    def _name(self, trial) -> str:
        i = trial.config.get("arch_index", -1)
        arch = trial.config.get("archs", [[]])[i] if i >= 0 else []
        return f"trial {i + 1}/{self.n} {list(arch)}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # .get: an exception in a callback would end the whole experiment.
        nan = float("nan")
        for note in result.get("notes") or ():
            self._say(f"retrain: {self._name(trial)}: {note}")
        if result.get("nonfinite"):
            self._say(f"retrain: {self._name(trial)} stopped: {result['nonfinite']}")
            return
        threads = f", {result['threads']} threads" if result.get("threads") else ""
        if result.get("replayed"):  # the resumed trial says where it is; nothing was trained
            self._say(f"retrain: {self._name(trial)} resumed from its checkpoint of epoch "
                      f"{result.get('epoch', '?')}/{self.max_t}{threads}")
            return
        self._say(f"retrain: {self._name(trial)} epoch {result.get('epoch', '?')}/{self.max_t} "
                  f"val_acc {result.get('val_acc', nan):.4f} val_loss {result.get('val_loss', nan):.4f} "
                  f"train_loss {result.get('train_loss', nan):.4f} ({result.get('epoch_s', nan):.1f}s{threads})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("nonfinite"):
            return
        epochs = last.get("epoch", 0)
        how = f"stopped early by {getattr(self, 'scheduler', 'ASHA')} after" if epochs < self.max_t else "finished"
        self._say(f"retrain: {self._name(trial)} {how} {epochs}/{self.max_t} epochs "
                  f"(val_acc {last.get('val_acc', float('nan')):.4f})")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(f"retrain: {self._name(trial)} failed ({_trial_error(trial)}); retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"retrain: {self._name(trial)} failed for good: {_trial_error(trial)}")


def _trial_error(trial) -> str:
    return one_line(trial.get_error() if hasattr(trial, "get_error") else None, 200, last_line=True)


# ============================================================================ one trial

def retrain_trial(config: dict, *, cfg: Config, space: SearchSpace, ops: dict, run_uri: str | None = None,
                  events=None) -> None:
    """Tune function trainable: train one architecture, report + checkpoint every epoch.

    Resumed (a retry, a restore, a pause for a rung or for more CPUs), it continues from
    the newest intact checkpoint in its own folder of ``run_uri`` (which may be newer
    than the one Tune registered: no epoch is trained twice) and first reports that
    epoch again (``replayed``) so that Tune and the scheduler know where it stands.
    """
    from ray import tune

    # Tune logs every persisted checkpoint at INFO; the driver prints one line per epoch.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    r = cfg.retrain
    index = int(config["arch_index"])
    arch = space.validate(config["archs"][index])
    register_ops(ops)
    threads = _threads(cfg)
    torch.set_num_threads(threads)
    device = _device(r.gpus_per_trial)
    if r.scheduler == "sync" and device.type == "cuda":  # the same kernels every run (CPU results already are)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    job = Standalone(cfg, space, arch, seed=cfg.seed, index=index, device=device)
    model, optimizer, scheduler = job.model, job.optimizer, job.scheduler

    start_epoch, best_val_acc, history, notes = 0, 0.0, [], []
    state = _resume_state(run_uri, tune.get_checkpoint(), notes.append)
    if state is not None:  # a restored, retried or resized trial: continue, do not restart
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val_acc = int(state["epoch"]), float(state["best_val_acc"])
        history = list(state.get("history", []))

    def report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="bnnas-retrain-") as d:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": metrics["epoch"],
                        "best_val_acc": best_val_acc, "history": history},
                       os.path.join(d, CKPT_FILE))
            # report copies the folder to storage before it returns.
            tune.report({**metrics, "notes": notes[:], "val_curve": [h["val_acc"] for h in history]},
                        checkpoint=tune.Checkpoint.from_directory(d))
        notes.clear()

    if history:
        report({**history[-1], "best_val_acc": best_val_acc, "arch_index": index, "replayed": True,
                "threads": threads})
    for epoch in range(start_epoch, r.epochs):
        t0 = time.time()
        try:
            name = f"trial {index + 1}/{len(config['archs'])} {list(arch)} epoch {epoch + 1}/{r.epochs}"
            tick = ((Ticker(cfg.progress_s), lambda line: send(events, f"retrain: {name} {line}"), r.epochs - epoch - 1)
                    if events is not None else None)
            train_loss = job.train_epoch(epoch, guard=FiniteGuard(device), tick=tick)
            check_weights(model.state_dict(), epoch, optimizer.param_groups[0]["lr"])
        except NonFinite as e:  # no checkpoint: the stage stops (StopOnNonFinite) with this line
            tune.report({"epoch": epoch, "val_acc": float("nan"), "arch_index": index, "nonfinite": str(e),
                         "notes": notes[:]})
            return
        val_acc, val_loss = job.validate()
        best_val_acc = max(best_val_acc, val_acc)
        metrics = {"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss, "train_loss": train_loss,
                   "best_val_acc": best_val_acc, "lr": optimizer.param_groups[0]["lr"],
                   "start_epoch": start_epoch, "arch_index": index, "epoch_s": time.time() - t0,
                   "threads": threads}
        # The curve travels in the checkpoint: Tune's result.json can lose a row when a
        # retried trial's log is restored from an older synced copy.
        history.append({k: metrics[k] for k in ("epoch", "val_acc", "val_loss", "train_loss", "lr", "start_epoch",
                                                "epoch_s", "threads")})
        report(metrics)


class Standalone:
    """One architecture from random init with the retraining recipe: a trial's model,
    optimizer, schedule and per-epoch data, which the benchmarks train without Tune too.

    ``seed`` and ``index`` fix the initial weights and every epoch's data order and
    augmentation draws, so an epoch is the same whether or not training was interrupted
    before it.
    """

    def __init__(self, cfg: Config, space: SearchSpace, arch: Sequence[int], *, seed: int, index: int,
                 device: torch.device | str = "cpu", splits=None):
        r = cfg.retrain
        self.cfg, self.seed, self.index, self.device = cfg, seed, index, torch.device(device)
        self.splits = splits if splits is not None else build_datasets(cfg.data, seed=cfg.seed)
        torch.manual_seed(derive_seed(seed, "init", index))  # the initial weights: one seed per architecture
        self.model = build_subnet(space, tuple(arch)).to(self.device, memory_format=torch.channels_last)
        self.optimizer = _optimizer(self.model, cfg)
        self.drop_last = len(self.splits.train) > r.batch_size  # a 1-sample batch breaks BatchNorm
        # Cosine over max_t epochs, stepped per batch: it reaches 0 at the last step, which a
        # per-epoch step would not in a 3-4 epoch schedule. A stopped trial never reaches the
        # end; a resumed one continues the same curve (the step count is in its checkpoint).
        self.scheduler = cosine_schedule(
            self.optimizer, r.epochs * _steps_per_epoch(len(self.splits.train), r.batch_size, self.drop_last))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
        self._eval_loaders: dict = {}  # by split: the same unshuffled order every epoch

    def train_epoch(self, epoch: int, **kw) -> float:
        """Epoch ``epoch`` (0-based); ``kw`` goes to ``_train_epoch`` (guard, tick). The mean loss."""
        r = self.cfg.retrain
        torch.manual_seed(derive_seed(self.seed, "augment", self.index, epoch))
        loader = make_loader(self.splits.train, r.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                             drop_last=self.drop_last, num_workers=self.cfg.data.num_workers)
        return _train_epoch(self.model, loader, self.optimizer, self.criterion, self.device, self.scheduler,
                            epoch=epoch, **kw)

    def validate(self, split: str = "val") -> tuple[float, float]:
        """Accuracy and loss on the validation (or ``"test"``) split."""
        if split not in self._eval_loaders:
            self._eval_loaders[split] = make_loader(getattr(self.splits, split), self.cfg.retrain.batch_size,
                                                    shuffle=False)
        return evaluate(self.model, self._eval_loaders[split], self.device)


def _threads(cfg: Config) -> int:
    """torch's thread count in a trial: under ``asha`` the CPUs Tune gives the trial now
    (they grow when ASHA frees some), under ``sync`` always ``cpus_per_trial``."""
    cpus = cfg.retrain.cpus_per_trial
    if cfg.retrain.scheduler == "asha":
        try:
            from ray import tune

            cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", cpus)
        except Exception:  # outside a Tune session (tests, bench/): the configured share
            pass
    return max(1, int(cpus))


def _resume_state(run_uri: str | None, checkpoint, say: Callable[[str], None]) -> dict | None:
    """The state to continue from: the intact checkpoint of the highest epoch in this
    trial's folder; a damaged one is named (``say``) and skipped."""
    if run_uri is None:  # called without the run dir: Tune's registered checkpoint as it is
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=True)
    from ray import tune

    trial_rel = f"{EXPERIMENT}/{os.path.basename(tune.get_context().get_trial_dir().rstrip('/'))}"
    return load_intact(RunDir(run_uri), trial_rel, CKPT_FILE, key=lambda st: int(st["epoch"]), say=say)[1]


def _device(gpus: float) -> torch.device:
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("Ray gave this trial a GPU but torch sees none (CPU-only torch build?); "
                           "install a CUDA torch or set retrain.gpus_per_trial=0")
    return torch.device("cuda")


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    r = cfg.retrain
    # No weight decay on BN parameters and biases (standard; decaying gamma fights BN).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=r.lr)
    return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0)


def _train_epoch(model, loader, optimizer, criterion, device, scheduler=None, guard=None, epoch: int = 0,
                 tick=None) -> float:
    """One pass over ``loader``; ``scheduler`` (if any) steps once per batch; ``guard``
    (a ``FiniteGuard``) raises ``NonFiniteLoss`` at the first non-finite loss; ``tick``,
    a (``Ticker``, say, epochs after this one) triple, says a progress line whenever the
    ticker is due."""
    model.train()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        # channels_last: depthwise convs run 1.5-2x faster on CPU and on GPU
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = criterion(model(x), y)
        if guard is not None:
            guard.step(loss, epoch, step, optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        if tick is not None and tick[0].due():
            elapsed = time.perf_counter() - t0
            per_step = elapsed / (step + 1)
            left = (len(loader) - step - 1 + tick[2] * len(loader)) * per_step
            tick[1](f"{meter(step + 1, len(loader), elapsed)}  train_loss {total / count:.4f}  "
                    f"{count / max(elapsed, 1e-9):.0f} img/s  trial ETA {eta(left)}")
    if guard is not None:
        guard.check()
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy without smoothing) over a loader."""
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return correct / max(count, 1), loss / max(count, 1)


# ============================================================================ results

def _trial_rows(results, candidates: list[dict], max_t: int, run: RunDir | None = None) -> list[dict]:
    """One row per trial, in top-N order; a trial that failed for good, or stopped at a
    non-finite loss, is an error."""
    for res in results:
        bad = (res.metrics or {}).get("nonfinite")
        if bad:
            i = int(res.metrics["arch_index"])
            where = f" in {run.uri}" if run is not None else ""
            raise PipelineError(
                f"retrain trial {i + 1} {list(candidates[i]['arch'])} stopped: {bad}; nothing was saved as finished; "
                f"lower retrain.lr, then delete {EXPERIMENT}/ and retrain/{where} (or use a new --run-dir)")
    errors = [res for res in results if res.error is not None]
    if errors:
        res = errors[0]
        where = f"trial {res.config['arch_index'] + 1}" if res.config else f"the trial in {res.path}"
        raise PipelineError(
            f"{len(errors)} retrain trial(s) failed after retries; {where}: {one_line(res.error, last_line=True)}; "
            "fix the cause and rerun the same command (finished trials are kept, others resume)")
    rows = {}
    for res in results:
        m = res.metrics or {}
        if not m.get("config"):
            continue
        i = int(m["config"]["arch_index"])
        c = candidates[i]
        epochs = int(m.get("epoch", 0))
        rows[i] = {
            "trial": i, "rank": c["rank"], "arch": list(c["arch"]), "epochs_run": epochs,
            "best_val_acc": float(m.get("best_val_acc", float("nan"))),
            "final_val_acc": float(m.get("val_acc", float("nan"))),
            "final_val_loss": float(m.get("val_loss", float("nan"))),
            "stopped_early": epochs < max_t,
            "flops": c["flops"], "params": c["params"], "bn_score": c["bn_score"],
            "test_acc": float("nan"), "winner": False,
            "train_time_s": float(m.get("time_total_s", 0.0)),
            "_checkpoint": res.checkpoint,
        }
    missing = sorted(set(range(len(candidates))) - set(rows))
    if missing:
        raise PipelineError(f"retrain trial(s) {[i + 1 for i in missing]} reported nothing; rerun the same command")
    return [rows[i] for i in sorted(rows)]


def _pick_winner(rows: list[dict], max_t: int) -> dict:
    # Validation accuracy at max_t among trials that ran all epochs; ties go to the
    # better-ranked (higher BN score) architecture, which comes first in top-N order.
    full = [row for row in rows if row["epochs_run"] >= max_t and row["_checkpoint"] is not None]
    if not full:
        raise PipelineError("no retrain trial ran all epochs; rerun the same command to resume them")
    winner = max(full, key=lambda row: (row["final_val_acc"], -row["trial"]))
    winner["winner"] = True
    return winner


def _load_checkpoint_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=True)


def _evaluate_test(cfg: Config, space: SearchSpace, arch: Sequence[int], state: dict, splits) -> dict:
    """Test accuracy of the winner. CPU trials on this machine: here, on the trial's thread
    count (a Ray task would start a fresh worker that imports torch and loads the data
    again, for a few seconds of work; BENCHMARKS.md §8). GPU trials or a cluster: a
    Ray task where a trial would run (its GPU, its CPUs, not the head node's)."""
    r = cfg.retrain
    if r.gpus_per_trial == 0 and not cluster_address(cfg):
        threads = torch.get_num_threads()
        try:
            return test_accuracy(cfg, space, arch, state, splits=splits)
        finally:
            torch.set_num_threads(threads)  # the driver's own, for whatever runs after
    import ray

    task = ray.remote(num_cpus=r.cpus_per_trial, num_gpus=r.gpus_per_trial, max_retries=2)(test_accuracy)
    return ray.get(task.remote(cfg, space, tuple(arch), state, space_ops(space)))


def test_accuracy(cfg: Config, space: SearchSpace, arch: Sequence[int], state: dict, ops: dict | None = None,
                  splits=None) -> dict:
    """The test split's accuracy and loss for these weights (also usable without Ray);
    ``splits``: the datasets, when the caller has them already."""
    register_ops(ops or {})
    r = cfg.retrain
    torch.set_num_threads(max(1, int(r.cpus_per_trial)))
    device = _device(r.gpus_per_trial)
    splits = splits if splits is not None else build_datasets(cfg.data, seed=cfg.seed)
    model = build_subnet(space, arch)
    model.load_state_dict(state)
    acc, loss = evaluate(model.to(device), make_loader(splits.test, r.batch_size, shuffle=False), device)
    return {"test_acc": acc, "test_loss": loss, "test_samples": len(splits.test)}


test_accuracy.__test__ = False  # not a pytest test, despite the name


def _write_history(run: RunDir, rows: list[dict], loaded: dict) -> None:
    """Every trial's per-epoch metrics, as its last checkpoint recorded them
    (``loaded``: states already read, by trial, so none is read twice)."""
    import pandas as pd

    hist = [{"trial": row["trial"], "arch": str(row["arch"]), **h}
            for row in rows if row.get("_checkpoint") is not None
            for h in (loaded.get(row["trial"]) or _load_checkpoint_state(row["_checkpoint"])).get("history", [])]
    run.write_parquet(HISTORY, pd.DataFrame(hist))


def _write_trials(run: RunDir, rows: list[dict]) -> None:
    import pandas as pd

    run.write_parquet(TRIALS, pd.DataFrame(rows))


def _export(run: RunDir, space: SearchSpace, winner: dict, state: dict, test: dict, progress: Progress) -> dict:
    from .export import export_model

    files = export_model(run, space, winner["arch"], state, rel=MODEL_DIR,
                         info={"val_acc": winner["final_val_acc"], "test_acc": test["test_acc"]})
    if files["program"] is None:
        progress(f"retrain: warning: no standalone program exported ({files['program_error']}); "
                 "weights.pt + arch.json still load with pipeline.export.load")
    return files


def _print_table(rows: list[dict], max_t: int, progress: Progress, scheduler: str = "ASHA") -> None:
    progress(f"retrain: {'#':>2} {'arch':<28} {'epochs':>6} {'best_val':>8} {'final_val':>9} "
             f"{'MFLOPs':>8} {'params':>9} {'bn':>7} {'test':>6}")
    for row in rows:
        arch = str(row["arch"])
        arch = arch if len(arch) <= 28 else arch[:25] + "..."
        epochs = f"{row['epochs_run']}/{max_t}" + ("*" if row["stopped_early"] else " ")
        test = f"{row['test_acc']:.4f}" if not math.isnan(row["test_acc"]) else "-"
        progress(f"retrain: {row['trial'] + 1:>2} {arch:<28} {epochs:>6} {row['best_val_acc']:>8.4f} "
                 f"{row['final_val_acc']:>9.4f} {row['flops'] / 1e6:>8.2f} {row['params']:>9.0f} "
                 f"{row['bn_score']:>7.3f} {test:>6}")
    if any(row["stopped_early"] for row in rows):
        progress(f"retrain: * stopped early by {scheduler}")
