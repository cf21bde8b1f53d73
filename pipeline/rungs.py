"""Stage 3's Tune schedulers: which trials stop at which rung, and who gets freed CPUs.

``retrain.scheduler`` picks one (docs/reliability.md says what each promises):

* ``asha`` (the default): Ray Tune's ASHA, asynchronous. A trial is compared at a rung
  with whatever the others have reported there so far, so which trials stop depends on
  the order in which results arrive. Wrapped in Ray Tune's ``ResourceChangingScheduler``:
  when ASHA stops a trial (or CPUs are idle), the trials still running get its CPUs at
  their next result, and the trial sets torch's thread count to its new share.
* ``sync``: synchronous successive halving (``SyncHalving``). A trial that reaches a rung
  waits (paused) until every trial still in the race has reached it; then the top
  ceil(n / reduction_factor) by validation accuracy at that rung go on, ties to the
  better-ranked architecture, and the rest stop. The decision is a function of the
  trials' validation curves alone, which are the same for the same seed, so the same
  trials stop at the same rungs whatever the arrival order, and after a kill (the
  scheduler rebuilds its state from the curves the trials report). Trials keep the
  CPUs they started with and torch's thread count stays fixed, because a change of
  thread count changes CPU float results.

Rungs are at ``grace_period * reduction_factor**k`` epochs below ``epochs`` (ASHA's).
Imported only where Tune runs (``pipeline.retrain`` must import without Ray).
"""

from __future__ import annotations

import math
from typing import Optional

from ray.tune import PlacementGroupFactory, Stopper
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.resource_changing_scheduler import DistributeResources, ResourceChangingScheduler

from .config import RetrainConfig


def rung_epochs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    out, m = [], grace_period
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


def halving(curves: dict[int, list[float]], n: int, rungs: list[int], reduction_factor: int,
            errored: frozenset[int] = frozenset()) -> tuple[list[int], dict[int, int]]:
    """Synchronous successive halving over validation curves (trial -> val_acc per epoch).

    Returns the rungs decided so far and, for every trial stopped, the rung it stopped
    at. A rung is decided once every trial still in the race (not stopped before, not
    failed for good) has a value there. NaN ranks last.
    """
    alive, stopped, decided = list(range(n)), {}, []
    for m in rungs:
        members = [i for i in alive if i not in errored]
        if not members or any(len(curves.get(i, ())) < m for i in members):
            break
        ranked = sorted(members, key=lambda i: (-_score(curves[i][m - 1]), i))
        keep = max(1, math.ceil(len(ranked) / reduction_factor))
        stopped.update({i: m for i in ranked[keep:]})
        alive = ranked[:keep]
        decided.append(m)
    return decided, stopped


def _score(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)


def _index(trial: Trial) -> int:
    return int(trial.config["arch_index"])


