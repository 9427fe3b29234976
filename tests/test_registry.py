"""One registry shape for tracks, dataset families and engines; the names users type agree with it."""

import typing

import pytest

from actors.engines import ENGINES, EngineConfig
from cluster.cli import EngineKind
from workloads.datasets import FAMILIES
from workloads.registry import Registry
from workloads.tracks import list_tracks
from workloads.tracks.base import TRACKS


def test_unknown_name_lists_the_known_ones_and_duplicates_are_refused():
    r: Registry[int] = Registry("widget")
    r.add("b", 2)
    r.add("a", 1)
    assert r.get("a") == 1 and list(r) == ["a", "b"] and "b" in r
    with pytest.raises(KeyError, match="unknown widget 'c'; choose one of: a, b"):
        r.get("c")
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        r.add("a", 3)


def test_engine_kinds_in_config_cli_and_registry_agree():
    assert set(typing.get_args(EngineConfig.model_fields["kind"].annotation)) == set(ENGINES.names())
    # --engine offers every real engine; the simulated one only comes with --simulate.
    assert {k.value for k in EngineKind} == set(ENGINES.names()) - {"simulated"}


def test_every_track_module_registers_once_and_datasets_are_registered():
    # Other tests register throw-away tracks named ztest-*: only the project's own are checked.
    own = [n for n in TRACKS.names() if not n.startswith("ztest")]
    assert [t.name for t in list_tracks() if not t.name.startswith("ztest")] == own == ["e0", "e1", "e2", "e3", "e4", "e5", "e6"]
    assert FAMILIES.names() == ["gsm8k", "mmlu"]
