"""Dataset subsets for capability checks (E4): load with `datasets`, pick a subset by hashed ids.

The subset is chosen by hashing each example's id with a seed (sha256), never by position or
by a random generator over the row order: the same ids and seed give the same subset on any
machine, whatever order the rows arrive in. Two selection rules:

- `fraction`: keep an example when its hash falls below `fraction` of the hash range. Each
  example's membership depends on itself alone, so appending rows never changes whether an old
  row is in the subset.
- `n`: keep the `n` examples with the smallest hashes (a bottom-n sketch). Appended rows can
  only displace members by being selected themselves; no old non-member ever enters.

Datasets without an id field (GSM8K, MMLU) get one from a hash of their identifying content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES = "samples"


class DatasetSpec(BaseModel):
    """One dataset of an E4 run (`params.datasets[i]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: str = Field(description="dataset family: gsm8k or mmlu (decides fields, template, scorer)")
    source: str = Field(
        default=SAMPLES,
        description="'samples' (small files shipped with pdbench), a local .jsonl/.json/.parquet file, "
        "or a hub name (openai/gsm8k, cais/mmlu) on a connected cluster",
    )
    config: str | None = Field(default=None, description="hub configuration (gsm8k: main; mmlu: all)")
    split: str = Field(default="test", description="hub split; local files have one split")
    n: int | None = Field(default=None, ge=1, description="subset size: the n examples with the smallest hashes")
    fraction: float | None = Field(default=None, gt=0, le=1, description="or: each example kept with this probability")
    seed: int = Field(default=0, description="subset seed (independent of the run's seed)")
    id_field: str | None = Field(default=None, description="field holding a stable example id; None: hash of the content")
    template: str | None = Field(default=None, description="prompt template (str.format over the family's fields)")
    max_tokens: int | None = Field(default=None, ge=1, description="output tokens per request; None: the family's default")

    @model_validator(mode="after")
    def _one_rule(self) -> DatasetSpec:
        if (self.n is None) == (self.fraction is None):
            raise ValueError("give exactly one of n (subset size) or fraction")
        return self


@dataclass(frozen=True)
class Family:
    """How one dataset family's rows become prompts and answers."""

    name: str
    key_fields: tuple[str, ...]  # content that identifies an example that has no id
    template: str
    fields: Callable[[dict[str, Any]], dict[str, Any]]  # values the template may use
    answer: Callable[[dict[str, Any]], str]
    scorer: str  # analysis/scoring.py: exact_match or multiple_choice
    max_tokens: int
    extract: str | None = None  # exact_match: how to pull the answer out of the output
    hub: dict[str, str] = field(default_factory=dict)  # where it lives on the hub, for docs and errors


def example_id(row: dict[str, Any], family: Family, id_field: str | None) -> str:
    if id_field is not None:
        if id_field not in row:
            raise ValueError(f"params.datasets.id_field: rows have no field {id_field!r} (fields: {', '.join(row)})")
        return str(row[id_field])
    blob = json.dumps([row.get(f) for f in family.key_fields], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subset_key(example: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{example}".encode()).digest(), "big")


_RANGE = 2**256


def select(ids: list[str], seed: int, n: int | None = None, fraction: float | None = None) -> list[int]:
    """Indices of the chosen examples, ordered by their hash (the order they are sent in).

    Duplicate ids (identical content) count once: the first occurrence.
    """
    first: dict[str, int] = {}
    for i, e in enumerate(ids):
        first.setdefault(e, i)
    keyed = sorted((subset_key(e, seed), i) for e, i in first.items())
    if fraction is not None:
        limit = int(fraction * _RANGE)
        return [i for k, i in keyed if k < limit]
    assert n is not None
    return [i for _, i in keyed[:n]]


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def load_rows(spec: DatasetSpec, where: str) -> list[dict[str, Any]]:
    """Rows of the dataset through `datasets`: the shipped samples, a local file, or the hub."""
    import datasets

    datasets.disable_progress_bars()
    src = spec.source
    if src == SAMPLES:
        path = DATA_DIR / f"{spec.family}.jsonl"
        if not path.is_file():
            raise ValueError(f"{where}.source: pdbench ships no samples for family {spec.family!r}")
        src = str(path)
    p = Path(src)
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
    try:
        if kind is not None:
            if not p.is_file():
                raise ValueError(f"{where}.source: no such file {src}")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        elif p.exists():
            raise ValueError(f"{where}.source: {src} exists but is not a .jsonl, .json or .parquet file")
        else:
            ds = datasets.load_dataset(src, spec.config, split=spec.split)
    except ValueError:
        raise
    except Exception as e:  # offline machine, unknown hub name, bad split
        raise ValueError(
            f"{where}.source: cannot load {src!r} (config {spec.config!r}, split {spec.split!r}): {type(e).__name__}: {str(e)[:300]}"
        ) from None
    return [dict(r) for r in ds]
