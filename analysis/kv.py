"""The analytic KV-cache model, shared by engines (to report it) and analysis (to check it)."""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """KV bytes per token = 2 (K and V) × layers × KV heads × head_dim × dtype bytes.

    Qwen3-8B in bf16: 2 × 36 × 8 × 128 × 2 = 147,456 B = 144 KiB.
    """
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]
