"""Where a model's architecture comes from: a built-in tiny config, a JSON file, a folder, a hub name.

GPU systems runs use architecture configs (configs/models/*.json) with random weights, so the
shapes, memory and KV sizes are real while nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from analysis.kv import kv_bytes_per_token

# Small enough for 2 CPU cores, large enough that a decode step is real matrix work. The wide
# initializer keeps greedy outputs varied on random weights (0.02 collapses to one repeated id).
TINY_QWEN3: dict[str, Any] = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.1,
}

BUILTIN = {"tiny-qwen3": TINY_QWEN3}
MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
)


def resolve_model(name: str) -> tuple[dict[str, Any] | None, str | None]:
    """Return (architecture dict, weights folder or hub name).

    A dict with no weights source means: random weights from the architecture. A folder holding
    weight files, or a name that is neither built in nor on disk (a hub name), means real weights.
    """
    if name in BUILTIN:
        return dict(BUILTIN[name]), None
    for cand in (Path(name), MODELS_DIR / name, MODELS_DIR / f"{name}.json"):
        if cand.is_file():
            return json.loads(cand.read_text()), None
        if cand.is_dir() and (cand / "config.json").is_file():
            cfg = json.loads((cand / "config.json").read_text())
            has_weights = any(cand.glob("*.safetensors")) or any(cand.glob("*.bin"))
            return cfg, str(cand) if has_weights else None
    return None, name


def model_path_problem(name: str) -> str | None:
    """Why `name`, written as a path, names no model here; None for a built-in, a configs/models/
    name, an existing path, or a hub name (`org/model`, checked where the engine loads it).

    Checked where pdbench starts, so a typo fails in one line instead of in the engine actor."""
    path = Path(name).expanduser()
    if name in BUILTIN or (not path.is_absolute() and ((MODELS_DIR / name).exists() or (MODELS_DIR / f"{name}.json").is_file())):
        return None
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.endswith(".json") or path.suffix in (".safetensors", ".bin")
    if not looks_like_path:
        return None
    if not path.exists():
        return f"no such file or folder {name}; give a model folder, a config.json, a configs/models/ name or tiny-qwen3"
    if path.is_dir() and not (path / "config.json").is_file():
        return f"{name} is a folder without a config.json; give a Hugging Face model folder or its config.json"
    return None


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide compute and memory; anything else (paths, versions) is left out."""
    arch = {k: cfg[k] for k in _ARCH_KEYS if cfg.get(k) is not None}
    if "head_dim" not in arch and "hidden_size" in arch:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    return arch


def architecture_hash(arch: dict[str, Any]) -> str:
    blob = json.dumps(arch, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def arch_kv_bytes_per_token(arch: dict[str, Any], dtype: str) -> int:
    return kv_bytes_per_token(
        arch["num_hidden_layers"],
        arch.get("num_key_value_heads", arch["num_attention_heads"]),
        arch["head_dim"],
        dtype,
    )
