"""Memory: the analytic KV and weight formulas against the reference engine's real tensors, and
the memory reports engines give (measured on CPU; never pretended by the simulator)."""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from actors.engines import EngineConfig, build_engine
from actors.engines.models import architecture, architecture_hash, resolve_model
from actors.engines.reference import ReferenceModel
from analysis.kv import kv_bytes_per_token
from analysis.memory import analytic, max_concurrency, param_count
from workloads.longcontext import yarn_rope_parameters


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def ref(request):
    return ReferenceModel(EngineConfig(model="tiny-qwen3", dtype=request.param, device="cpu"))


def test_kv_formula_matches_transformers_cache_tensors(ref):
    """The HF cache a forward pass fills holds exactly tokens × KV bytes per token."""
    c = ref.model.config
    kvb = kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, ref.cfg.dtype)
    for n in (1, 37, 300):
        with torch.inference_mode():
            out = ref.model(input_ids=torch.arange(n).unsqueeze(0), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        real = sum(c.keys.numel() * c.keys.element_size() + c.values.numel() * c.values.element_size() for c in cache.layers)
        assert real == n * kvb
    assert kvb == ref.info().kv_bytes_per_token


def test_engine_kv_buffers_and_memory_report(ref):
    kvb = ref.info().kv_bytes_per_token
    before = ref.memory()
    _, a = ref.prefill(list(range(50)), capacity=80)
    _, b = ref.prefill(list(range(20)), capacity=30)
    assert a.k.numel() * a.k.element_size() * 2 == 80 * kvb
    rep = ref.memory()
    assert rep.measured and rep.device == "cpu" and rep.source.startswith("cpu:")
    assert rep.detail["kv_live_bytes"] == before.detail["kv_live_bytes"] + 110 * kvb
    assert rep.kv_cache_bytes >= 110 * kvb
    assert rep.total_bytes == rep.weights_bytes + rep.kv_cache_bytes + rep.activation_peak_bytes + rep.other_bytes
    assert rep.detail["rss_peak_bytes"] >= rep.detail["rss_after_load_bytes"] > rep.weights_bytes
    del a, b
    assert ref.memory().detail["kv_live_bytes"] == before.detail["kv_live_bytes"], "freed sequences leave the live count"


def test_analytic_weights_match_the_real_parameter_count(ref):
    arch = architecture(resolve_model("tiny-qwen3")[0])
    n = sum(p.numel() for p in ref.model.parameters())
    assert param_count(arch) == n == ref.info().extra["num_parameters"]
    from analysis.kv import DTYPE_BYTES

    measured = ref.memory().weights_bytes
    buffers = sum(b.numel() * b.element_size() for b in ref.model.buffers())
    assert measured == n * DTYPE_BYTES[ref.cfg.dtype] + buffers
    assert analytic(arch, ref.cfg.dtype, 10)["weights_bytes"] == n * DTYPE_BYTES[ref.cfg.dtype]


def test_param_count_of_qwen3_8b_is_its_published_size():
    cfg = json.loads((Path(__file__).resolve().parents[1] / "configs/models/qwen3-8b.json").read_text())
    assert 8.15e9 < param_count(architecture(cfg)) < 8.25e9  # Qwen3-8B: 8.2B parameters
    a = analytic(architecture(cfg), "bfloat16", 1000)
    assert a["kv_bytes_per_token"] == 147456 and a["kv_cache_bytes"] == 147456 * 1000


def test_max_concurrency():
    assert max_concurrency(100, 20, 10, 10, 1) == 7
    assert max_concurrency(10, 20, 0, 10, 1) == 0


def test_simulated_engine_does_not_pretend_to_measure():
    eng = build_engine(EngineConfig(kind="simulated"))

    async def go():
        await eng.start()
        try:
            return await eng.memory()
        finally:
            await eng.shutdown()

    rep = asyncio.run(go())
    assert rep["measured"] is False and rep["source"].startswith("simulated")
    assert all(rep[k] is None for k in ("weights_bytes", "kv_cache_bytes", "activation_peak_bytes", "other_bytes", "total_bytes"))


def test_hf_overrides_reach_the_reference_model():
    over = yarn_rope_parameters(2.0, 512, 1e6)
    plain = ReferenceModel(EngineConfig(model="tiny-qwen3", device="cpu"))
    yarn = ReferenceModel(EngineConfig(model="tiny-qwen3", device="cpu", hf_overrides=over))
    assert yarn.model.config.rope_parameters["rope_type"] == "yarn"
    assert yarn.model.model.rotary_emb.attention_scaling > 1.0 == plain.model.model.rotary_emb.attention_scaling
    assert yarn.arch["rope_parameters"] == over["rope_parameters"] and yarn.arch["max_position_embeddings"] == 1024
    assert architecture_hash(yarn.arch) != architecture_hash(plain.arch)
    prompt = list(range(1, 200))
    t_plain, _ = plain.prefill(prompt, 210)
    t_yarn, _ = yarn.prefill(prompt, 210)
    # Same seeded weights, different rope: the logits differ (checked on the full distribution).
    with torch.inference_mode():
        lp = plain.model(input_ids=torch.tensor([prompt])).logits
        ly = yarn.model(input_ids=torch.tensor([prompt])).logits
    assert not torch.allclose(lp, ly)
    assert isinstance(t_plain, int) and isinstance(t_yarn, int)


def test_vllm_gets_the_same_hf_overrides():
    from actors.engines.vllm_engine import engine_args

    over = yarn_rope_parameters(4.0, 32768, 1e6)
    cfg = EngineConfig(kind="vllm", model="qwen3-8b", max_model_len=131072, hf_overrides=over)
    assert engine_args(cfg, "/tmp/m", dummy=True)["hf_overrides"] == over


@pytest.mark.gpu
def test_reference_memory_report_on_cuda():
    """On a GPU node (`pytest -m gpu`): torch allocator stats and NVML decompose the peak."""
    m = ReferenceModel(EngineConfig(model="tiny-qwen3", device="cuda", dtype="bfloat16"))
    kvb = m.info().kv_bytes_per_token
    _, _state = m.prefill(list(range(500)), capacity=600)
    rep = m.memory()
    assert rep.source.startswith("cuda:") and rep.device.startswith("cuda")
    assert rep.kv_cache_bytes == 600 * kvb and rep.activation_peak_bytes > 0
    assert rep.weights_bytes == sum(t.numel() * t.element_size() for t in [*m.model.parameters(), *m.model.buffers()])
    assert rep.total_bytes == rep.weights_bytes + rep.kv_cache_bytes + rep.activation_peak_bytes + rep.other_bytes
    assert rep.device_total_bytes == torch.cuda.get_device_properties(0).total_memory


def test_e5_reports_kv_bytes_per_token_of_a_fixed_pool():
    """vLLM-style memory (a preallocated pool that says how many tokens it holds): the E5 verdict
    carries the measured bytes per token beside the analytic one, and the report prints both."""
    import json

    import pandas as pd

    from actors.engines.models import MODELS_DIR, architecture
    from analysis.tracks.e5 import ANALYSIS

    arch = {**architecture(json.loads((MODELS_DIR / "qwen3-8b.json").read_text())), "hash": "h"}
    mem = {
        "source": "vllm",
        "measured": True,
        "device": "cuda:0",
        "weights_bytes": 16_000_000_000,
        "kv_cache_bytes": 147456 * 1000,
        "kv_cache_tokens": 1000,
        "activation_peak_bytes": 1,
        "other_bytes": 1,
        "total_bytes": 16_000_000_000 + 147456 * 1000 + 2,
        "device_total_bytes": 80 * 2**30,
    }
    cells = {
        "ctx64-c1": {
            "labels": {"context": 64, "concurrency": 1},
            "memory": mem,
            "status": "ok",
            "engine_info": {
                "architecture": arch,
                "dtype": "bfloat16",
                "kv_bytes_per_token": 147456,
                "extra": {"num_parameters": 8_000_000_000},
            },
        }
    }
    v = ANALYSIS.verdicts(pd.DataFrame(), cells, {})
    assert v["kv_bytes_per_token_measured"] == 147456 == v["kv_bytes_per_token_analytic"]
    text = " ".join(t for s in ANALYSIS.sections(pd.DataFrame(), {"verdicts": v}) for t in s.text)
    assert "measured 147,456 B" in text and "analytic 147,456 B" in text
