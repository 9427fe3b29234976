"""E1: TTFT and TPOT over the input × output length grid, as heatmaps, with the per-token
slopes a least-squares line gives (prefill cost per prompt token; decode cost per context token)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.tracks.base import Section, TrackAnalysis


def _p50(m: dict[str, Any] | None, key: str) -> float | None:
    return None if not m or not m.get(key) else m[key].get("p50")


def grid(cells: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for cid, c in sorted(cells.items()):
        lab, m = c.get("labels", {}), c.get("metrics")
        if "input_len" not in lab:
            continue
        rows.append(
            {
                "cell": cid,
                "input_len": lab["input_len"],
                "output_len": lab["output_len"],
                "status": c.get("status", "ok"),
                "ttft_p50_s": _p50(m, "ttft_s"),
                "tpot_p50_s": _p50(m, "tpot_s"),
                "e2e_p50_s": _p50(m, "e2e_s"),
            }
        )
    return pd.DataFrame(rows)


def _slope(x: pd.Series, y: pd.Series) -> float | None:
    ok = y.notna()
    if ok.sum() < 2 or x[ok].nunique() < 2:
        return None
    return float(np.polyfit(x[ok].astype(float), y[ok].astype(float), 1)[0])


class E1Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        g = grid(cells)
        if g.empty:
            return {}
        # TPOT attends over prompt + half the output on average: that is its context.
        context = g["input_len"] + g["output_len"] / 2
        return {
            "grid": g.to_dict(orient="records"),
            "ttft_s_per_input_token": _slope(g["input_len"], g["ttft_p50_s"]),
            "tpot_s_per_context_token": _slope(context, g["tpot_p50_s"]),
        }

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        g = grid(summary.get("cells", {}))
        if g.empty:
            return []
        fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT p50 (ms)", "TPOT p50 (ms)"), horizontal_spacing=0.12)
        for col, key in ((1, "ttft_p50_s"), (2, "tpot_p50_s")):
            piv = g.pivot_table(index="input_len", columns="output_len", values=key, aggfunc="first") * 1e3
            fig.add_trace(
                go.Heatmap(
                    z=piv.values,
                    x=[str(c) for c in piv.columns],
                    y=[str(i) for i in piv.index],
                    text=np.vectorize(lambda z: "" if np.isnan(z) else f"{z:.3g}")(piv.values),
                    texttemplate="%{text}",
                    colorscale="Viridis",
                    colorbar={"x": 0.45 if col == 1 else 1.0},
                ),
                1,
                col,
            )
            fig.update_xaxes(title_text="output tokens", type="category", row=1, col=col)
            fig.update_yaxes(title_text="input tokens", type="category", row=1, col=col)
        fig.update_layout(title="E1: latency over the length grid (concurrency 1)", height=440)
        text = ["One request at a time: TTFT is the engine's prefill plus the actor round trip; TPOT its decode step."]
        if v.get("ttft_s_per_input_token") is not None:
            text.append(
                "Prefill cost (least-squares slope of TTFT p50 over input length): "
                f"{v['ttft_s_per_input_token'] * 1e6:.3g} µs per prompt token."
            )
        if v.get("tpot_s_per_context_token") is not None:
            text.append(
                "Decode cost growth (slope of TPOT p50 over context length): "
                f"{v['tpot_s_per_context_token'] * 1e9:.3g} ns per context token."
            )
        table = g.assign(**{k.replace("_s", "_ms"): g[k] * 1e3 for k in ("ttft_p50_s", "tpot_p50_s", "e2e_p50_s")}).drop(
            columns=["ttft_p50_s", "tpot_p50_s", "e2e_p50_s"]
        )
        return [Section(title="E1: latency vs lengths", text=text, table=table, figures=[fig])]


ANALYSIS = E1Analysis()
