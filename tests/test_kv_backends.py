"""KV transfer backends: one registry keyed by `kv_transfer.backend`, each side of each engine kind
implementing the KV-handoff interface, and the names a config can give checked in one line."""

import inspect

import pytest

from actors.handoffs import KV_BACKENDS, backend_sides, check_backend
from actors.handoffs.base import DecodeSide, PrefillSide
from actors.handoffs.spec import DEFAULT_BACKEND, KVHandoffConfig
from actors.kv.spec import KVTransferConfig
from cluster.config import ConfigError, resolve


def _methods(protocol: type) -> set[str]:
    return {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_every_backend_side_implements_the_handoff_interface():
    assert DEFAULT_BACKEND in KV_BACKENDS
    for name in KV_BACKENDS:
        for kind in KV_BACKENDS.get(name).engines:
            sides = backend_sides(name, kind)
            for cls, protocol in ((sides.prefill, PrefillSide), (sides.decode, DecodeSide)):
                missing = {m for m in _methods(protocol) if not inspect.isfunction(getattr(cls, m, None))}
                assert not missing, f"{name}/{kind}: {cls.__name__} lacks {missing}"
                for m in _methods(protocol):  # async where the interface is, plain where it is not
                    want = inspect.iscoroutinefunction(getattr(protocol, m))
                    assert inspect.iscoroutinefunction(getattr(cls, m)) == want, f"{cls.__name__}.{m}"
            assert isinstance(sides.decode.own_stats_prefix, str)


def test_today_the_object_store_moves_reference_and_vllm_kv_and_nothing_else():
    assert KV_BACKENDS.names() == ["ray-object-store"]
    check_backend("ray-object-store", "reference")
    check_backend("ray-object-store", "vllm")
    with pytest.raises(ValueError, match="engine.kind: the ray-object-store KV backend moves the KV of reference or vllm engines, not 'simulated'"):
        check_backend("ray-object-store", "simulated")


def test_an_unknown_backend_is_one_line_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        resolve("e3", {"kv_transfer": {"backend": "carrier-pigeon"}})
    assert "kv_transfer.backend" in str(e.value) and "choose one of: ray-object-store" in str(e.value), str(e.value)
    assert resolve("e3", {}).kv_transfer.backend == DEFAULT_BACKEND


def test_the_transport_settings_leave_the_backend_name_out():
    """The vLLM connector validates its settings as KVTransferConfig (extra fields forbidden)."""
    kv = KVHandoffConfig(put_threads=3)
    assert kv.transport() == KVTransferConfig(put_threads=3)
