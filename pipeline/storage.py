"""The run directory: where every pipeline stage reads and writes.

A run directory is a local path or any pyarrow filesystem URI (``s3://bucket/run``,
``gs://...``, ``file:///...``) -- the same ``storage_path`` Ray uses, so stage outputs
and Ray's own checkpoints sit side by side.

Two guarantees let a stage decide "finished -> skip, partial -> resume" from what it
finds on disk:

* every write is whole or absent: a crash mid-write never leaves a half file under the
  final name (local: temp file + fsync + rename; object stores: one PUT, which the
  store publishes atomically);
* a file that is nevertheless damaged (disk full, copied by hand, ...) is reported as
  ``CorruptFileError`` naming the file, instead of an obscure parser error.

``RunDir.lock()`` keeps two runs from writing the same directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import socket
import tempfile
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .util import LockHeld, flock

LOCK_NAME = ".lock"
# Remote locks cannot die with their process, so the holder refreshes the timestamp
# and a lock that has not been refreshed for a while is taken to be abandoned.
REMOTE_LOCK_HEARTBEAT_S = 30.0
REMOTE_LOCK_STALE_S = 300.0


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process umask (read once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()


class StorageError(RuntimeError):
    """A problem with the run directory, phrased for the user."""


class CorruptFileError(StorageError):
    """A file in the run directory exists but cannot be parsed (``path``: its name as
    the user wrote the run dir, ``reason``: what the parser said)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class RunLockedError(StorageError):
    """Another process is using the run directory."""


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "t": time.time(),
    }


