import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module: start-up costs seconds, so share it."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: 2 Train workers + Train's controller + a spare.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
