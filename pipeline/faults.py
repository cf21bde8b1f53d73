"""Test-only: inject a worker crash into stage 1, to test Ray Train's restarts.

``BNNAS_FAULT_STEP=<epoch>:<step>:<rank>`` makes that rank exit (``os._exit(1)``) at the
start of that optimizer step, once per run dir: a marker file
``supernet/.fault_<epoch>_<step>_<rank>`` keeps the restarted worker from dying again.

Nothing here runs unless the variable is set. The driver reads it once
(``FaultSpec.from_env``); the Ray train loop turns it into the trainer's ``on_step``
callback on the one rank it names (``injector``); every other rank, and every run
without the variable, gets no callback at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .storage import RunDir

FAULT_ENV = "BNNAS_FAULT_STEP"


@dataclass(frozen=True)
class FaultSpec:
    epoch: int
    step: int
    rank: int

    @staticmethod
    def parse(text: str) -> Optional["FaultSpec"]:
        if not text:
            return None
        try:
            e, s, r = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected <epoch>:<step>:<rank>, e.g. 1:2:1") from None
        return FaultSpec(e, s, r)

    @staticmethod
    def from_env() -> Optional["FaultSpec"]:
        return FaultSpec.parse(os.environ.get(FAULT_ENV, ""))

    def injector(self, run_uri: str, rank: int, train_dir: str, stage_dir: str) -> Optional[Callable[[int, int], None]]:
        """The ``on_step(epoch, step)`` callback for ``rank``; None on every other rank."""
        if rank != self.rank:
            return None

        def on_step(epoch: int, step: int) -> None:
            if (epoch, step) != (self.epoch, self.step):
                return
            run = RunDir(run_uri)
            marker = f"{stage_dir}/.fault_{epoch}_{step}_{rank}"
            if run.exists(marker):
                return  # already died here once in this run dir: the restart must get through
            run.write_text(marker, "test-only fault injected here\n")
            if epoch > 0:
                _wait_until_registered(run, train_dir, epoch - 1)
            os._exit(1)

        return on_step


def _wait_until_registered(run: RunDir, train_dir: str, epoch: int, timeout_s: float = 120.0) -> None:
    """Wait until Ray has registered the checkpoint of ``epoch``.

    Train V2 registers a reported checkpoint only when its controller next polls the
    workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: 2 s by default, 0.5 s in a local
    run); a worker that dies sooner loses that checkpoint and the restart resumes one
    epoch earlier. Waiting makes the injected fault land at a known point: after epoch
    ``epoch`` is safe.
    """
    from ray.train import Result

    path = f"{run.storage_path.rstrip('/')}/{train_dir}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = Result.from_path(path)
            if result.checkpoint is not None and (result.metrics or {}).get("epoch") == epoch:
                return
        except Exception:  # the snapshot is rewritten in place; a torn read just retries
            pass
        time.sleep(0.2)
