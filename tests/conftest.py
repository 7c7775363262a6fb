import os

import pytest
from hypothesis import settings

# CI runs a fixed set of examples so that a red build always reproduces; locally hypothesis
# explores new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance shared by every test that needs it."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
