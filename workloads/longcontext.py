"""Synthetic long-context tasks (E6): passkey retrieval prompts and the YaRN rope configuration.

Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden at a chosen depth of filler
text, then the question. Prompts are built in token space, so each has exactly the requested
length whatever the tokenizer: the filler is tokenized once, repeated, and cut at token
boundaries around the needle. Keys come from a seeded generator: same seed, same prompts.
"""

from __future__ import annotations

import numpy as np

from workloads.requests import RequestSpec
from workloads.text import TextCodec

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def yarn_rope_parameters(factor: float, original_max_position_embeddings: int, rope_theta: float) -> dict:
    """HF config overrides for YaRN, as transformers 5 and vLLM 0.26 read them.

    `rope_parameters` with `rope_type` (never the legacy `type`) and an explicit `rope_theta`
    (left out, it falls back to 10000). `max_position_embeddings` is set to the scaled length:
    transformers derives the YaRN factor from it when the two disagree and warns; vLLM takes
    the context from `max_model_len`, which must not exceed it.
    """
    if factor < 1:
        raise ValueError(f"YaRN factor must be >= 1, got {factor}")
    return {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original_max_position_embeddings),
            "rope_theta": float(rope_theta),
        },
        "max_position_embeddings": int(round(factor * original_max_position_embeddings)),
    }


def passkey_prompt(codec: TextCodec, length: int, depth: float, key: str) -> list[int]:
    """Token ids of exactly `length` tokens with `key` at relative `depth` (0 = start, 1 = end)
    of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    head, needle, tail = codec.encode(INTRO), codec.encode(NEEDLE.format(key=key)), codec.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(
            f"params.native_context/params.max_tokens: a passkey prompt needs at least {length - budget} tokens "
            f"with this tokenizer, but native_context × multiplier − max_tokens leaves {length}"
        )
    unit = codec.encode(FILLER)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    at = int(round(depth * budget))
    return head + filler[:at] + needle + filler[at:] + tail


def passkey_requests(
    codec: TextCodec,
    length: int,
    depths: list[float],
    samples_per_depth: int,
    max_tokens: int,
    warmup: int,
    seed: int,
    prefix: str,
) -> tuple[RequestSpec, ...]:
    """Warm-up prompts (middle depth) first, then `samples_per_depth` prompts per depth.

    `length` is the prompt length; the key of each prompt is drawn from (seed, prefix), so every
    rung of a ladder gets its own keys and reruns get the same ones.
    """
    rng = np.random.default_rng([seed, *prefix.encode()])
    out: list[RequestSpec] = []
    for i in range(warmup):
        key = str(int(rng.integers(10000, 100000)))
        ids = passkey_prompt(codec, length, 0.5, key)
        out.append(RequestSpec(f"w{i:04d}", tuple(ids), max_tokens, warmup=True, meta={"answer": key, "depth": 0.5}))
    j = 0
    for depth in depths:
        for _ in range(samples_per_depth):
            key = str(int(rng.integers(10000, 100000)))
            ids = passkey_prompt(codec, length, depth, key)
            meta = {"answer": key, "depth": depth, "scorer": "exact_match", "extract": "first_number"}
            out.append(RequestSpec(f"r{j:05d}", tuple(ids), max_tokens, meta=meta))
            j += 1
    return tuple(out)
