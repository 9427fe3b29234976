"""ray_cluster.yaml: accepted by Ray's own cluster-config schema, and it keeps the safe defaults."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then check
    # the result against ray/autoscaler/ray-schema.json.
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_schema_rejects_a_misspelt_field(raw):
    """The validator really runs: the same file with one wrong key fails."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(bad))


def test_gpu_head_and_gpu_workers(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["GPU"] >= 1
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert sum(t.get("min_workers", 0) for t in workers) <= prepared["max_workers"]


def test_setup_installs_pdbench_with_vllm_extra(prepared):
    setup = "\n".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert re.search(r'install .*-e "\$HOME/pdbench\[vllm\]"', setup)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'vllm = \["vllm==0\.26\.0"\]', pyproject)
    assert prepared["file_mounts"]["~/pdbench"] == "."


def test_token_auth_on_every_node(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in prepared[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "ray_cluster.yaml").read_text()


def test_dashboard_only_on_loopback(prepared):
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head


def test_comments_tell_what_to_change():
    text = (ROOT / "ray_cluster.yaml").read_text()
    changes = [line for line in text.splitlines() if "CHANGE" in line]
    for topic in ("cloud", "instance type", "GPU", "min"):
        assert any(topic in line for line in changes), topic
