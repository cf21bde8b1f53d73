"""Progress inside long epochs reaches the console when stdout is a file (CI, nohup)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.common import ray_noise
from pipeline.progress import Relay, Ticker, eta, meter, send

REPO = Path(__file__).resolve().parents[1]


def test_ticker_rate_limits_and_meter_reads_like_tqdm():
    every_step, hourly = Ticker(0), Ticker(3600)
    assert [every_step.due() for _ in range(5)] == [True] * 5
    assert not any(hourly.due() for _ in range(1000))  # an epoch shorter than the interval prints nothing
    assert meter(120, 429, 12.0) == " 28% 120/429 [00:12<00:30, 10.00 step/s]"  # 309 steps left at 10/s
    assert eta(65) == "01:05" and eta(-3) == "00:00"


def test_relay_hands_on_every_event_in_order_then_stops(ray_local):
    """The pump waits in one blocking get (no polling); leaving the block still prints every
    event a worker sent before it, in order, and ends the pump; a relay whose queue actor
    died leaves without hanging."""
    got = []

    @ray_local.remote(num_cpus=0)
    def worker(queue, n):
        for i in range(n):
            send(queue, {"i": i})
        return n

    with Relay(got.append) as relay:
        assert ray_local.get(worker.remote(relay.queue, 50)) == 50
    assert got == [{"i": i} for i in range(50)]
    assert not relay._thread.is_alive()

    with Relay(got.append) as relay:
        ray_local.kill(relay.queue.actor)
    assert not relay._thread.is_alive()
    send(relay.queue, {"i": -1})  # best effort: a dead queue is not an error


def test_progress_lines_appear_within_an_epoch_when_stdout_is_a_file(tmp_path):
    """The whole CLI in a subprocess whose stdout is a file; progress_s=0 (a line every
    step): stage 1 says where it is inside its epoch before the epoch's own line, and so
    does every retraining trial, each with a step count short of the epoch's."""
    log = tmp_path / "out.log"
    sets = ["data.name=synthetic", "data.synthetic_train=600", "data.synthetic_test=64", "data.val_size=64",
            "data.synthetic_size=16", "data.synthetic_classes=4", "supernet.batch_size=32", "supernet.epochs=1",
            "supernet.seeds=1", "supernet.num_workers=1", "search.max_flops=0", "search.top_n=2",
            "search.method=exact", "search.num_actors=1", "retrain.epochs=1", "retrain.batch_size=64",
            "ray.num_cpus=2", "progress_s=0"]
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.run", "--run-dir", str(tmp_path / "run"),
             "--stages", "supernet,search,retrain", *[a for s in sets for a in ("--set", s)]],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=420,
            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)})
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    # Ray's own start-up chatter stays in Ray's logs: Train's worker-group lines and its
    # PreemptionWatcher E-line, Tune's experiment box (stdout and stderr both go to the file).
    for noise in ("PreemptionWatcher", "Started training worker group", "Setting up process group",
                  "Configuration for experiment", "View detailed results here", "tensorboard --logdir",
                  "Wrote the latest version of all result files"):
        assert noise not in text, text[-3000:]

    steps = [(i, int(m[1]), int(m[2])) for i, ln in enumerate(lines)
             if (m := re.match(r"supernet epoch 1/1 +\d+% (\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d, .*step/s\]  loss \S+  "
                               r"acc \S+%  \d+ img/s  stage ETA \d\d:\d\d$", ln))]
    epoch_end = next(i for i, ln in enumerate(lines) if re.match(r"supernet epoch 1/1  loss", ln))
    assert steps and all(i < epoch_end for i, _, _ in steps), text[-3000:]
    # 536 training images (600 less 64 held out) in batches of 32: 16 steps, one line each.
    assert [(s, total) for _, s, total in steps] == [(s, 16) for s in range(1, 17)], text[-3000:]

    for trial in (1, 2):
        inside = [i for i, ln in enumerate(lines)
                  if re.match(rf"retrain: trial {trial}/2 \[[\d, ]+\] epoch 1/1 +\d+% \d+/\d+ \[.*\]  "
                              r"train_loss \S+  \d+ img/s  trial ETA \d\d:\d\d$", ln)]
        end = next(i for i, ln in enumerate(lines) if re.match(rf"retrain: trial {trial}/2 .* epoch 1/1 val_acc", ln))
        assert inside and min(inside) < end, text[-3000:]


def test_ray_noise_is_only_the_lines_a_user_can_do_nothing_about():
    noise = ["[2026-12-07 00:49:48,583 E 3571 3603] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: '1fbec15b' has constructor arguments in the object store and max_restarts > 0. If the ...",
             "Requesting resources: {'CPU': 1.0} * 2",
             "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
             "Started training worker group of size 2: ",
             "- (ip=192.0.2.2, pid=3682) world_rank=0, local_rank=0, node_rank=0",
             "Setting up process group for: env:// [rank=0, world_size=2]",
             "Restored on 192.0.2.2 from checkpoint: Checkpoint(filesystem=local, path=/tmp/r1/retrain_tune/x)"]
    kept = ["[2026-12-07 00:49:48,583 E 3571 3603] core_worker.cc:812: Actor with class name: 'RayTrainWorker' died",
            "Traceback (most recent call last):", "RuntimeError: CUDA out of memory",
            "WARNING: Requesting resources: none available for 60 s",
            "supernet epoch 1/1  loss 1.3565", "Training worker group failed to start: timeout",
            "Restored on 192.0.2.2 from checkpoint: failed to read metadata"]
    assert [ray_noise(ln) for ln in noise] == [True] * len(noise)
    assert [ray_noise(ln) for ln in kept] == [False] * len(kept)
