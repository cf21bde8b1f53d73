"""Run directory storage: round trips, atomic writes, corruption reports, locking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import storage
from pipeline.storage import CorruptFileError, RunDir, RunLockedError, StorageError, sha256_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "file_uri", "mock_remote"])
def run(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"))
    if request.param == "file_uri":
        return RunDir((tmp_path / "run").as_uri())
    # pyarrow's in-memory filesystem exercises the object-store code path.
    return RunDir("mock:///bucket/run")


def _df():
    return pd.DataFrame({"arch": ["0-1-2", "3-2-1"], "score": [0.5, 0.25], "flops": [1, 2]})


# -- construction ---------------------------------------------------------------------


def test_local_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rd = RunDir("runs/a")
    assert rd.root == str(tmp_path / "runs" / "a")
    assert rd.storage_path == rd.root
    assert rd.path("stage1", "x.json") == str(tmp_path / "runs" / "a" / "stage1" / "x.json")


def test_file_uri_is_local_with_plain_storage_path(tmp_path):
    rd = RunDir((tmp_path / "r").as_uri())
    assert rd.is_local
    assert rd.root == str(tmp_path / "r")
    assert rd.storage_path == str(tmp_path / "r")


def test_remote_uri_keeps_uri_as_storage_path():
    rd = RunDir("mock:///bucket/run")
    assert not rd.is_local
    assert rd.storage_path == "mock:///bucket/run"
    assert rd.path("a", "b.json").endswith("bucket/run/a/b.json")


# -- round trips ----------------------------------------------------------------------


def test_round_trips(run):
    assert not run.exists("s1/meta.json")
    obj = {"epoch": 3, "arch": [0, 1, 2], "name": "spos", "nested": {"x": None}}
    run.write_json("s1/meta.json", obj)
    run.write_text("notes.txt", "héllo\nworld")
    run.write_bytes("blob.bin", b"\x00\xffabc")
    run.write_parquet("s2/scores.parquet", _df())
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 7, "rng": torch.get_rng_state()}
    run.write_torch("s1/ckpt.pt", state)

    assert run.read_json("s1/meta.json") == obj
    assert run.read_text("notes.txt") == "héllo\nworld"
    assert run.read_bytes("blob.bin") == b"\x00\xffabc"
    pd.testing.assert_frame_equal(run.read_parquet("s2/scores.parquet"), _df())
    back = run.read_torch("s1/ckpt.pt")
    assert torch.equal(back["w"], state["w"]) and back["epoch"] == 7
    assert torch.equal(back["rng"], state["rng"])

    assert run.exists("s1/meta.json") and run.exists("s1")
    assert run.listdir() == ["blob.bin", "notes.txt", "s1", "s2"]
    assert run.listdir("s1") == ["ckpt.pt", "meta.json"]
    assert run.listdir("missing") == []


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Reports and results are for people: readable as any file this process creates."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    RunDir(str(tmp_path)).write_text("report/summary.md", "x")
    assert os.stat(tmp_path / "report" / "summary.md").st_mode & 0o777 == 0o666 & ~mask


def test_overwrite_replaces_content(run):
    run.write_json("a.json", {"v": 1})
    run.write_json("a.json", {"v": 2})
    assert run.read_json("a.json") == {"v": 2}
    assert run.listdir() == ["a.json"]  # no temp files left beside it


def test_local_file_uploads_on_exit(run):
    with run.local_file("plots/fig.png") as p:
        assert p.endswith("fig.png")  # extension kept for format sniffing tools
        assert not run.exists("plots/fig.png")  # nothing visible until the block ends
        Path(p).write_bytes(b"PNGDATA")
    assert run.read_bytes("plots/fig.png") == b"PNGDATA"


def test_local_file_that_raises_writes_nothing(run):
    run.write_bytes("model.pt2", b"old")
    with pytest.raises(ValueError):
        with run.local_file("model.pt2") as p:
            Path(p).write_bytes(b"half")
            raise ValueError("export failed")
    assert run.read_bytes("model.pt2") == b"old"


def test_local_file_never_written_is_an_error(run):
    with pytest.raises(StorageError, match="nothing was written"):
        with run.local_file("x.png"):
            pass
    assert not run.exists("x.png")


def test_read_missing_file_is_file_not_found(run):
    with pytest.raises(FileNotFoundError):
        run.read_json("nope.json")


# -- atomicity ------------------------------------------------------------------------


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_unserialisable_objects_leave_old_files_intact(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.write_json("a.json", {"v": 1})
    rd.write_parquet("t.parquet", _df())
    rd.write_torch("c.pt", {"v": 1})
    before = sha256_tree(tmp_path)

    with pytest.raises(TypeError):
        rd.write_json("a.json", {"v": object()})
    with pytest.raises(Exception):
        rd.write_parquet("t.parquet", pd.DataFrame({"x": [1, "a", object()]}))
    with pytest.raises(Exception):
        rd.write_torch("c.pt", {"f": lambda: 1})

    assert sha256_tree(tmp_path) == before
    assert _files(tmp_path) == ["a.json", "c.pt", "t.parquet"]


@pytest.mark.parametrize("fail_at", ["os.fsync", "os.replace"])
def test_failure_midway_keeps_old_file_and_removes_temp(tmp_path, monkeypatch, fail_at):
    rd = RunDir(str(tmp_path))
    rd.write_json("a.json", {"v": 1})

    def boom(*a, **k):
        raise OSError("disk on fire")

    name = fail_at.split(".")[1]
    monkeypatch.setattr(storage.os, name, boom)
    with pytest.raises(OSError, match="disk on fire"):
        rd.write_json("a.json", {"v": 2, "pad": "x" * 10000})
    monkeypatch.undo()

    assert rd.read_json("a.json") == {"v": 1}
    assert _files(tmp_path) == ["a.json"]


def test_failure_on_new_file_leaves_nothing(tmp_path, monkeypatch):
    rd = RunDir(str(tmp_path))
    monkeypatch.setattr(storage.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        rd.write_parquet("sub/t.parquet", _df())
    monkeypatch.undo()
    assert not rd.exists("sub/t.parquet")
    assert _files(tmp_path / "sub") == []


# -- corruption -----------------------------------------------------------------------


WRITERS = {
    "meta.json": lambda rd, rel: rd.write_json(rel, {"a": list(range(100))}),
    "table.parquet": lambda rd, rel: rd.write_parquet(rel, _df()),
    "ckpt.pt": lambda rd, rel: rd.write_torch(rel, {"w": torch.randn(50, 50)}),
}


# Parquet bit flips: see test_parquet_bit_flips_are_never_read_back_silently.
@pytest.mark.parametrize(
    "name,damage",
    [(n, "truncate") for n in WRITERS] + [("meta.json", "flip"), ("ckpt.pt", "flip")],
)
def test_damaged_file_raises_corrupt_naming_file(tmp_path, name, damage):
    write = WRITERS[name]
    rd = RunDir(str(tmp_path / "run"))
    write(rd, f"stage/{name}")
    p = tmp_path / "run" / "stage" / name
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:  # one changed byte in the middle of the payload
        i = len(data) // 2
        if name == "meta.json":
            data = data.replace(b"[", b"{", 1)
        else:
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        p.write_bytes(data)

    read = {"json": rd.read_json, "parquet": rd.read_parquet, "pt": rd.read_torch}[name.rsplit(".", 1)[1]]
    with pytest.raises(CorruptFileError) as e:
        read(f"stage/{name}")
    msg = str(e.value)
    assert f"stage/{name}" in msg and str(tmp_path / "run") in msg
    assert "delete it" in msg
    assert "\n" not in msg


def test_parquet_bit_flips_are_never_read_back_silently(tmp_path):
    # Many bytes of a parquet file (padding, statistics) do not affect the data; what
    # matters is that no flip yields different numbers without an error.
    rd = RunDir(str(tmp_path))
    df = pd.DataFrame({"score": [0.123456789, 2.5, -1.0] * 20, "arch": ["0-1", "1-0", "2-2"] * 20})
    rd.write_parquet("t.parquet", df)
    data = (tmp_path / "t.parquet").read_bytes()
    detected = 0
    for i in range(4, len(data) - 4, 3):
        rd.write_bytes("x.parquet", data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
        try:
            back = rd.read_parquet("x.parquet")
        except CorruptFileError:
            detected += 1
        else:
            pd.testing.assert_frame_equal(back, df, obj=f"flip at byte {i}")
    assert detected > (len(data) - 8) // 3 // 3


def test_empty_json_is_corrupt(run):
    run.write_bytes("e.json", b"")
    with pytest.raises(CorruptFileError, match="e.json"):
        run.read_json("e.json")


# -- locking --------------------------------------------------------------------------


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


TRY_LOCK = """
    import sys, time
    from pipeline.storage import RunDir, RunLockedError
    t = time.monotonic()
    try:
        with RunDir(sys.argv[1]).lock():
            print("GOT")
    except RunLockedError as e:
        print("LOCKED", round(time.monotonic() - t, 3), e)
