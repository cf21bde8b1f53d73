"""Small pieces every stage shares: Ray start-up, the space for a dataset, seeding."""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch

from search_spaces import SearchSpace, get_space

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


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences 2.60's token notice on local runs
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PipelineError(
                f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}); "
                "start it (ray up cluster.yaml / ray start --head) or unset RAY_ADDRESS to run locally") from None
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, log_to_driver=True)