class SyncHalving(FIFOScheduler):
    """Synchronous successive halving whose state is the trials' validation curves.

    Every result carries the trial's whole curve (``val_curve``), so a restored
    experiment (whose scheduler starts empty) learns it again from each trial's last
    result and from the first result of each resumed trial, which replays its latest
    checkpoint's epoch (``pipeline.retrain.retrain_trial``).
    """

    def __init__(self, n_trials: int, max_t: int, grace_period: int, reduction_factor: int):
        super().__init__()
        self.n, self.max_t, self.rf = n_trials, max_t, reduction_factor
        self.rungs = rung_epochs(max_t, grace_period, reduction_factor)
        self.curves: dict[int, list[float]] = {}
        self.errored: set[int] = set()
        self._metric, self._mode = "val_acc", "max"

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        return True  # metric and mode are fixed: validation accuracy, higher is better

    def _learn(self, trial: Trial, result: Optional[dict]) -> None:
        curve = (result or {}).get("val_curve")
        if curve is not None and len(curve) >= len(self.curves.get(_index(trial), ())):
            self.curves[_index(trial)] = [float(v) for v in curve]

    def _plan(self) -> tuple[list[int], dict[int, int]]:
        return halving(self.curves, self.n, self.rungs, self.rf, frozenset(self.errored))

    def _may_run(self, i: int) -> bool:
        """Not waiting at an undecided rung, not stopped."""
        decided, stopped = self._plan()
        epoch = len(self.curves.get(i, ()))
        return i not in stopped and (epoch not in self.rungs or epoch in decided)

    def _stop_losers(self, tune_controller, current: Optional[Trial]) -> None:
        _, stopped = self._plan()
        for t in tune_controller.get_trials():
            if t is not current and _index(t) in stopped and t.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(t)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._learn(trial, trial.last_result)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._learn(trial, result)
        if result.get("nonfinite"):
            return TrialScheduler.STOP
        epoch, i = int(result.get("epoch", 0)), _index(trial)
        decided, stopped = self._plan()
        self._stop_losers(tune_controller, trial)
        if epoch not in self.rungs:
            return TrialScheduler.CONTINUE
        if epoch not in decided:
            return TrialScheduler.PAUSE  # until the rung's last trial arrives
        return TrialScheduler.STOP if stopped.get(i) == epoch else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._learn(trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.errored.add(_index(trial))  # out of the race: the rung does not wait for it

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        self._stop_losers(tune_controller, None)
        trials = sorted(tune_controller.get_trials(), key=_index)
        for status in (Trial.PENDING, Trial.PAUSED):
            for t in trials:
                if t.status == status and self._may_run(_index(t)):
                    return t
        return None

    def debug_string(self) -> str:
        decided, stopped = self._plan()
        return f"SyncHalving: rungs {self.rungs}, decided {decided}, stopped {stopped}"


class ToSurvivors(DistributeResources):
    """Free CPUs to the trials still running, in units of ``cpus_per_trial`` and never
    more than the largest node holds (a bigger single bundle could never be placed)."""

    def __init__(self, cpus_per_trial: float, largest_node_cpus: float, max_t: int):
        self.times = int(largest_node_cpus // cpus_per_trial) - 1
        super().__init__(add_bundles=False, increase_by={"CPU": cpus_per_trial}, increase_by_times=max(self.times, 1))
        self.max_t = max_t

    def __call__(self, tune_controller, trial, result, scheduler):
        # Not on a trial's last epoch (it ends anyway) or a failed one.
        if self.times < 1 or result.get("nonfinite") or int(result.get("epoch", 0)) >= self.max_t:
            return None
        return super().__call__(tune_controller, trial, result, scheduler)


class SurvivorScheduler(ResourceChangingScheduler):
    """ResourceChangingScheduler with its base resources fixed from the config.

    The stock one takes them from the first trial added, which after a restore may be
    one that had been given more CPUs: every other trial would then be refused."""

    def __init__(self, base_scheduler: TrialScheduler, allocation: ToSurvivors, base: PlacementGroupFactory):
        super().__init__(base_scheduler, allocation)
        self._base_trial_resources = base

    def on_trial_add(self, tune_controller, trial: Trial, **kwargs):
        return self._base_scheduler.on_trial_add(tune_controller, trial, **kwargs)


class StopOnNonFinite(Stopper):
    """A trial that reports a non-finite loss stops the whole experiment (stage 3 fails)."""

    def __init__(self):
        self.seen = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen = self.seen or bool(result.get("nonfinite"))
        return bool(result.get("nonfinite"))

    def stop_all(self) -> bool:
        return self.seen


def make_scheduler(r: RetrainConfig, n_trials: int, largest_node_cpus: float) -> dict:
    """The TuneConfig arguments for ``retrain.scheduler``."""
    if r.scheduler == "sync":
        # Tune would start trials beyond max_concurrent_trials only once paused ones end,
        # and paused ones wait for them: no concurrency limit here (config refuses one).
        return {"scheduler": SyncHalving(n_trials, r.epochs, r.grace_period, r.reduction_factor),
                "max_concurrent_trials": None, "reuse_actors": True}
    asha = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=r.epochs,
                         grace_period=r.grace_period, reduction_factor=r.reduction_factor)
    base = PlacementGroupFactory([{"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if r.gpus_per_trial else {})}])
    return {"scheduler": SurvivorScheduler(asha, ToSurvivors(r.cpus_per_trial, largest_node_cpus, r.epochs), base),
            # ResourceChangingScheduler restarts a trial to resize it; it refuses reused actors.
            "max_concurrent_trials": r.max_concurrent or None, "reuse_actors": False}
