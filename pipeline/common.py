"""Small pieces every stage shares: Ray start-up, the space for a dataset, seeding."""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch

from search_spaces import OPS, SearchSpace, get_space, register_op

from .config import Config

Progress = Callable[[str], None]


class PipelineError(RuntimeError):
    """A user-facing failure: one line naming the problem and what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_space(cfg: Config, in_channels: int, num_classes: int, image_size: int) -> SearchSpace:
    """The configured space, adapted to the dataset's channels, classes and image size."""
    return get_space(cfg.space.name).with_data(in_channels=in_channels, num_classes=num_classes,
                                               input_size=image_size)


def space_ops(space: SearchSpace) -> dict:
    """The space's op constructors, to ship to Ray workers with the space itself.

    An op registered in the driver (a user's script) is unknown in a fresh Ray worker;
    cloudpickle carries built-in factories by reference and a script's by value.
    """
    names = {op for st in space.stages for op in st.ops} | {s.op for s in space.stem if s.type == "op"}
    return {name: OPS[name] for name in sorted(names)}


def register_ops(ops: dict) -> None:
    """In a worker: register the shipped ops it does not know yet."""
    for name, factory in ops.items():
        if name not in OPS:
            register_op(name, factory)


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences 2.60's token notice on local runs
    if address:
        unreachable = PipelineError(
            f"cannot reach the Ray cluster at {address!r}; start it (ray up cluster.yaml or "
            "ray start --head) or unset RAY_ADDRESS / --address to run locally")
        _probe(address, unreachable)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError):
            raise unreachable from None
    else:
        # The dashboard (ray[default]) serves the State API, which Ray Train V2 uses to
        # release a dead controller's placement group; without it Train logs warnings
        # every few seconds and a killed driver can leak CPUs.
        # address="local": always a fresh in-process instance; a bare ray.init() would
        # join whatever cluster /tmp/ray/ray_current_cluster names, even a dead one.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or None, log_to_driver=True)


def _probe(address: str, error: Exception) -> None:
    # ray.init retries an unreachable host:port for minutes; a plain TCP connect
    # answers in seconds. "auto" and ray:// addresses are left to Ray itself.
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        raise error from None
