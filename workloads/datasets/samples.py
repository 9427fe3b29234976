"""The small sample files pdbench ships (data/*.jsonl), in the GSM8K and MMLU row formats.

Synthetic arithmetic problems with correct answers, generated from a fixed seed, so CI and
`pdbench run e4` need no download. Regenerate with `python -m workloads.datasets.samples`;
a test checks the shipped files equal what this module generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workloads.datasets.base import DATA_DIR

_NAMES = ("Ann", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_THINGS = ("apples", "stamps", "marbles", "books", "pencils", "shells", "stickers", "cards")


def gsm8k_rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng([seed, 8])
    rows = []
    for i in range(n):
        name, thing = _NAMES[i % len(_NAMES)], _THINGS[int(rng.integers(len(_THINGS)))]
        a, b = int(rng.integers(12, 90)), int(rng.integers(2, 12))
        kind = i % 3
        if kind == 0:
            q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            work, c = f"{a} + {b} = {a + b}", a + b
        elif kind == 1:
            q = f"{name} has {a} {thing} and gives {b} of them away. How many {thing} are left?"
            work, c = f"{a} - {b} = {a - b}", a - b
        else:
            q = f"A box holds {b} {thing}. {name} fills {a} boxes. How many {thing} is that in all?"
            work, c = f"{a} * {b} = {a * b}", a * b
        rows.append({"question": q, "answer": f"{work}\n#### {c}"})
    return rows


def mmlu_rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng([seed, 4])
    rows = []
    for i in range(n):
        a, b = int(rng.integers(3, 20)), int(rng.integers(3, 20))
        if i % 2 == 0:
            subject, q, c = "elementary_mathematics", f"What is {a} × {b}?", a * b
        else:
            subject, q, c = "miscellaneous", f"How many minutes are there in {a} hours and {b} minutes?", 60 * a + b
        wrong: set[int] = set()
        while len(wrong) < 3:
            d = c + int(rng.integers(-12, 13))
            if d != c and d > 0:
                wrong.add(d)
        choices = [c, *sorted(wrong)]
        order = rng.permutation(4)
        shuffled = [str(choices[j]) for j in order]
        rows.append({"question": q, "subject": subject, "choices": shuffled, "answer": int(np.argmax(order == 0))})
    return rows


GENERATORS = {"gsm8k": gsm8k_rows, "mmlu": mmlu_rows}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_all(folder: Path = DATA_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, gen in GENERATORS.items():
        path = folder / f"{name}.jsonl"
        path.write_text(render(gen()))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all():
        print(p)
