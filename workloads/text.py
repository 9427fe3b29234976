"""Text ↔ token ids for tracks whose prompts are text (E4 datasets, E6 passkeys).

`byt5` is the offline default: transformers' ByT5 tokenizer has no vocabulary file to download,
its ids are the UTF-8 bytes of the text plus 3 (0 pad, 1 eos, 2 unk), so any text maps to ids
below 259 on any machine, which fit every model's vocabulary, the tiny one included. Any other
name is loaded with `AutoTokenizer.from_pretrained` (a hub name on a connected cluster, or a
local folder): use the model's own tokenizer when its weights are real.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from workloads.arrivals import Arrival
from workloads.lengths import Fixed, Uniform
from workloads.requests import RequestSpec, WorkloadSpec

BYT5 = "byt5"


@dataclass(frozen=True)
class TextCodec:
    name: str
    tokenizer: Any

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        """Ids outside the tokenizer's vocabulary are dropped: a model with random weights emits
        any id of its own, larger, vocabulary, and those have no text."""
        n = self.vocab_size
        return self.tokenizer.decode([i for i in ids if 0 <= i < n], skip_special_tokens=True)


@lru_cache(maxsize=8)
def get_codec(name: str) -> TextCodec:
    if name == BYT5:
        from transformers import ByT5Tokenizer

        return TextCodec(name, ByT5Tokenizer(extra_ids=0))
    from transformers import AutoTokenizer

    try:
        return TextCodec(name, AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"params.tokenizer: cannot load tokenizer {name!r} ({type(e).__name__}); use 'byt5' offline, "
            "or a hub name / local folder on a machine that has it"
        ) from None


@dataclass(frozen=True)
class TextPrompt:
    """One text request before tokenization; `meta` carries what the scorer needs (answer)."""

    request_id: str
    text: str
    max_tokens: int
    warmup: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def tokenize(prompts: Iterable[TextPrompt], codec: TextCodec) -> tuple[RequestSpec, ...]:
    return tuple(
        RequestSpec(
            request_id=p.request_id,
            prompt_token_ids=tuple(codec.encode(p.text)),
            max_tokens=p.max_tokens,
            warmup=p.warmup,
            meta=dict(p.meta),
        )
        for p in prompts
    )


def workload_of(requests: tuple[RequestSpec, ...], arrival: Arrival) -> WorkloadSpec:
    """A WorkloadSpec that describes prebuilt requests (counts, length bounds), so length checks,
    progress counts and the cell hash see what will really be sent."""

    def dist(values: list[int]):
        lo, hi = min(values), max(values)
        return Fixed(value=lo) if lo == hi else Uniform(low=lo, high=hi)

    if not requests:
        raise ValueError("a cell needs at least one request")
    return WorkloadSpec(
        num_requests=sum(not r.warmup for r in requests),
        warmup_requests=sum(r.warmup for r in requests),
        input_len=dist([max(1, len(r.prompt_token_ids)) for r in requests]),
        output_len=dist([r.max_tokens for r in requests]),
        arrival=arrival,
    )
