"""The offline WordLevel tokenizer: one word is one token, both ways, wherever it is loaded."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from workloads.word_tokenizer import save_word_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("words"), vocab_size=2048)


def test_round_trip_and_exact_lengths(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 2048 and tok.all_special_ids == []
    ids = [0, 5, 2047, 17, 17, 1000]
    text = tok.decode(ids)
    assert text == "t0 t5 t2047 t17 t17 t1000"
    assert tok.encode(text, add_special_tokens=False) == ids
    # Any whitespace splits; n words are n tokens, special tokens are never added.
    assert tok.encode("t3\n t4\tt5  t6", add_special_tokens=False) == [3, 4, 5, 6]
    assert len(tok("t1 t2 t3")["input_ids"]) == 3
    # A word outside the vocabulary is still one token (t0), so lengths stay exact.
    assert tok.encode("hello t9", add_special_tokens=False) == [0, 9]


def test_vllm_random_dataset_style_prompts_keep_their_length(tok_dir):
    """vllm bench's random dataset decodes sampled ids, re-encodes, and keeps the text only if the
    count holds: every sample of n ids must come back as the same n ids."""
    import random

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(0)
    for n in (1, 7, 1024):
        ids = [rng.randrange(2048) for _ in range(n)]
        assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids


def test_model_folder_carries_the_architecture(tmp_path):
    out = save_word_tokenizer(tmp_path / "qwen3-8b-words", model="qwen3-8b")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["vocab_size"] == 151936
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 151936 and tok.model_max_length == cfg["max_position_embeddings"]
    assert tok.decode([151935]) == "t151935"


def test_cli_builds_and_names_bad_input(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    r = CliRunner().invoke(app, ["tokenizer", "build", "--out", str(tmp_path / "t"), "--model", "tiny-qwen3"])
    assert r.exit_code == 0, r.output
    assert len(AutoTokenizer.from_pretrained(tmp_path / "t")) == 2048
    r = CliRunner().invoke(app, ["tokenizer", "build", "--out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "--vocab-size" in r.output and "--model" in r.output
    r = CliRunner().invoke(app, ["tokenizer", "build", "--out", str(tmp_path / "u"), "--model", "no-such-model"])
    assert r.exit_code == 2 and "no-such-model" in r.output
