"""cluster.yaml is checked offline, against Ray's own cluster-config schema.

`ray up` has no dry run. Before it touches the cloud it runs
``ray.autoscaler._private.commands._bootstrap_config``, whose offline part is
``prepare_config`` (merge with the provider's defaults.yaml, merge setup commands,
check the docker section, fill per-type worker bounds) followed by ``validate_config``
(the JSON schema in ray/autoscaler/ray-schema.json plus the head-type and worker-bound
checks). Both are private Ray APIs; this test calls exactly those two, with the network
blocked to prove they need no cloud access. The provider bootstrap that follows in
``ray up`` (IAM, key pair, subnets, AMI: boto3 calls) is not run.

Ray does not reject a node type whose min_workers exceeds its own max_workers (only the
sum of min_workers above the global max_workers), so ``check`` adds that rule.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

# Anything Ray (or this file's own rule) raises for a bad config.
INVALID = (jsonschema.ValidationError, ValueError, KeyError, AssertionError)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if validation tries to reach the cloud (or anything else)."""

    def refuse(*args, **kwargs):
        raise AssertionError("cluster.yaml validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    """What `ray up` checks before the cloud, plus per-type worker bounds."""
    prepared = prepare_config(copy.deepcopy(config))  # prepare_config mutates its input
    validate_config(prepared)
    for name, node_type in prepared["available_node_types"].items():
        lo, hi = node_type["min_workers"], node_type["max_workers"]
        if not 0 <= lo <= hi:
            raise ValueError(f"node type {name}: need 0 <= min_workers ({lo}) <= max_workers ({hi})")
    return prepared


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return check(raw)


def _worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


# ----------------------------------------------------------------------------- schema


def test_cluster_yaml_passes_rays_validation(prepared):
    assert prepared["cluster_name"] == "bnnas"
    assert prepared["provider"]["type"] == "aws"


def test_prepare_config_does_not_mutate_or_need_network(raw):
    before = copy.deepcopy(raw)
    check(raw)
    assert raw == before


def _misspelt_top_level(cfg):
    cfg["max_worker"] = cfg.pop("max_workers")


def _misspelt_node_type_key(cfg):
    worker = next(iter(_worker_types(cfg).values()))
    worker["min_worker"] = worker.pop("min_workers")


def _misspelt_docker_key(cfg):
    cfg["docker"]["run_option"] = cfg["docker"].pop("run_options")


def _head_type_missing(cfg):
    cfg["head_node_type"] = "ray.head.nonexistent"


def _min_above_max(cfg):
    # Within the global max_workers, so only the per-type rule can catch it.
    worker = next(iter(_worker_types(cfg).values()))
    worker["min_workers"], worker["max_workers"] = 2, 1


def _min_above_global_max(cfg):
    worker = next(iter(_worker_types(cfg).values()))
    worker["min_workers"] = cfg["max_workers"] + 1
    worker["max_workers"] = cfg["max_workers"] + 1


def _negative_resource(cfg):
    worker = next(iter(_worker_types(cfg).values()))
    worker["resources"] = {"CPU": 4, "GPU": -1}


def _missing_resources(cfg):
    worker = next(iter(_worker_types(cfg).values()))
    del worker["resources"]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        pytest.param(_misspelt_top_level, "'max_worker' was unexpected", id="misspelt_top_level"),
        pytest.param(_misspelt_node_type_key, "'min_worker' was unexpected", id="misspelt_node_type_key"),
        pytest.param(_misspelt_docker_key, "'run_option' was unexpected", id="misspelt_docker_key"),
        pytest.param(_head_type_missing, "head_node_type", id="head_type_missing"),
        pytest.param(_min_above_max, r"min_workers \(2\) <= max_workers \(1\)", id="min_above_max"),
        pytest.param(_min_above_global_max, "sum of `min_workers`", id="min_above_global_max"),
        pytest.param(_negative_resource, "less than the minimum of 0", id="negative_resource"),
        pytest.param(_missing_resources, "'resources' is a required property", id="missing_resources"),
    ],
)
def test_broken_copies_fail_validation(raw, mutate, reason):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(INVALID, match=reason):
        check(broken)


# ----------------------------------------------------------------------------- this project


def test_setup_installs_this_project(prepared):
    # The project directory `ray up` runs from is copied to ~/bnnas on every node ...
    assert prepared["file_mounts"].get("~/bnnas") == "."
    assert (ROOT / "pyproject.toml").is_file(), "pip install -e ~/bnnas needs pyproject.toml at the root"
    assert (ROOT / "pipeline").is_dir()
    # ... and installed from there, on the head and on every worker.
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " && ".join(prepared[key])
        assert re.search(r"pip install (.* )?-e ~/bnnas(\s|$)", cmds), f"{key}: {prepared[key]}"
    # The local virtualenv and run directories are not shipped.
    assert "/.venv" in prepared["rsync_exclude"]


def test_ray_versions_match_installed_ray(prepared):
    docker = prepared["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    tags = set()
    for image in images:
        repo, tag = image.split(":")
        assert repo == "rayproject/ray"
        version, py, _platform = tag.split("-")
        assert version == ray.__version__, f"{image} is not Ray {ray.__version__}"
        tags.add(py)
    assert len(tags) == 1, f"head and workers must run the same Python: {images}"
    # pip must not swap the image's Ray for another release.
    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", " ".join(prepared["setup_commands"]))
    assert pins == [ray.__version__]


def test_head_runs_no_gpu(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "head should be a CPU instance"
    assert prepared["docker"]["head_image"].endswith("-cpu")
    assert head["max_workers"] == 0


def test_gpu_workers_autoscale_from_zero(prepared):
    workers = _worker_types(prepared)
    assert workers
    for name, worker in workers.items():
        assert worker["min_workers"] == 0, name
        assert 1 <= worker["max_workers"] <= prepared["max_workers"], name
        assert worker["resources"]["GPU"] >= 1, name
        assert re.match(r"^(g|p)\d", worker["node_config"]["InstanceType"]), name


def test_every_node_can_reach_shared_storage(prepared):
    # Ray 2.7+ writes Train/Tune checkpoints from each node straight to storage_path:
    # every node needs credentials for the S3 run directory (an instance profile).
    for name, node_type in prepared["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), name
