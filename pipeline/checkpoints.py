"""The checkpoint to resume from: the newest one that loads (stage 1 and stage 3).

Ray hands a restarted Train worker group, or a retried or restored Tune trial, the
checkpoint it registered last. When that file is damaged (a full disk, a copy cut
short, a bit flip) loading it fails the same way on every attempt, so Ray's restarts
only loop and then end with advice to rerun, which fails again. Here the damaged
checkpoint is named in one line and the next intact one is used instead: Ray keeps
more than one (``supernet.checkpoints_to_keep``, Tune's ``num_to_keep``), and every
stage resumes bit-for-bit from any epoch's checkpoint. With none intact the stage
starts from scratch.

A checkpoint is a folder ``<folder>/checkpoint_*`` in the run directory holding one
torch file; "intact" means ``RunDir.read_torch`` reads it (zip CRCs checked first).
"""

from __future__ import annotations

import posixpath
from typing import Any, Callable, Optional

from .storage import RunDir, StorageError
from .util import one_line

PREFIX = "checkpoint_"


def checkpoint_names(run: RunDir, folder: str) -> list[str]:
    """The checkpoint folders under ``folder``, newest first: Ray Train names them by
    time (``checkpoint_2026-12-03_07-50-01.123456``), Tune by a zero-padded count."""
    return sorted((n for n in run.listdir(folder, dirs_only=True) if n.startswith(PREFIX)), reverse=True)


def load_intact(run: RunDir, folder: str, filename: str | tuple[str, ...], *, first: Optional[str] = None,
                key: Optional[Callable[[Any], Any]] = None,
                say: Callable[[str], None] = print) -> tuple[Optional[str], Any]:
    """``(name, state)`` of the checkpoint to resume from, or ``(None, None)``.

    ``first`` (the one Ray registered last, a folder name or path) is tried first and
    used if intact. Otherwise, or without ``first``, the others are tried newest first;
    with ``key`` every intact one is read and the one with the largest ``key(state)``
    wins (Tune may reuse a folder number after a restore, so a name says less than the
    epoch inside). Each damaged checkpoint is reported through ``say`` in one line.
    A tuple of file names (stage 1's seeds, one file each) counts a checkpoint as intact
    only when all of them load; its state is then the list of their states.
    """
    names = checkpoint_names(run, folder)
    if first is not None:
        first = posixpath.basename(first.rstrip("/"))
        state = _read(run, folder, first, filename, say)
        if state is not None:
            return first, state
        names = [n for n in names if n != first]
    best: tuple[Optional[str], Any] = (None, None)
    for name in names:
        state = _read(run, folder, name, filename, say)
        if state is None:
            continue
        if key is None:
            return name, state
        if best[0] is None or key(state) > key(best[1]):
            best = (name, state)
    return best


def _read(run: RunDir, folder: str, name: str, filename: str | tuple[str, ...], say: Callable[[str], None]) -> Any:
    if isinstance(filename, tuple):
        states = []
        for f in filename:
            states.append(_read(run, folder, name, f, say))
            if states[-1] is None:
                return None
        return states
    rel = f"{folder}/{name}/{filename}"
    try:
        return run.read_torch(rel)
    except FileNotFoundError:
        say(f"checkpoint {run.uri.rstrip('/')}/{folder}/{name} has no {filename} (cut short?); skipping it")
    except StorageError as e:  # CorruptFileError: truncated, bad CRC
        say(f"checkpoint {run.uri.rstrip('/')}/{rel} is damaged ({one_line(getattr(e, 'reason', '') or e, 160)}); "
            "skipping it")
    except Exception as e:  # noqa: BLE001 -- anything torch.load raises on a damaged pickle
        say(f"checkpoint {run.uri.rstrip('/')}/{rel} does not load ({type(e).__name__}: {one_line(e, 160)}); "
            "skipping it")
    return None