class RunDir:
    """One run directory, local or remote, addressed by paths relative to its root."""

    def __init__(self, uri: str | os.PathLike):
        uri = os.fspath(uri)
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
            self.uri = uri
        else:
            # Absolute so that Ray workers started in other directories see the same place.
            root = os.path.abspath(os.path.expanduser(uri))
            self.fs = pafs.LocalFileSystem()
            self.uri = root
        self.root = root.rstrip("/") or "/"
        # file:// URIs land here too: real files, so rename and flock are available.
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def storage_path(self) -> str:
        """What to pass to ``ray.train.RunConfig(storage_path=...)``."""
        return self.root if self.is_local else self.uri

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def path(self, *parts: str) -> str:
        """Path inside ``self.fs`` (for local run dirs, an ordinary absolute path)."""
        return posixpath.join(self.root, *[str(p).strip("/") for p in parts if str(p)])

    def _name(self, rel: str) -> str:
        """How a file is named in messages: the way the user wrote the run dir."""
        return f"{self.uri.rstrip('/')}/{rel}"

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def prepare(self) -> list[str]:
        """Check that the run directory can be used, creating it if missing.

        Returns the local folders this call created (outermost first) so that
        ``discard_if_bare`` can take them away again if the run fails before it writes
        anything of its own. A path that is a file, lies below a file, cannot be created
        (permissions, /proc, a read-only filesystem) or cannot be written raises
        ``StorageError`` with one line; nothing is left behind then. Object stores are
        not checked here (their first write reports what is wrong).
        """
        if not self.is_local:
            return []
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise StorageError(f"run dir {self.uri} is an existing file, not a directory; "
                               "pass a new or existing directory to --run-dir")
        missing = []
        top = root
        while not top.exists():
            missing.append(top)
            top = top.parent
        if not top.is_dir():
            raise StorageError(f"run dir {self.uri} cannot be made: {top} is a file, not a directory; "
                               "pass a path below a directory to --run-dir")
        created = [str(p) for p in reversed(missing)]
        try:
            for p in created:
                os.mkdir(p)
            # Permissions say too little (root ignores them; /proc and read-only mounts refuse
            # anyway): try what the run will do, write a file.
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".bnnas-write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self._remove_dirs(created)
            what = "cannot be created" if missing else "is not writable"
            raise StorageError(f"run dir {self.uri} {what} ({e.strerror or type(e).__name__}: "
                               f"{e.filename or self.root}); pass a writable location to --run-dir") from None
        return created

    BARE = (LOCK_NAME, "config.yaml")  # what the CLI writes before any stage does

    def discard_if_bare(self, created: list[str]) -> bool:
        """After a failed run in a new run dir: if it holds nothing but the lock and the
        config (no stage wrote anything), remove them and the ``created`` folders.
        Returns whether it did; a run dir holding anything else is left as it is."""
        if not self.is_local:
            names = self.listdir()
            if not set(names) <= set(self.BARE):
                return False
            for name in names:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(self.path(name))
            return True
        files = [p for p in Path(self.root).rglob("*") if not p.is_dir()] if os.path.isdir(self.root) else []
        if any(p.parent != Path(self.root) or p.name not in self.BARE for p in files):
            return False
        for p in files:
            with contextlib.suppress(OSError):
                p.unlink()
        for d in sorted((p for p in Path(self.root).rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only empty folders a stage made and left empty
        self._remove_dirs(created)
        return True

    @staticmethod
    def _remove_dirs(created: list[str]) -> None:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(p)

    def listdir(self, rel: str = "", *, dirs_only: bool = False) -> list[str]:
        """Names directly under ``rel`` (only folders with ``dirs_only``); empty if it does not exist."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel)
                      if not dirs_only or i.type == pafs.FileType.Directory)

    # -- bytes ------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: readers see the old file or the new one."""
        dest = self.path(rel)
        if not self.is_local:
            # Object stores publish an object only when its upload completes.
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            with self.fs.open_output_stream(dest) as f:
                f.write(data)
            return
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _NEW_FILE_MODE)  # mkstemp's 0600 would hide reports from others
                f.write(data)
                f.flush()
                # Without fsync a power loss after the rename can leave an empty file.
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # Persist the rename itself; best effort (not every filesystem allows it).
        with contextlib.suppress(OSError):
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    @contextlib.contextmanager
    def local_file(self, rel: str) -> Iterator[str]:
        """Yield a local path to write (``savefig``, ``torch.export.save``, ...).

        The file is uploaded atomically to ``rel`` when the block exits normally; if
        the block raises, nothing is written. The temp name keeps ``rel``'s basename so
        tools that pick a format from the extension do the right thing.
        """
        with tempfile.TemporaryDirectory(prefix="rundir-") as tmp:
            local = os.path.join(tmp, posixpath.basename(rel))
            yield local
            if not os.path.exists(local):
                raise StorageError(f"nothing was written to the local file for {self._name(rel)}")
            self.write_bytes(rel, Path(local).read_bytes())

    # -- text / json --------------------------------------------------------------------

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> None:
        # Serialise before touching storage so an unserialisable object writes nothing.
        self.write_text(rel, json.dumps(obj, indent=2) + "\n")

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(rel, e) from e

    def _corrupt(self, rel: str, err: BaseException) -> CorruptFileError:
        reason = f"{type(err).__name__}: {err}"
        return CorruptFileError(
            f"{self._name(rel)} is truncated or corrupt ({reason}); delete it to redo the step that writes it",
            path=self._name(rel), reason=reason)

    # -- parquet ------------------------------------------------------------------------

    def write_parquet(self, rel: str, df) -> None:
        buf = pa.BufferOutputStream()
        # Page checksums turn a flipped bit into an error instead of a wrong number.
        pq.write_table(pa.Table.from_pandas(df), buf, write_page_checksum=True)
        self.write_bytes(rel, buf.getvalue().to_pybytes())

    def read_parquet(self, rel: str):
        data = self.read_bytes(rel)
        try:
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
            return table.to_pandas()
        except (pa.ArrowException, OSError, ValueError) as e:  # damaged footer/metadata
            raise self._corrupt(rel, e) from e

    # -- torch --------------------------------------------------------------------------

    def write_torch(self, rel: str, obj: Any) -> None:
        import torch  # lazy: importing torch costs seconds the lock/json paths need not pay

        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_torch(self, rel: str, map_location: Any = "cpu", weights_only: bool = False) -> Any:
        """Load a ``torch.save`` file.

        ``weights_only`` defaults to False because checkpoints here carry optimizer and
        sampler state that the restricted unpickler rejects; the run dir holds files
        this pipeline wrote, so treat it as trusted as the code itself.
        """
        import torch

        data = self.read_bytes(rel)
        # torch.save writes a zip archive with CRCs; checking it first tells damage apart
        # from torch.load's other RuntimeErrors (wrong device, missing classes, ...).
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC in member {bad}")
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise self._corrupt(rel, e) from e
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
        except RuntimeError as e:
            # Damage in zip header fields that Python's zipfile tolerates but torch's reader does not.
            if "PytorchStreamReader" in str(e):
                raise self._corrupt(rel, e) from e
            raise

    # -- locking ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory exclusively; raise ``RunLockedError`` at once if taken.

        Local (including NFS, where Linux maps flock onto NFS locks): ``flock`` on
        ``RUN/.lock``. The kernel drops it when the holder dies, even by SIGKILL, so a
        crashed run never blocks its own rerun.

        Remote object stores have no locks. There the lock is a ``.lock`` object with
        host, pid and a heartbeat timestamp: best effort only -- two processes starting
        within the same moment can both win, and a lock whose heartbeat stopped more
        than ``REMOTE_LOCK_STALE_S`` ago is taken over.
        """
        if self.is_local:
            with self._flock():
                yield
        else:
            with self._remote_lock():
                yield

    def _locked(self, holder: dict | None, lock_path: str) -> RunLockedError:
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}"
            if holder
            else "another process"
        )
        return RunLockedError(
            f"run dir {self.uri} is in use by {who} (lock {lock_path}); "
            "wait for it to finish or stop it, or use another run dir"
        )

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        lock_path = self.path(LOCK_NAME)
        held = contextlib.ExitStack()
        try:
            fd = held.enter_context(flock(lock_path, wait=False))
        except LockHeld as e:
            raise self._locked(_parse_holder(e.holder), lock_path) from None
        with held:
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
            yield

    @contextlib.contextmanager
    def _remote_lock(self) -> Iterator[None]:
        lock_path = self.path(LOCK_NAME)
        me = _holder_info()
        holder = self._read_remote_holder()
        if holder is not None and time.time() - holder.get("t", 0) < REMOTE_LOCK_STALE_S:
            raise self._locked(holder, lock_path)
        me["token"] = os.urandom(8).hex()
        self.write_json(LOCK_NAME, me)
        # Narrow (not close) the race with a process that wrote at the same moment.
        if (self._read_remote_holder() or {}).get("token") != me["token"]:
            raise self._locked(self._read_remote_holder(), lock_path)

        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(REMOTE_LOCK_HEARTBEAT_S):
                with contextlib.suppress(Exception):
                    self.write_json(LOCK_NAME, {**me, "t": time.time()})

        beat = threading.Thread(target=heartbeat, name="rundir-lock-heartbeat", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(Exception):
                if (self._read_remote_holder() or {}).get("token") == me["token"]:
                    self.fs.delete_file(lock_path)

    def _read_remote_holder(self) -> dict | None:
        try:
            return json.loads(self.read_bytes(LOCK_NAME))
        except FileNotFoundError:
            return None
        except ValueError:  # half-visible or garbage lock object: treat as held, unknown
            return {"t": time.time()}


def _parse_holder(data: bytes) -> dict | None:
    try:
        return json.loads(data or b"null")
    except ValueError:  # the holder has not written its details yet
        return None


def sha256_tree(local_dir: str | os.PathLike, ignore: tuple[str, ...] = (LOCK_NAME,)) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``local_dir``.

    For tests that assert a rerun changed nothing. Lock files are ignored by default:
    taking the lock rewrites the holder's pid even when a stage then skips.
    """
    root = Path(local_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ignore:
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