"""


def _try_lock_elsewhere(run_dir: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRY_LOCK), run_dir],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_lock_is_exclusive_across_processes_and_freed_by_sigkill(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = _python(
        """
        import sys, time
        from pipeline.storage import RunDir
        with RunDir(sys.argv[1]).lock():
            print("HOLDING", flush=True)
            time.sleep(120)
        """.replace("sys.argv[1]", repr(run_dir))
    )
    try:
        assert holder.stdout.readline().strip() == "HOLDING"

        out = _try_lock_elsewhere(run_dir)
        assert out.startswith("LOCKED"), out
        waited = float(out.split()[1])
        assert waited < 1.0  # refused at once, no waiting
        assert f"pid {holder.pid}" in out and run_dir in out

        # The same process opening it again is refused too.
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with RunDir(run_dir).lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL

    # No cleanup ran in the killed process, yet the lock is free again.
    assert _try_lock_elsewhere(run_dir) == "GOT"
    with RunDir(run_dir).lock():
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / ".lock").read_text()


def test_lock_released_on_exit_and_on_exception(tmp_path):
    rd = RunDir(str(tmp_path))
    with rd.lock():
        pass
    with pytest.raises(KeyError):
        with rd.lock():
            raise KeyError("x")
    with RunDir(str(tmp_path)).lock():  # would raise RunLockedError if still held
        pass


def test_remote_lock_is_exclusive_and_released(monkeypatch):
    a = RunDir("mock:///bucket/run")
    b = RunDir("mock:///bucket/run")
    b.fs = a.fs  # each mock:// URI is its own in-memory store; share one
    with a.lock():
        assert a.exists(".lock")
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}") as e:
            with b.lock():
                pass
        assert "mock:///bucket/run" in str(e.value)
    assert not a.exists(".lock")
    with b.lock():
        pass


def test_remote_lock_stale_heartbeat_is_taken_over():
    a = RunDir("mock:///bucket/run")
    a.write_json(".lock", {"host": "gone", "pid": 1, "since": "then",
                           "t": time.time() - storage.REMOTE_LOCK_STALE_S - 1})
    with a.lock():
        assert a.read_json(".lock")["pid"] == os.getpid()
    a.write_json(".lock", {"host": "alive", "pid": 1, "since": "now", "t": time.time()})
    with pytest.raises(RunLockedError, match="host alive"):
        with a.lock():
            pass


# -- sha256_tree ----------------------------------------------------------------------


def test_sha256_tree_detects_one_changed_byte(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.write_parquet("s2/scores.parquet", _df())
    rd.write_json("s1/meta.json", {"a": 1})
    before = sha256_tree(tmp_path)
    assert set(before) == {"s2/scores.parquet", "s1/meta.json"}

    with rd.lock():  # taking the lock alone is not a change
        pass
    assert sha256_tree(tmp_path) == before

    p = tmp_path / "s2" / "scores.parquet"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    after = sha256_tree(tmp_path)
    assert after != before
    assert [k for k in before if before[k] != after[k]] == ["s2/scores.parquet"]

    (tmp_path / "s1" / "new.txt").write_text("x")
    assert "s1/new.txt" in sha256_tree(tmp_path)


def test_load_intact_skips_damaged_checkpoints(tmp_path):
    """pipeline.checkpoints.load_intact: Ray's registered checkpoint first, else the
    newest that loads (or the largest key); every damaged one named in one line."""
    from pipeline.checkpoints import load_intact

    run = RunDir(str(tmp_path))
    for i in range(3):
        run.write_torch(f"exp/checkpoint_00000{i}/state.pt", {"epoch": i + 1})
    run.write_json("exp/checkpoint_manager_snapshot.json", {})  # a file with the prefix, not a checkpoint
    notes: list[str] = []
    assert load_intact(run, "exp", "state.pt", first="/x/exp/checkpoint_000001", say=notes.append) == \
        ("checkpoint_000001", {"epoch": 2})
    assert load_intact(run, "exp", "state.pt", say=notes.append) == ("checkpoint_000002", {"epoch": 3})
    assert notes == []

    newest = tmp_path / "exp" / "checkpoint_000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (tmp_path / "exp" / "checkpoint_000001" / "state.pt").unlink()
    name, state = load_intact(run, "exp", "state.pt", first="checkpoint_000002", say=notes.append)
    assert (name, state) == ("checkpoint_000000", {"epoch": 1})
    assert len(notes) == 2 and all("\n" not in n and n.endswith("skipping it") for n in notes)
    assert f"{tmp_path}/exp/checkpoint_000002/state.pt is damaged (BadZipFile" in notes[0]
    assert f"{tmp_path}/exp/checkpoint_000001 has no state.pt" in notes[1]

    # A reused folder number: the epoch inside decides, not the name.
    run.write_torch("exp/checkpoint_000001/state.pt", {"epoch": 7})
    assert load_intact(run, "exp", "state.pt", key=lambda s: s["epoch"], say=notes.append)[1] == {"epoch": 7}
    # None intact: nothing to resume from (the stage starts from scratch).
    for d in (tmp_path / "exp").glob("checkpoint_0*"):
        (d / "state.pt").write_bytes(b"PK\x03\x04 not really")
    notes.clear()
    assert load_intact(run, "exp", "state.pt", say=notes.append) == (None, None) and len(notes) == 3
    assert load_intact(run, "nothing-here", "state.pt", say=notes.append) == (None, None)
