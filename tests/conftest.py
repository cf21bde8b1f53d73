import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module: start-up costs seconds, so share it."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: 2 Train workers + Train's controller + a spare.
        # The dashboard serves the State API: with ray[default] installed but no dashboard,
        # Train V2's placement-group cleaner takes the live controller for dead and
        # removes its workers' placement group.
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
