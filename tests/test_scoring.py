"""Scorers: answer extraction and matching."""

import json

import pandas as pd
import pytest

from analysis.scoring import exact_match, extract, multiple_choice, score, scored


@pytest.mark.parametrize(
    "text,how,want",
    [
        ("so 3 + 4 = 7. The answer is 1,234.", "last_number", "1234"),
        (" 68491. Remember it", "first_number", "68491"),
        ("no digits", "last_number", None),
        ("-5.0 apples", "first_number", "-5"),
        ("  Paris.\nmore", None, "paris"),
    ],
)
def test_extract(text, how, want):
    assert extract(text, how) == want


def test_exact_match_and_multiple_choice():
    assert exact_match("17 + 25 = 42", "42", "last_number")
    assert not exact_match("42 or 43", "42", "last_number")
    assert exact_match(" 68491 is it", "68491", "first_number")
    assert multiple_choice(" B. because", "B") and not multiple_choice("Because A", "B")
    assert not multiple_choice("ABCD", "A"), "a letter inside a word is no choice"
    assert score({"scorer": "multiple_choice", "answer": "C"}, "C") is True
    assert score({}, "anything") is None
    with pytest.raises(ValueError, match="unknown scorer"):
        score({"scorer": "bleu", "answer": "x"}, "x")


def test_scored_counts_failed_requests_as_wrong():
    meta = json.dumps({"scorer": "exact_match", "extract": "first_number", "answer": "5", "depth": 0.5})
    df = pd.DataFrame(
        {
            "cell_id": ["a"] * 3,
            "request_id": ["w0", "r0", "r1"],
            "warmup": [True, False, False],
            "ok": [True, True, False],
            "meta": [None, meta, meta],
            "output_text": ["5", "5", "5"],
        }
    )
    s = scored(df)
    assert list(s["request_id"]) == ["r0", "r1"] and list(s["correct"]) == [True, False]
    assert list(s["depth"]) == [0.5, 0.5]
