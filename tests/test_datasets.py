"""Deterministic dataset subsets: same on any machine, robust to row order and appended rows."""

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from workloads.datasets import DatasetSpec, load_subset
from workloads.datasets.base import DATA_DIR, select
from workloads.datasets.samples import GENERATORS, render


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_gsm8k(n, start=0):
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(start, start + n)]


def test_shipped_samples_are_what_the_generator_makes():
    for name, gen in GENERATORS.items():
        assert (DATA_DIR / f"{name}.jsonl").read_text() == render(gen()), f"regenerate with python -m workloads.datasets.samples ({name})"


def test_subset_is_stable_across_processes():
    code = textwrap.dedent(
        """
        from workloads.datasets import DatasetSpec, load_subset
        print(load_subset(DatasetSpec(family="mmlu", n=10, seed=3)).provenance["ids_sha256"])
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": s, "PATH": "", "HF_DATASETS_CACHE": "/tmp/tracks-hf-cache"},
        ).stdout.strip()
        for s in ("1", "2")
    }
    here = load_subset(DatasetSpec(family="mmlu", n=10, seed=3)).provenance["ids_sha256"]
    assert outs == {here}


def test_subset_ignores_row_order_and_changes_with_seed(tmp_path):
    rows = rows_gsm8k(100)
    a = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "a.jsonl", rows)), n=12))
    b = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "b.jsonl", rows[::-1])), n=12))
    c = load_subset(DatasetSpec(family="gsm8k", source=str(tmp_path / "a.jsonl"), n=12, seed=1))
    assert a.provenance["ids"] == b.provenance["ids"] and len(a.items) == 12
    assert a.provenance["ids"] != c.provenance["ids"]
    assert [i.prompt for i in a.items] == [i.prompt for i in b.items]


def test_appended_rows_never_change_old_membership_under_fraction(tmp_path):
    old = rows_gsm8k(400)
    grown = old + rows_gsm8k(200, start=400)
    a = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "old.jsonl", old)), fraction=0.1))
    b = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "new.jsonl", grown)), fraction=0.1))
    old_ids = {i.item_id for i in load_subset(DatasetSpec(family="gsm8k", source=str(tmp_path / "old.jsonl"), fraction=1.0)).items}
    assert {i for i in b.provenance["ids"] if i in old_ids} == set(a.provenance["ids"])
    assert 20 < len(a.items) < 60  # ≈ 10% of 400


def test_appended_rows_only_displace_by_being_chosen_under_n(tmp_path):
    old = rows_gsm8k(300)
    grown = old + rows_gsm8k(30, start=300)
    a = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "old.jsonl", old)), n=20))
    b = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "new.jsonl", grown)), n=20))
    new_ids = set(b.provenance["ids"]) - set(a.provenance["ids"])
    appended = {i.item_id for i in load_subset(DatasetSpec(family="gsm8k", source=str(tmp_path / "new.jsonl"), fraction=1.0)).items} - {
        i.item_id for i in load_subset(DatasetSpec(family="gsm8k", source=str(tmp_path / "old.jsonl"), fraction=1.0)).items
    }
    assert new_ids <= appended, "no old non-member enters the subset"
    assert len(set(a.provenance["ids"]) - set(b.provenance["ids"])) == len(new_ids)


def test_jsonl_and_parquet_load_the_same_subset(tmp_path):
    rows = [json.loads(line) for line in (DATA_DIR / "mmlu.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    a = load_subset(DatasetSpec(family="mmlu", source=str(tmp_path / "m.parquet"), n=8))
    b = load_subset(DatasetSpec(family="mmlu", n=8))
    assert a.provenance["ids"] == b.provenance["ids"]
    assert [i.prompt for i in a.items] == [i.prompt for i in b.items] and all(i.answer in "ABCD" for i in a.items)


def test_id_field_and_duplicates(tmp_path):
    rows = [{"id": f"x{i}", "question": "same?", "answer": "#### 1"} for i in range(5)]
    by_field = load_subset(DatasetSpec(family="gsm8k", source=str(write_jsonl(tmp_path / "d.jsonl", rows)), n=10, id_field="id"))
    by_content = load_subset(DatasetSpec(family="gsm8k", source=str(tmp_path / "d.jsonl"), n=10))
    assert sorted(by_field.provenance["ids"]) == [f"x{i}" for i in range(5)]
    assert len(by_content.items) == 1 and by_content.provenance["distinct_ids"] == 1
    assert sorted(select(["a", "b", "a"], seed=0, n=5)) == [0, 1], "a duplicate id counts once, at its first row"


def test_family_answers_and_templates():
    g = load_subset(DatasetSpec(family="gsm8k", n=64))
    assert all(i.answer.lstrip("-").isdigit() for i in g.items)
    assert all(i.prompt.startswith("Question: ") and i.prompt.endswith("\nAnswer:") for i in g.items)
    t = load_subset(DatasetSpec(family="gsm8k", n=2, template="Q: {question} A:"))
    assert t.items[0].prompt.startswith("Q: ") and t.provenance["template"] == "Q: {question} A:"


@pytest.mark.parametrize(
    "spec,msg",
    [
        (dict(family="gsm8k", source="/no/such.jsonl", n=3), "params.datasets.source: no such file"),
        (dict(family="gsm8k", n=3, template="{nope}"), "params.datasets.template"),
        (dict(family="gsm8k", n=3, id_field="uid"), "params.datasets.id_field"),
        (dict(family="trivia", n=3), "params.datasets.family: unknown dataset family 'trivia'"),
    ],
)
def test_errors_name_the_field(spec, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        load_subset(DatasetSpec(**spec))


def test_exactly_one_selection_rule():
    with pytest.raises(ValueError, match="exactly one of n"):
        DatasetSpec(family="gsm8k")
    with pytest.raises(ValueError, match="exactly one of n"):
        DatasetSpec(family="gsm8k", n=3, fraction=0.5)
