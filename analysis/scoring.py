"""Scorers for capability checks: a generated text against a reference answer.

Each request of a scored track carries `meta` (JSON) naming its scorer, how to extract the answer
from the output, and the reference: E4 dataset items, E6 passkeys.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-D])\b")


def _number(s: str) -> str:
    s = s.replace(",", "")
    return s[:-2] if s.endswith(".0") else s


def extract(text: str, how: str | None) -> str | None:
    """`last_number` (GSM8K: the final number of a worked answer), `first_number` (a passkey
    right after the question), or None: the first line, stripped."""
    if how in ("last_number", "first_number"):
        found = _NUMBER.findall(text)
        if not found:
            return None
        return _number(found[-1] if how == "last_number" else found[0])
    if how is None:
        line = text.strip().splitlines()[0] if text.strip() else ""
        return line.strip().rstrip(".").lower() or None
    raise ValueError(f"unknown answer extraction {how!r}")


def exact_match(text: str, answer: str, how: str | None) -> bool:
    got = extract(text, how)
    want = _number(answer.strip()) if how in ("last_number", "first_number") else answer.strip().rstrip(".").lower()
    return got is not None and got == want


def multiple_choice(text: str, answer: str) -> bool:
    """The first standalone letter A–D in the output is the choice."""
    m = _LETTER.search(text)
    return m is not None and m.group(1) == answer.strip().upper()


def score(meta: dict[str, Any], text: str | None) -> bool | None:
    """None where the request has no scorer (warm-up) or produced no text."""
    scorer = meta.get("scorer")
    if scorer is None or text is None:
        return None
    if scorer == "exact_match":
        return exact_match(text, str(meta["answer"]), meta.get("extract"))
    if scorer == "multiple_choice":
        return multiple_choice(text, str(meta["answer"]))
    raise ValueError(f"unknown scorer {scorer!r}")


def scored(df: pd.DataFrame) -> pd.DataFrame:
    """Measured rows with their meta unpacked and a `correct` column (False for a failed request)."""
    if df.empty or "meta" not in df:
        return df.iloc[0:0].assign(correct=pd.Series(dtype="boolean"))
    rows = df[~df["warmup"].astype(bool) & df["meta"].notna()].copy()
    metas = [json.loads(m) for m in rows["meta"]]
    texts = rows["output_text"] if "output_text" in rows else pd.Series([None] * len(rows), index=rows.index)
    rows["answer"] = [m.get("answer") for m in metas]
    rows["depth"] = [m.get("depth") for m in metas]
    rows["item_id"] = [m.get("item_id") for m in metas]
    rows["correct"] = [bool(ok) and bool(score(m, t)) for m, t, ok in zip(metas, texts, rows["ok"].astype(bool), strict=True)]
    return rows
