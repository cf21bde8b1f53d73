"""The command line: bad input is one line on stderr, exit 2, and an existing run
directory is left byte-for-byte as it was."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run import main
from pipeline.storage import RunDir, sha256_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def existing_run(tmp_path):
    """A run directory that already holds a config and some stage output."""
    run_dir = tmp_path / "run"
    RunDir(str(run_dir)).write_json("supernet/result.json", {"epochs_run": 2})
    assert main(["--run-dir", str(run_dir), "--stages", "report", "--set", "seed=3"]) == 0
    return run_dir


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


CASES = {
    "malformed yaml": (lambda t: ["--config", _bad(t, "a.yaml", "supernet: {epochs: [1,\n")], "is not valid YAML at line"),
    "unknown key": (lambda t: ["--set", "supernet.epoks=3"], "unknown key supernet.epoks"),
    "wrong type": (lambda t: ["--set", "supernet.epochs=many"], "supernet.epochs: expected an integer"),
    "out of range": (lambda t: ["--set", "data.fraction=0"], "data.fraction must be in (0, 1]"),
    "unknown space": (lambda t: ["--set", "space.name=resnet_space"], "unknown space 'resnet_space'"),
    "unknown op": (lambda t: ["--set", "space.name=" + _bad(t, "s.yaml",
        "name: s\ninput_size: 28\nstem: []\nhead: {channels: 8}\nstages:\n- {channels: 8, depth: 1, stride: 1, ops: [conv9]}\n")],
        "unknown op 'conv9'"),
    "malformed space yaml": (lambda t: ["--set", "space.name=" + _bad(t, "s2.yaml", "name: [\n")], "is not valid YAML"),
    "another config": (lambda t: ["--set", "seed=4"], "holds another configuration (seed: 3 -> 4)"),
    "missing config file": (lambda t: ["--config", str(t / "nope.yaml")], "does not exist"),
    "unknown stage": (lambda t: ["--set", "seed=3", "--stages", "supernet,deploy"], "unknown stage 'deploy'"),
    # Empty arguments are refused, not skipped (--run-dir "" used to run in runs/default).
    "empty run dir": (lambda t: ["--run-dir", ""], "--run-dir is empty; pass a directory path or URI"),
    "empty stage list": (lambda t: ["--stages", ","], "--stages ',' names no stage"),
    "empty config": (lambda t: ["--config", ""], "--config is empty"),
    "empty address": (lambda t: ["--address", ""], "--address is empty"),
    # Non-finite or overflowing values fail at validation, not deep inside torch.
    "infinite value": (lambda t: ["--set", "supernet.lr=.inf"], "supernet.lr: expected a finite number, got inf"),
    "nan value": (lambda t: ["--set", "retrain.lr=.nan"], "retrain.lr: expected a finite number, got nan"),
    "overflowing float": (lambda t: ["--set", "search.max_flops=1e400"], "search.max_flops: expected a finite number"),
    "overflowing integer": (lambda t: ["--set", "seed=100000000000000000000000"], "seed: 100000000000000000000000 "
                            "does not fit in 64 bits"),
    "seed in e-notation": (lambda t: ["--set", "seed=1e23"], "seed: expected an integer, got '1e23'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_run_dir_untouched(case, existing_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run dir (runs/default) would appear
    args, message = CASES[case]
    before = sha256_tree(existing_run)
    code = main(["--run-dir", str(existing_run), "--set", "seed=3", *args(tmp_path)]
                if case != "another config" else ["--run-dir", str(existing_run), *args(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("bnnas: error: ")
    assert sha256_tree(existing_run) == before
    assert not (tmp_path / "runs").exists()


def _refused(args, message, capsys) -> str:
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("bnnas: error: "), err
    assert message in err, err
    return err


PATH_CASES = {
    "an existing file": (lambda t: t / "afile", "is an existing file, not a directory"),
    "below a file": (lambda t: t / "afile" / "run", "cannot be made: {t}/afile is a file, not a directory"),
    "under /proc": (lambda t: "/proc/bnnas-test-run", "run dir /proc/bnnas-test-run cannot be created"),
}


@pytest.mark.parametrize("case", PATH_CASES)
def test_path_problems_one_line_exit_2_nothing_created(case, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a run dir")
    path, message = PATH_CASES[case]
    before = sha256_tree(tmp_path)
    _refused(["--run-dir", str(path(tmp_path)), "--stages", "report"], message.format(t=tmp_path), capsys)
    assert sha256_tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_parent_not_writable_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import errno
    import os

    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway (CI runs as root): give the answer a user gets
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        _refused(["--run-dir", str(parent / "run"), "--stages", "report"],
                 f"run dir {parent}/run cannot be created (Permission denied: {parent}/run)", capsys)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


SYNTHETIC = ["data.name=synthetic", "data.synthetic_train=256", "data.synthetic_test=32", "data.val_size=32",
             "data.synthetic_size=16", "supernet.batch_size=16", "search.max_flops=0"]


@pytest.mark.parametrize("sets,stages,message", [
    (["data.val_size=70000"], "supernet", "data.val_size=70000 leaves no training data"),
    (SYNTHETIC + ["supernet.num_workers=5", "supernet.seeds=1"], "supernet", "supernet training needs 5 CPU"),
    (SYNTHETIC + ["search.max_params=10"], "supernet", "search.max_params=10 is below the cheapest architecture"),
    ([], "report", "nothing to report in"),
], ids=["data check", "resource check", "infeasible budget", "nothing to report"])
def test_run_refused_after_validation_leaves_no_run_dir(tmp_path, ray_local, capsys, sets, stages, message):
    """Refused by a check that needs the data, Ray or the space: no .lock or config.yaml
    of a run that never started (the run dir did not exist, so it does not now)."""
    run_dir = tmp_path / "new" / "run"
    args = ["--run-dir", str(run_dir), "--stages", stages] + [a for s in sets for a in ("--set", s)]
    _refused(args, message, capsys)
    assert not (tmp_path / "new").exists()
    # An existing empty folder given as the run dir is left empty, not removed.
    run_dir.mkdir(parents=True)
    _refused(args, message, capsys)
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []


def test_force_continues_with_new_config(existing_run):
    assert main(["--run-dir", str(existing_run), "--set", "seed=4", "--stages", "report", "--force"]) == 0
    assert "seed: 4" in (existing_run / "config.yaml").read_text()


def test_unreachable_ray_address_real_process(existing_run):
    before = sha256_tree(existing_run)
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--run-dir", str(existing_run),
                           "--set", "seed=3", "--stages", "search", "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in last
    assert sha256_tree(existing_run) == before


def test_second_run_on_same_dir_refused_at_once(existing_run):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.storage import RunDir\n"
        f"r = RunDir({str(existing_run)!r})\n"
        "with r.lock():\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--run-dir", str(existing_run),
                               "--set", "seed=3", "--stages", "report"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert f"pid {holder.pid}" in proc.stderr and "is in use" in proc.stderr
        assert holder.poll() is None  # the first run is undisturbed
    finally:
        holder.kill()


def test_stage_code_imports_without_ray():
    """The trainer, the indicators and the trial's train/evaluate loop have no Ray in them:
    bench/ drives them on machines with only torch (bench/run_gpu.sh on a GPU box)."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import pipeline.train_supernet, pipeline.search, pipeline.retrain\n"
            "from pipeline.retrain import _train_epoch, evaluate\n"
            "from pipeline.search import AccIndicator, BNIndicator\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # ...while Ray itself is still what runs them in the pipeline
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None\n"
                           "from pipeline.search import ScorerPool, BNIndicator\n"
                           "ScorerPool(BNIndicator, {}, num_actors=1)"], capture_output=True, text=True)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


