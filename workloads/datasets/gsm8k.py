"""GSM8K (openai/gsm8k, config `main`): grade-school maths word problems.

Rows: `question`, `answer` (worked solution ending in `#### <number>`). Scored by exact match
of the last number in the output against that final number (lm-eval's flexible extract).
"""

from __future__ import annotations

from workloads.datasets.base import Family


def final_answer(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


FAMILY = Family(
    name="gsm8k",
    key_fields=("question",),
    template="Question: {question}\nAnswer:",
    fields=lambda row: {"question": row["question"]},
    answer=final_answer,
    scorer="exact_match",
    extract="last_number",
    max_tokens=256,
    hub={"source": "openai/gsm8k", "config": "main", "split": "test"},
)
