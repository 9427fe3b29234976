"""MMLU (cais/mmlu, config `all`): four-way multiple choice over 57 subjects.

Rows: `question`, `subject`, `choices` (four strings), `answer` (index 0–3). The prompt lists
the choices as A–D; scored by the first standalone letter A–D in the output.
"""

from __future__ import annotations

from workloads.datasets.base import Family

LETTERS = "ABCD"


def _fields(row: dict) -> dict:
    choices = list(row["choices"])
    if len(choices) != len(LETTERS):
        raise ValueError(f"mmlu rows need {len(LETTERS)} choices, got {len(choices)}")
    return {
        "question": row["question"],
        "subject": str(row.get("subject", "")).replace("_", " "),
        **dict(zip(LETTERS, choices, strict=True)),
    }


def _answer(row: dict) -> str:
    a = row["answer"]
    return a if isinstance(a, str) and a in LETTERS else LETTERS[int(a)]


FAMILY = Family(
    name="mmlu",
    key_fields=("subject", "question", "choices"),
    template=("The following is a multiple choice question about {subject}.\n\n{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"),
    fields=_fields,
    answer=_answer,
    scorer="multiple_choice",
    max_tokens=4,
    hub={"source": "cais/mmlu", "config": "all", "split": "test"},
)
