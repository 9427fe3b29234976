"""Shared fixtures: one embedded Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # Logical CPUs beyond the 2 physical cores: actors of one cell (engine, load generator,
        # prefill, decode) must fit even when a test runs two cells at once.
        ray.init(address="local", num_cpus=4, namespace="pdbench", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
