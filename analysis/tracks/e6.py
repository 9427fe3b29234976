"""E6: per rung of the context ladder, latency, memory and passkey retrieval accuracy."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.scoring import scored
from analysis.tracks.base import Section, TrackAnalysis
from analysis.tracks.e4 import random_weights, wilson

MIB = 2**20

RANDOM_WEIGHTS_NOTE = (
    "Random weights: the model's weights are random, so it cannot retrieve a passkey and the retrieval accuracy "
    "below is meaningless as a long-context quality measure (computed honestly all the same). Latency and memory "
    "per rung are real. Run E6 with real weights (engine.model = a hub name or a folder with weights, and the "
    "model's tokenizer in params.tokenizer) to measure retrieval."
)


def _q(m: dict[str, Any] | None, key: str, q: str = "p50") -> float | None:
    return None if not m or not m.get(key) else m[key].get(q)


class E6Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        rows = scored(requests)
        rungs = []
        for cid in sorted(cells, key=lambda c: cells[c].get("labels", {}).get("context", 0)):
            c = cells[cid]
            lab, m, mem = c.get("labels", {}), c.get("metrics"), c.get("memory") or {}
            g = rows[rows["cell_id"] == cid] if not rows.empty else rows
            n, k = int(len(g)), int(g["correct"].sum()) if len(g) else 0
            lo, hi = wilson(k, n)
            by_depth = {str(d): float(x["correct"].mean()) for d, x in g.groupby("depth")} if n else {}
            measured = mem.get("measured", False)
            rungs.append(
                {
                    "cell": cid,
                    "multiplier": lab.get("multiplier"),
                    "context": lab.get("context"),
                    "yarn_factor": lab.get("yarn_factor"),
                    "rope": ((c.get("engine_info") or {}).get("architecture") or {}).get("rope_parameters"),
                    "ttft_p50_s": _q(m, "ttft_s"),
                    "tpot_p50_s": _q(m, "tpot_s"),
                    "e2e_p50_s": _q(m, "e2e_s"),
                    "prefill_p50_s": _q(m, "prefill_s"),
                    "memory_total_bytes": mem.get("total_bytes") if measured else None,
                    "kv_cache_bytes": mem.get("kv_cache_bytes") if measured else None,
                    "activation_peak_bytes": mem.get("activation_peak_bytes") if measured else None,
                    "passkeys": n,
                    "retrieved": k,
                    "accuracy": k / n if n else None,
                    "ci95": [lo, hi],
                    "accuracy_by_depth": by_depth,
                }
            )
        return {"rungs": rungs, "random_weights": random_weights(cells)}

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        if not v.get("rungs"):
            return []
        r = pd.DataFrame(v["rungs"])
        table = pd.DataFrame(
            {
                "rung": r["cell"],
                "context": r["context"],
                "YaRN factor": [f"{f:g}" if f is not None and f == f else "none (native rope)" for f in r["yarn_factor"]],
                "TTFT p50 ms": r["ttft_p50_s"] * 1e3,
                "TPOT p50 ms": r["tpot_p50_s"] * 1e3,
                "memory MiB": r["memory_total_bytes"].astype("float64") / MIB,
                "KV MiB": r["kv_cache_bytes"].astype("float64") / MIB,
                "activation MiB": r["activation_peak_bytes"].astype("float64") / MIB,
                "retrieved": [f"{k}/{n}" for k, n in zip(r["retrieved"], r["passkeys"], strict=True)],
                "accuracy": r["accuracy"],
                "by depth": [", ".join(f"{d}: {a:.2f}" for d, a in sorted(bd.items())) for bd in r["accuracy_by_depth"]],
            }
        )
        text = [
            "Rung ×m runs at m × native context with YaRN factor m (×1: the model's own rope); every rung asks for "
            "passkeys hidden at the configured depths of filler text."
        ]
        if v.get("random_weights"):
            text.insert(0, RANDOM_WEIGHTS_NOTE)
        fig = make_subplots(rows=1, cols=3, subplot_titles=("TTFT p50 (ms)", "memory peak (MiB)", "passkey accuracy"))
        fig.add_trace(go.Scatter(x=r["context"], y=r["ttft_p50_s"] * 1e3, mode="lines+markers", name="TTFT p50"), 1, 1)
        memory = go.Scatter(x=r["context"], y=r["memory_total_bytes"].astype("float64") / MIB, mode="lines+markers", name="memory")
        fig.add_trace(memory, 1, 2)
        fig.add_trace(go.Scatter(x=r["context"], y=r["accuracy"], mode="lines+markers", name="accuracy"), 1, 3)
        fig.update_xaxes(title_text="context tokens", type="log")
        fig.update_layout(title="E6: the context ladder", height=400, showlegend=False)
        return [Section(title="E6: long context beyond native", text=text, table=table, figures=[fig])]


ANALYSIS = E6Analysis()
