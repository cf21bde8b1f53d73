"""Leaf helpers with no project imports, so that every module can use them (data.py and
storage.py included) without pulling in torch, Ray or the search space code."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional


def one_line(err: object, limit: int = 300, *, last_line: bool = False) -> str:
    """An error as one line of at most ``limit`` characters, to embed in a message.

    Whitespace (newlines included) is folded. ``last_line`` keeps only the last
    non-empty line: a Ray task or Tune trial error carries the remote traceback in its
    message, and its last line names the exception that was raised. An empty message
    is replaced by the exception's type name.
    """
    if err is None:
        return "unknown error"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if last_line:
        lines = lines[-1:]
    text = " ".join(" ".join(lines).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class LockHeld(OSError):
    """``flock(wait=False)`` found the lock taken; ``holder`` is what the holder wrote into the file."""

    def __init__(self, path: str, holder: bytes):
        super().__init__(f"{path} is locked by another process")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def flock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[Optional[int]]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    The kernel drops the lock when the holder dies, even by SIGKILL, so a crashed
    process never blocks the next one. Yields the lock file's descriptor (a holder may
    write who it is into it). ``wait=False`` raises ``LockHeld`` at once instead of
    waiting. The file is never deleted: unlinking it would let a third process lock a
    fresh inode while a second still holds the old one. Where there is no fcntl
    (Windows) nothing is locked and None is yielded.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield None
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, os.pread(fd, 4096, 0)) from None
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
