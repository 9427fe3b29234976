"""Memory decomposition: what engines measured (memory.json) against the analytic model.

Analytic model: weights = parameters × dtype bytes, with the parameter count derived from the
architecture (Llama/Qwen-family decoder: embeddings, attention and gated-MLP projections, RMS
norms); KV cache = tokens held × KV bytes per token (analysis/kv.py). The model has no term for
activations or runtime overhead: those are what measurement adds.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.kv import DTYPE_BYTES, kv_bytes_per_token

COMPONENTS = ("weights_bytes", "kv_cache_bytes", "activation_peak_bytes", "other_bytes")
GIB = 2**30


def param_count(arch: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen-family decoder from its architecture fields.

    Per layer: q, k, v, o projections (+ biases where `attention_bias`), Qwen3's per-head q/k
    RMS norms, two RMS norms, a gated MLP (gate, up, down). Plus embeddings, an untied LM head
    and the final norm.
    """
    h, v, inter = arch["hidden_size"], arch["vocab_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv_heads = arch.get("num_key_value_heads", heads)
    hd = arch.get("head_dim") or h // heads
    q, kv = heads * hd, kv_heads * hd
    attn = h * q + 2 * h * kv + q * h
    if arch.get("attention_bias"):
        attn += q + 2 * kv
    if arch.get("model_type") == "qwen3":
        attn += 2 * hd  # q_norm, k_norm
    layer = attn + 3 * h * inter + 2 * h
    lm_head = 0 if arch.get("tie_word_embeddings") else v * h
    return arch["num_hidden_layers"] * layer + v * h + lm_head + h


def analytic(arch: dict[str, Any], dtype: str, kv_tokens: int) -> dict[str, int]:
    """Weights and KV bytes the analytic model predicts for `kv_tokens` tokens held at once."""
    kvb = kv_bytes_per_token(
        arch["num_hidden_layers"],
        arch.get("num_key_value_heads", arch["num_attention_heads"]),
        arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"],
        dtype,
    )
    return {"weights_bytes": param_count(arch) * DTYPE_BYTES[dtype], "kv_cache_bytes": kv_tokens * kvb, "kv_bytes_per_token": kvb}


def max_concurrency(budget_bytes: float, weights_bytes: float, overhead_bytes: float, context: int, kv_per_token: int) -> int:
    """Largest number of `context`-token sequences whose KV fits beside weights and overhead."""
    free = budget_bytes - weights_bytes - overhead_bytes
    return max(0, math.floor(free / (context * kv_per_token))) if kv_per_token else 0


def decomposition(cells: dict[str, Any], tokens_of: dict[str, int], arch: dict[str, Any] | None, dtype: str) -> pd.DataFrame:
    """One row per cell: measured components (None where nothing was measured) and analytic ones.

    `cells`: cell id → cell meta (labels, memory); `tokens_of`: cell id → tokens the analytic
    model assumes held at the peak (E5: concurrency × context).
    """
    rows = []
    for cid in sorted(cells):
        mem = cells[cid].get("memory") or {}
        row: dict[str, Any] = {"cell": cid, **cells[cid].get("labels", {})}
        measured = bool(mem.get("measured", mem.get("weights_bytes") is not None))
        for k in (*COMPONENTS, "total_bytes"):
            row[f"measured_{k}"] = mem.get(k) if measured else None
        row["source"] = mem.get("source")
        row["device_total_bytes"] = mem.get("device_total_bytes")
        if arch is not None and cid in tokens_of:
            a = analytic(arch, dtype, tokens_of[cid])
            row["analytic_weights_bytes"], row["analytic_kv_cache_bytes"] = a["weights_bytes"], a["kv_cache_bytes"]
            row["kv_bytes_per_token"] = a["kv_bytes_per_token"]
        rows.append(row)
    return pd.DataFrame(rows)
