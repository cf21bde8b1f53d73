"""Scoring on Ray actors: a pool of ``ScorerActor`` fed batches of architectures.

The indicator's payload (table, or supernet weights and the data batches) is put in the
object store once and every actor receives it at construction. Results are
reassembled by batch index, so the outcome depends only on the seed, never on the
number of actors, their timing, or an actor dying and its batch being rescored.
Ray is imported only when a pool is built, so this module imports without it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..common import PipelineError
from ..util import one_line
from .indicators import Indicator


class ScorerActor:
    """Holds one indicator instance; scores batches of architectures (a Ray actor:
    ``ScorerPool`` wraps it with ``ray.remote``, so this module imports without Ray)."""

    def __init__(self, indicator_cls: type[Indicator], payload: dict, num_cpus: float):
        import ray

        # payload was a top-level ObjectRef argument, so Ray hands it over resolved.
        # One torch thread per reserved CPU: more would fight the other actors for cores.
        torch.set_num_threads(max(1, int(num_cpus)))
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.indicator = indicator_cls(payload, device)

    def ready(self) -> int:
        return os.getpid()

    def score(self, archs: np.ndarray) -> tuple[np.ndarray, int, float, float]:
        start = time.time()
        scores = np.asarray(self.indicator.score(archs), dtype=np.float64)
        return scores, os.getpid(), start, time.time()


class DriverScorer:
    """The pool's interface, scoring in this process: for additive indicators on searches
    small enough that starting actors (seconds) costs more than all the scoring (a table
    lookup: about 10 million architectures a second, BENCHMARKS.md §2)."""

    replacements = 0
    n_scored_by_actors = 0

    def __init__(self, indicator_cls: type[Indicator], payload: dict):
        self.indicator = indicator_cls(payload, "cpu")
        self.n_scored = 0
        self.busy_s = 0.0

    def score(self, archs: np.ndarray, batch_size: int = 0) -> np.ndarray:
        start = time.perf_counter()
        scores = np.asarray(self.indicator.score(np.ascontiguousarray(archs, dtype=np.int64)), dtype=np.float64)
        self.busy_s += time.perf_counter() - start
        self.n_scored += len(scores)
        return scores

    def shutdown(self) -> None:
        pass


@dataclass
class SearchHooks:
    """Test hooks: ``on_submit(pool, slot, n_submitted)`` after each batch is sent to an actor;
    ``on_generation(generation)`` after each generation is scored and saved."""
    on_submit: Optional[Callable[["ScorerPool", int, int], None]] = None
    on_generation: Optional[Callable[[int], None]] = None


class ScorerPool:
    """``num_actors`` scorer actors fed through ``ray.wait``.

    Each actor keeps up to two batches queued (the next one is already there while the
    driver handles a result). Results are stored by batch index, so the order in which
    they come back does not matter. An actor that dies (RayActorError: killed, OOM,
    node lost) is replaced by a fresh one and its batches go back to the queue; scores
    are deterministic, so the result is the same as without the failure.
    """

    def __init__(self, indicator_cls: type[Indicator], payload: dict, *, num_actors: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, hooks: Optional[SearchHooks] = None,
                 max_replacements: Optional[int] = None):
        import ray

        self.indicator_cls, self.num_cpus, self.num_gpus = indicator_cls, num_cpus, num_gpus
        self.actor_cls = ray.remote(ScorerActor)
        self.hooks = hooks or SearchHooks()
        self.payload_ref = ray.put(payload)  # once: every actor reads this one copy
        self.actors = [self._start() for _ in range(num_actors)]
        self.generation = [0] * num_actors  # bumped on replacement: stale failures are ignored
        self.replacements = 0
        self.max_replacements = 3 * num_actors + 3 if max_replacements is None else max_replacements
        self.log: list[dict] = []  # per batch: slot, batch, pid, start, end, n
        self.n_scored = 0
        self.busy_s = 0.0  # wall time spent inside score()
        self._submitted = 0
        # Fail here, with the constructor's error, rather than on the first batch.
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise PipelineError(f"a scorer actor failed to start: {one_line(e)}") from e

    def _start(self):
        return self.actor_cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
            self.indicator_cls, self.payload_ref, self.num_cpus)

    def _replace(self, slot: int, err: BaseException) -> None:
        import ray

        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise PipelineError(f"scorer actors died {self.replacements} times; giving up "
                                f"(last: {one_line(err)})") from err
        ray.kill(self.actors[slot], no_restart=True)  # harmless if it is already gone
        self.actors[slot] = self._start()
        self.generation[slot] += 1

    def score(self, archs: np.ndarray, batch_size: int) -> np.ndarray:
        import ray

        archs = np.ascontiguousarray(archs, dtype=np.int64)
        if len(archs) == 0:
            return np.zeros(0)
        # Smaller batches when there are few candidates, so that every actor gets work.
        bs = max(1, min(batch_size, math.ceil(len(archs) / len(self.actors))))
        batches = [archs[i:i + bs] for i in range(0, len(archs), bs)]
        queue = list(range(len(batches)))[::-1]  # pop() takes the lowest index first
        results: list[Optional[np.ndarray]] = [None] * len(batches)
        inflight: dict = {}  # ref -> (slot, actor generation, batch index)
        load = [0] * len(self.actors)
        start = time.perf_counter()
        while queue or inflight:
            for slot in sorted(range(len(self.actors)), key=lambda s: load[s]):
                while queue and load[slot] < 2:
                    b = queue.pop()
                    ref = self.actors[slot].score.remote(batches[b])
                    inflight[ref] = (slot, self.generation[slot], b)
                    load[slot] += 1
                    self._submitted += 1
                    if self.hooks.on_submit:
                        self.hooks.on_submit(self, slot, self._submitted)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, gen, b = inflight.pop(ref)
                if gen == self.generation[slot]:
                    load[slot] -= 1
                try:
                    scores, pid, t0, t1 = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    queue.append(b)  # rescored on whichever actor is free next
                    if gen == self.generation[slot]:
                        self._replace(slot, e)
                        load[slot] = 0
                        # Its other in-flight batches fail too and are requeued as they arrive.
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise PipelineError(f"indicator {self.indicator_cls.name!r} failed on an actor: "
                                        f"{one_line(e)}") from e
                results[b] = scores
                self.log.append({"slot": slot, "batch": b, "pid": pid, "start": t0, "end": t1, "n": len(scores)})
        self.busy_s += time.perf_counter() - start
        self.n_scored += len(archs)
        return np.concatenate(results)

    @property
    def n_scored_by_actors(self) -> int:
        return self.n_scored

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

