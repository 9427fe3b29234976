"""E4: accuracy per dataset subset, with the subset's identity (ids hash) beside it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.scoring import scored
from analysis.tracks.base import Section, TrackAnalysis

RANDOM_WEIGHTS_NOTE = (
    "Random weights: the model's weights are random (built from a seed, or loaded as dummy weights): its answers carry no "
    "knowledge, so this accuracy is meaningless as a capability measure. It is computed honestly all the "
    "same, and shows that prompts, generation, decoding and scoring work end to end."
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """95% Wilson score interval of a proportion: honest at small n and at 0 or n successes."""
    if n == 0:
        return None, None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def random_weights(cells: dict[str, Any]) -> bool:
    return any((c.get("engine_info") or {}).get("random_weights") for c in cells.values())


class E4Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        rows = scored(requests)
        out = {}
        for cid in sorted(cells):
            g = rows[rows["cell_id"] == cid] if not rows.empty else rows
            n, k = int(len(g)), int(g["correct"].sum()) if len(g) else 0
            lo, hi = wilson(k, n)
            sub = (cells[cid].get("provenance") or {}).get("dataset_subset", {})
            out[cid] = {
                "dataset": sub.get("family"),
                "source": sub.get("source"),
                "items": n,
                "correct": k,
                "accuracy": k / n if n else None,
                "ci95": [lo, hi],
                "failed_requests": int((~g["ok"].astype(bool)).sum()) if n else 0,
                "subset_ids_sha256": sub.get("ids_sha256"),
                "subset_rule": sub.get("selection"),
                "subset_seed": sub.get("seed"),
                "dataset_rows": sub.get("rows"),
            }
        return {"accuracy": out, "random_weights": random_weights(cells)}

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        acc = v.get("accuracy")
        if not acc:
            return []
        table = pd.DataFrame(
            [
                {
                    "cell": cid,
                    "dataset": a["dataset"],
                    "source": a["source"],
                    "accuracy": a["accuracy"],
                    "95% CI": "—" if a["ci95"][0] is None else f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]",
                    "correct/items": f"{a['correct']}/{a['items']}",
                    "subset": f"{a['subset_rule']} of {a['dataset_rows']} rows, seed {a['subset_seed']}",
                    "ids sha256": str(a["subset_ids_sha256"])[:16],
                }
                for cid, a in sorted(acc.items())
            ]
        )
        text = [
            "Each subset is chosen by hashing example ids with a seed: the same on any machine, and stable when the "
            "dataset grows. The full id lists are in manifest.json (provenance)."
        ]
        if v.get("random_weights"):
            text.insert(0, RANDOM_WEIGHTS_NOTE)
        secs = [Section(title="E4: accuracy on deterministic subsets", text=text, table=table)]
        rows = scored(requests)
        if not rows.empty:
            rows = rows.sort_values(["cell_id", "request_id"])
            sample = (
                rows.groupby("cell_id")
                .head(5)
                .assign(output_ids=lambda d: [" ".join(str(int(i)) for i in ids[:8]) for ids in d["output_token_ids"]])[
                    ["cell_id", "request_id", "item_id", "answer", "output_text", "output_ids", "correct"]
                ]
            )
            secs.append(
                Section(
                    title="E4: sample outputs",
                    text=[
                        "First five scored items per dataset: the decoded text and the first generated ids (ids the "
                        "tokenizer does not know, as random weights emit, decode to nothing)."
                    ],
                    table=sample,
                )
            )
        return secs


ANALYSIS = E4Analysis()
