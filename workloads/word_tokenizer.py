"""An offline tokenizer for models run with dummy weights: the word `t<i>` is token id i.

Peer clients (`vllm bench serve`, aiperf, GuideLLM) send text and count tokens with a tokenizer,
and an air-gapped node cannot download a model's real one. A WordLevel vocabulary `t0 … tN-1` over
the model's vocabulary size, split on whitespace, is built here from nothing: a prompt of n words
is exactly n tokens for the client, `vllm serve` and `pdbench serve` alike, and every id a model
emits decodes to a word that encodes back to it. Saved with `save_pretrained`, it loads with
`AutoTokenizer.from_pretrained(folder)` wherever transformers runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from actors.engines.models import resolve_model


def word(i: int) -> str:
    return f"t{i}"


def build_word_tokenizer(vocab_size: int, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    vocab = {word(i): i for i in range(vocab_size)}
    # The model's unknown-word id is t0, but no special token is declared: special ids are
    # skipped when servers detokenise and excluded by clients that sample prompts, and every id
    # here must stay an ordinary word.
    tok = Tokenizer(models.WordLevel(vocab, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)


def model_vocab(model: str) -> tuple[dict, int]:
    """The architecture config of a pdbench model name (tiny-qwen3, a configs/models/ name, a path) and its vocabulary size."""
    arch, _ = resolve_model(model)
    if arch is None or "vocab_size" not in arch:
        raise ValueError(f"--model: {model!r} is not a built-in, configs/models/ or local config with a vocab_size; pass --vocab-size")
    return arch, int(arch["vocab_size"])


def save_word_tokenizer(out: Path, vocab_size: int | None = None, model: str | None = None) -> Path:
    """Write the tokenizer into `out`; with `model`, also its config.json, so `out` is a model
    folder that `vllm serve out --load-format dummy` and `pdbench serve --model out --tokenizer out` share."""
    if (vocab_size is None) == (model is None):
        raise ValueError("give exactly one of --vocab-size and --model")
    arch = None
    if model is not None:
        arch, vocab_size = model_vocab(model)
    assert vocab_size is not None
    out.mkdir(parents=True, exist_ok=True)
    max_len = arch.get("max_position_embeddings") if arch else None
    build_word_tokenizer(vocab_size, max_len).save_pretrained(out)
    if arch is not None:
        (out / "config.json").write_text(json.dumps(arch, indent=1))
    return out