# ----------------------------------------------------------------------------- Ray authentication

@pytest.fixture
def token_head():
    """A local Ray head started with RAY_AUTH_MODE=token and a token of its own (not
    ~/.ray/auth_token), in its own temp dir and session; stopped (its whole process
    group) afterwards."""
    import os
    import shutil
    import signal
    import socket
    import tempfile
    import time

    home = tempfile.mkdtemp(prefix="rayauth", dir="/tmp")  # short: Ray's socket paths are length-limited
    token = Path(home, "token")
    token.write_text("5ec2e7" * 10 + "abcd")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={home}/t", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the head did not come up"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", token, head
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # the head's children (gcs_server, raylet, ...) share its process group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(home, ignore_errors=True)


def test_token_cluster_refusal_is_reported_with_the_fix(token_head, existing_run, tmp_path):
    """Ray's token authentication is left on. A client without the cluster's token is told
    so at once (not "cannot reach ... start it" after 20 s), with the fix; with the token
    it joins (and the search stage then asks for stage 1's output, which is not there)."""
    import os

    address, token, head = token_head
    before = sha256_tree(existing_run)
    cmd = [sys.executable, "-m", "pipeline.run", "--run-dir", str(existing_run), "--set", "seed=3", "--stages",
           "search", "--address", address]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    base["PYTHONPATH"] = str(REPO)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    for env, why in (({"HOME": str(tmp_path)}, "this client has no token"),
                     ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
                      "did not accept this client's token")):
        proc = subprocess.run(cmd, cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert head.poll() is None, "the head died"
        assert len(err) == 1 and (f"the Ray cluster at '{address}' refused the connection: it requires token authentication "
                                 f"and {why}") in err[0], err
        assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH" in err[0], err
        assert sha256_tree(existing_run) == before

    proc = subprocess.run(cmd, cwd=REPO, env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no trained supernet" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "refused" not in proc.stderr and "cannot reach" not in proc.stderr
