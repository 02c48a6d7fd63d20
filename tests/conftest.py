import os

import pytest
from hypothesis import HealthCheck, settings

import tdpmmu

# CI (CI=true) gets a short, derandomized run so its time and outcome are repeatable.
settings.register_profile(
    "ci",
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")


@pytest.fixture
def vm() -> tdpmmu.VM:
    """A small default VM: 64 MiB (16384 gfns), 2 vCPUs, 4-level, 4K backing."""
    return tdpmmu.VM(memory="64MiB", vcpus=2)
