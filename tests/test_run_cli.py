"""The command line: bad input is one line on stderr, exit 2, and an existing run
directory is left byte-for-byte as it was."""

import subprocess
import sys

import pytest

from pipeline.run import main
from pipeline.storage import RunDir, sha256_tree


@pytest.fixture
def existing_run(tmp_path):
    """A run directory that already holds a config and some stage output."""
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--stages", "report", "--set", "seed=3"]) == 0
    RunDir(str(run_dir)).write_json("supernet/result.json", {"epochs_run": 2})
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
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_run_dir_untouched(case, existing_run, tmp_path, capsys):
    args, message = CASES[case]
    before = sha256_tree(existing_run)
    code = main(["--run-dir", str(existing_run), "--set", "seed=3", *args(tmp_path)]
                if case != "another config" else ["--run-dir", str(existing_run), *args(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("bnnas: error: ")
    assert sha256_tree(existing_run) == before


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
