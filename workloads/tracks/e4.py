"""E4 — capability on a deterministic subset: dataset items chosen by hashed ids, scored.

One cell per dataset. Items are rendered with the family's template, tokenized in the driver
(`params.tokenizer`), sent closed loop, and the outputs decoded back and scored in analysis
(exact match, multiple choice). The manifest records each subset's ids and their hash.
"""

from __future__ import annotations

from pydantic import Field

from workloads.arrivals import ClosedLoop
from workloads.datasets import FAMILIES, DatasetSpec, load_subset
from workloads.requests import WorkloadSpec
from workloads.text import BYT5, TextPrompt, get_codec, tokenize, workload_of
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E4Params(TrackParams):
    datasets: list[DatasetSpec] = Field(default=[DatasetSpec(family="gsm8k", n=200), DatasetSpec(family="mmlu", n=200)], min_length=1)
    tokenizer: str = Field(default=BYT5, description="'byt5' (offline byte-level), or the model's tokenizer (hub name or folder)")


@register
class E4(Track[E4Params]):
    name = "e4"
    question = "capability on a deterministic subset"
    params_model = E4Params
    measures_latency = False  # accuracy: cells may share cores
    quick_defaults = {
        "workload": {"warmup_requests": 1, "arrival": {"kind": "closed", "concurrency": 4}},
        "params": {
            "datasets": [
                {"family": "gsm8k", "n": 16, "max_tokens": 12},
                {"family": "mmlu", "n": 16, "max_tokens": 4},
            ]
        },
    }

    def cells(self, workload: WorkloadSpec, params: E4Params) -> list[CellPlan]:
        if not isinstance(workload.arrival, ClosedLoop):
            raise ValueError("workload.arrival: E4 sends dataset items closed loop; use {kind: closed, concurrency: N}")
        codec = get_codec(params.tokenizer)
        out: list[CellPlan] = []
        for i, spec in enumerate(params.datasets):
            where = f"params.datasets[{i}]"
            subset = load_subset(spec, where)
            if not subset.items:
                raise ValueError(f"{where}: the subset is empty (rows: {subset.provenance['rows']}); raise n or fraction")
            fam = FAMILIES.get(spec.family)
            max_tokens = spec.max_tokens or fam.max_tokens
            meta = {"scorer": fam.scorer, "extract": fam.extract}
            warm = [
                TextPrompt(f"w{j:04d}", it.prompt, max_tokens, warmup=True) for j, it in enumerate(subset.items[: workload.warmup_requests])
            ]
            measured = [
                TextPrompt(f"r{j:05d}", it.prompt, max_tokens, meta={**meta, "item_id": it.item_id, "answer": it.answer})
                for j, it in enumerate(subset.items)
            ]
            requests = tokenize([*warm, *measured], codec)
            cell_id = spec.family if sum(d.family == spec.family for d in params.datasets) == 1 else f"{spec.family}-{i}"
            out.append(
                CellPlan(
                    cell_id=cell_id,
                    serving_mode="aggregated",
                    workload=workload_of(requests, workload.arrival),
                    labels={"dataset": spec.family, "source": spec.source, "n": len(subset.items)},
                    requests=requests,
                    tokenizer=params.tokenizer,
                    provenance={"dataset_subset": subset.provenance},
                )
            )
        return out
