"""Progress inside long epochs: a rate-limited line per worker event, for the driver's console.

A worker calls ``Ticker.due()`` once per step (a clock read); at most every
``progress_s`` seconds it says yes, and the worker sends its numbers to the driver, which
prints one line through the stage's ``progress`` (a file or a TTY alike: no cursor tricks,
so CI logs and ``nohup`` files read the same). tqdm formats the meter: percentage,
step/steps, elapsed<remaining and rate, as users know it from every other tool.
"""

from __future__ import annotations

import time


class Ticker:
    """True from ``due()`` at most every ``every`` seconds (0: every call), first after
    ``every`` seconds: an epoch shorter than that prints no line of its own."""

    def __init__(self, every: float):
        self.every = float(every)
        self.next = time.perf_counter() + self.every

    def due(self) -> bool:
        now = time.perf_counter()
        if now < self.next:
            return False
        self.next = now + self.every
        return True


def meter(done: int, total: int, elapsed: float) -> str:
    """``' 28% 120/429 [00:12<00:30, 10.00 step/s]'`` (tqdm's meter, no bar)."""
    from tqdm import tqdm

    return tqdm.format_meter(done, total, elapsed, unit=" step",
                             bar_format="{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")


def eta(seconds: float) -> str:
    """A remaining time as tqdm writes it (``01:05``, ``1:02:03``)."""
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


_STOP = "\0bnnas-relay-stop"  # the pump's last event; no worker sends a string like it


class Relay:
    """Events from Ray workers to the driver's ``progress``, as they happen.

    Train V2 returns metrics only when ``fit()`` ends, Tune reports only per epoch, and
    worker stdout reaches the driver only prefixed by Ray; a Ray queue (a tiny 0-CPU
    actor) drained by a driver thread gives the caller's ``progress`` each line as it
    comes. Workers send with ``send(queue, event)``; ``handle`` turns an event into lines
    (a plain string is printed as it is).
    """

    def __init__(self, progress):
        import threading

        from ray.util.queue import Queue

        self.progress = progress
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._pump, name="bnnas-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # Queued after every worker's events (the stage has returned): the pump prints
        # them all, then stops. Waiting in one long get instead of polling every 0.5 s
        # keeps the queue actor and this thread idle inside long epochs.
        try:
            self.queue.put(_STOP, timeout=5)
        except Exception:  # the queue actor went away; the pump has stopped or will
            pass
        self._thread.join(timeout=10)
        try:
            self.queue.shutdown()
        except Exception:
            pass

    def _pump(self) -> None:
        while True:
            try:
                event = self.queue.get()
            except Exception:  # the queue actor went away; the stage's results do not depend on it
                return
            if isinstance(event, str) and event == _STOP:
                return
            self.handle(event)

    def handle(self, event) -> None:
        self.progress(event)


def send(queue, event) -> None:
    """Best effort: a lost progress line must never fail training."""
    if queue is None:
        return
    try:
        queue.put(event, timeout=5)
    except Exception:
        pass
