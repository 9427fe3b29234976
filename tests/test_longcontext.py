"""E6's prompts and rope configuration: exact lengths, keys where asked, YaRN as transformers reads it."""

import logging

import pytest

from workloads.longcontext import NEEDLE, passkey_prompt, passkey_requests, yarn_rope_parameters
from workloads.text import BYT5, get_codec


@pytest.fixture(scope="module")
def codec():
    return get_codec(BYT5)


def test_byt5_codec_is_offline_bytes_and_drops_unknown_ids(codec):
    ids = codec.encode("Hé!")
    assert ids == [b + 3 for b in "Hé!".encode()] and codec.vocab_size == 259
    assert codec.decode([*ids, 1000, 5000, -1]) == "Hé!"


@pytest.mark.parametrize("length", [300, 777, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_key_at_depth(codec, length, depth):
    ids = passkey_prompt(codec, length, depth, "48213")
    assert len(ids) == length
    text = codec.decode(ids)
    needle = NEEDLE.format(key="48213")
    at = text.index(needle)
    assert text.count("48213") == 2
    # Relative position of the needle inside the filler matches the depth (within one filler sentence).
    filler_start = text.index("The grass") if depth > 0 else at
    filler_end = text.rindex("\nWhat is the pass key?") - len(needle)
    if filler_end > filler_start:
        assert abs((at - filler_start) / (filler_end - filler_start) - depth) < 0.05


def test_passkey_prompt_refuses_too_short(codec):
    with pytest.raises(ValueError, match="at least"):
        passkey_prompt(codec, 50, 0.5, "12345")


def test_passkey_requests_are_deterministic_and_distinct_per_rung(codec):
    a = passkey_requests(codec, 400, [0.1, 0.9], 2, 8, warmup=1, seed=0, prefix="x1")
    b = passkey_requests(codec, 400, [0.1, 0.9], 2, 8, warmup=1, seed=0, prefix="x1")
    c = passkey_requests(codec, 400, [0.1, 0.9], 2, 8, warmup=1, seed=0, prefix="x2")
    assert a == b and [r.meta.get("answer") for r in a] != [r.meta.get("answer") for r in c]
    assert [r.warmup for r in a] == [True, False, False, False, False]
    assert [r.meta["depth"] for r in a[1:]] == [0.1, 0.1, 0.9, 0.9]
    assert all(r.meta["scorer"] == "exact_match" and len(r.meta["answer"]) == 5 for r in a[1:])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _rope_warnings(make) -> list[str]:
    """transformers logs through its own non-propagating logger: listen to it directly."""
    log = logging.getLogger("transformers")
    h = _Records()
    log.addHandler(h)
    try:
        make()
    finally:
        log.removeHandler(h)
    return [m for m in h.messages if "rope" in m.lower()]


def test_yarn_config_is_what_transformers_qwen3_accepts():
    """transformers 5's Qwen3Config takes the overrides as given, validates them, warns about nothing,
    and builds YaRN rotary embeddings from them (attention scaling > 1)."""
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    over = yarn_rope_parameters(4.0, 32768, 1e6)
    assert over == {
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
        "max_position_embeddings": 131072,
    }
    made = []
    assert _rope_warnings(lambda: made.append(Qwen3Config(num_hidden_layers=2, **over))) == []
    cfg = made[0]
    assert cfg.rope_parameters == over["rope_parameters"] and cfg.max_position_embeddings == 131072
    # Negative control: Qwen3-8B's own max_position_embeddings (40960) beside factor 4 draws a warning.
    assert _rope_warnings(lambda: Qwen3Config(num_hidden_layers=2, **{**over, "max_position_embeddings": 40960}))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    assert scaling == pytest.approx(0.1 * __import__("math").log(4.0) + 1.0)
    assert inv_freq.shape[0] == cfg.head_dim // 2
    # The same config with a missing factor is refused by transformers itself.
    with pytest.raises(KeyError, match="factor"):
        Qwen3Config(rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 32768, "rope_theta": 1e6})
    with pytest.raises(ValueError, match=">= 1"):
        yarn_rope_parameters(0.5, 1024, 1e6)
