import json
import subprocess
import sys
import textwrap

import pytest

from cluster.config import ConfigError, config_hash, load_yaml, resolve

BAD = [
    ({"engine": {"kind": "foo"}}, "engine.kind", "'reference', 'vllm' or 'simulated'"),
    ({"engine": {"dtype": "int3"}}, "engine.dtype", "'float32', 'bfloat16' or 'float16'"),
    ({"engine": {"max_batch_size": 0}}, "engine.max_batch_size", "greater than or equal to 1"),
    ({"engine": {"bogus": 1}}, "engine.bogus", "allowed: cpu_threads"),
    ({"workload": {"num_requests": -5}}, "workload.num_requests", "greater than or equal to 1"),
    ({"workload": {"input_len": {"kind": "zipf"}}}, "workload.input_len", "'fixed', 'uniform', 'normal'"),
    ({"workload": {"input_len": {"kind": "uniform", "low": 9, "high": 3}}}, "workload.input_len", "high (3) must be >= low (9)"),
    ({"workload": {"arrival": {"kind": "poisson", "rate": 0}}}, "workload.arrival.rate", "greater than 0"),
    ({"workload": {"arrival": {"kind": "closed", "concurrency": "many"}}}, "workload.arrival.concurrency", "valid integer"),
    ({"slo": {"attainment": 1.5}}, "slo.attainment", "less than or equal to 1"),
    ({"placement": {"strategy": "RANDOM"}}, "placement.strategy", "'PACK' or 'SPREAD'"),
    ({"params": {"tolerance": 2}}, "params.tolerance", "less than 1"),
    ({"params": {"repeats": 1}}, "params.repeats", "greater than or equal to 2"),
    ({"params": {"nope": 1}}, "params.nope", "unknown field"),
    ({"seed": "abc"}, "seed", "valid integer"),
    ({"unknown_top": 1}, "unknown_top", "allowed: engine"),
]


@pytest.mark.parametrize("data,field,allowed", BAD, ids=[b[1] for b in BAD])
def test_bad_field_is_named_with_allowed_values(data, field, allowed):
    with pytest.raises(ConfigError) as e:
        resolve("e0", data)
    msg = str(e.value)
    assert f"  {field}:" in msg, msg
    assert allowed in msg, msg


def test_unknown_track_lists_tracks():
    with pytest.raises(ConfigError, match=r"track: unknown track 'e9'.*e0"):
        resolve("e9")


def test_track_mismatch_between_file_and_command():
    with pytest.raises(ConfigError, match="track: the file says 'e1'"):
        resolve("e0", {"track": "e1"})


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")


def test_hash_ignores_key_order_and_spelling_of_defaults(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("seed: 3\nengine:\n  max_batch_size: 8\n  kind: reference\n")
    b.write_text("engine:\n  kind: reference\n  max_batch_size: 8\n  dtype: float32\nseed: 3\n")
    assert config_hash(resolve("e0", load_yaml(a))) == config_hash(resolve("e0", load_yaml(b)))


def test_hash_changes_with_any_result_relevant_field():
    base = config_hash(resolve("e0"))
    assert config_hash(resolve("e0", {"seed": 1})) != base
    assert config_hash(resolve("e0", {"engine": {"max_batch_size": 3}})) != base
    assert config_hash(resolve("e0", {"params": {"tolerance": 0.1}})) != base


def test_hash_is_stable_across_processes():
    """Another interpreter (fresh hash seed) computes the same digest from the same input."""
    code = textwrap.dedent(
        """
        from cluster.config import config_hash, resolve
        print(config_hash(resolve("e0", {"seed": 7, "workload": {"arrival": {"kind": "gamma", "rate": 2.5, "burstiness": 0.5}}})))
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": s, "PATH": ""}
        ).stdout.strip()
        for s in ("1", "2")
    }
    here = config_hash(resolve("e0", {"seed": 7, "workload": {"arrival": {"kind": "gamma", "rate": 2.5, "burstiness": 0.5}}}))
    assert outs == {here}


def test_resolved_config_has_every_default_and_round_trips():
    cfg = resolve("e0")
    dumped = json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert dumped["params"] == {"repeats": 2, "rounds": 2, "tolerance": 0.25}
    assert config_hash(resolve("e0", dumped)) == config_hash(cfg)


def test_switching_engine_kind_keeps_the_engine_fields():
    cfg = resolve("e0", {"engine": {"kind": "vllm", "model": "qwen3-8b", "max_model_len": 4096}}, {"engine": {"kind": "simulated"}})
    assert cfg.engine.kind == "simulated" and cfg.engine.model == "qwen3-8b" and cfg.engine.max_model_len == 4096


def test_switching_a_distribution_kind_replaces_its_fields():
    cfg = resolve(
        "e0",
        {"workload": {"input_len": {"kind": "uniform", "low": 4, "high": 9}}},
        {"workload": {"input_len": {"kind": "fixed", "value": 5}}},
    )
    assert cfg.workload.input_len.upper == 5


def test_decode_submit_with_prefill_needs_vllm():
    with pytest.raises(ConfigError) as e:
        resolve("e3", {"kv_transfer": {"decode_submit": "with_prefill"}})
    assert "\n  kv_transfer.decode_submit: 'with_prefill' needs engine.kind vllm" in str(e.value), str(e.value)
    ok = resolve("e3", {"engine": {"kind": "vllm", "model": "qwen3-8b"}, "kv_transfer": {"decode_submit": "with_prefill"}})
    assert ok.kv_transfer.decode_submit == "with_prefill"


def test_validating_a_config_imports_no_http_client():
    """The `target:` section is a plain model (actors/target.py): checking a YAML needs no HTTP library."""
    import subprocess
    import sys

    code = "import sys, cluster.config; sys.exit('httpx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_layerwise_save_needs_vllm():
    with pytest.raises(ConfigError) as e:
        resolve("e3", {"kv_transfer": {"save": "layerwise"}})
    assert "\n  kv_transfer.save: 'layerwise' needs engine.kind vllm" in str(e.value), str(e.value)
    ok = resolve("e3", {"engine": {"kind": "vllm", "model": "qwen3-8b"}, "kv_transfer": {"save": "layerwise"}})
    assert ok.kv_transfer.save == "layerwise"
