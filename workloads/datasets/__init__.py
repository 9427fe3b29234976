"""Datasets for capability checks: one module per dataset family, as vLLM's benchmarks/datasets/.

`load_subset` turns a DatasetSpec into the chosen examples' prompts, answers and provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workloads.datasets import gsm8k, mmlu
from workloads.datasets.base import DatasetSpec, Family, example_id, ids_digest, load_rows, select
from workloads.registry import Registry

FAMILIES: Registry[Family] = Registry("dataset family")
FAMILIES.add("gsm8k", gsm8k.FAMILY)
FAMILIES.add("mmlu", mmlu.FAMILY)


@dataclass(frozen=True)
class Item:
    item_id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Subset:
    items: list[Item]
    provenance: dict[str, Any]


def family(name: str, where: str) -> Family:
    try:
        return FAMILIES.get(name)
    except KeyError as e:
        raise ValueError(f"{where}.family: {e.args[0]}") from None


def load_subset(spec: DatasetSpec, where: str = "params.datasets") -> Subset:
    fam = family(spec.family, where)
    rows = load_rows(spec, where)
    ids = [example_id(r, fam, spec.id_field) for r in rows]
    chosen = select(ids, spec.seed, n=spec.n, fraction=spec.fraction)
    template = spec.template or fam.template
    items = []
    for i in chosen:
        try:
            text = template.format(**fam.fields(rows[i]))
        except (KeyError, IndexError) as e:
            raise ValueError(f"{where}.template: {e!r} is not a field of {fam.name} rows") from None
        items.append(Item(item_id=ids[i], prompt=text, answer=fam.answer(rows[i])))
    chosen_ids = [it.item_id for it in items]
    return Subset(
        items=items,
        provenance={
            "family": fam.name,
            "source": spec.source,
            "config": spec.config,
            "split": spec.split,
            "rows": len(rows),
            "distinct_ids": len(set(ids)),
            "seed": spec.seed,
            "selection": f"n={spec.n}" if spec.n is not None else f"fraction={spec.fraction}",
            "template": template,
            "ids": chosen_ids,
            "ids_sha256": ids_digest(chosen_ids),
        },
    )


__all__ = ["FAMILIES", "DatasetSpec", "Item", "Subset", "load_subset"]
