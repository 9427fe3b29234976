"""E5: where the memory goes, measured against the analytic model, and the largest concurrency
that fits each context length."""

from __future__ import annotations

from typing import Any, cast

import pandas as pd
import plotly.graph_objects as go

from analysis.memory import COMPONENTS, GIB, decomposition, max_concurrency
from analysis.tracks.base import Section, TrackAnalysis

_NAMES = {"weights_bytes": "weights", "kv_cache_bytes": "KV cache", "activation_peak_bytes": "activation peak", "other_bytes": "other"}
_COLORS = {"weights_bytes": "#1f77b4", "kv_cache_bytes": "#d62728", "activation_peak_bytes": "#ff7f0e", "other_bytes": "#7f7f7f"}
MIB = 2**20


def _arch(cells: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    for c in cells.values():
        info = c.get("engine_info") or {}
        if info.get("architecture") and "num_hidden_layers" in info["architecture"]:
            return {k: v for k, v in info["architecture"].items() if k != "hash"}, info.get("dtype", "float32")
    return None, "float32"


class E5Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        arch, dtype = _arch(cells)
        tokens = {c: m["labels"]["context"] * m["labels"]["concurrency"] for c, m in cells.items() if "context" in m.get("labels", {})}
        t = decomposition(cells, tokens, arch, dtype)
        if t.empty:
            return {}
        measured = t["measured_total_bytes"].notna()
        budget, budget_source = None, None
        if params.get("memory_budget_gib"):
            budget, budget_source = params["memory_budget_gib"] * GIB, "params.memory_budget_gib"
        elif t["device_total_bytes"].notna().any():
            budget, budget_source = float(t["device_total_bytes"].dropna().median()), "device memory reported by the engine"
        fits = []
        for ctx, g in t.groupby("context", sort=True):
            ctx = cast(int, ctx)  # a groupby key: pandas-stubs types it as any scalar
            row: dict[str, Any] = {"context": int(ctx), "concurrencies_run": sorted(int(c) for c in g["concurrency"])}
            gm = g[g["measured_total_bytes"].notna()]
            if budget is not None and not gm.empty:
                ok = gm[gm["measured_total_bytes"] <= budget]
                row["measured_max_concurrency"] = int(ok["concurrency"].max()) if not ok.empty else 0
            if budget is not None and arch is not None and "kv_bytes_per_token" in g:
                overhead = float((gm["measured_activation_peak_bytes"] + gm["measured_other_bytes"]).median()) if not gm.empty else 0.0
                row["analytic_max_concurrency"] = max_concurrency(
                    budget, float(g["analytic_weights_bytes"].iloc[0]), overhead, int(ctx), int(g["kv_bytes_per_token"].to_numpy()[0])
                )
                row["overhead_assumed_bytes"] = overhead
            fits.append(row)
        kv_ratio = (t["measured_kv_cache_bytes"] / t["analytic_kv_cache_bytes"]).where(measured)
        # Engines with a fixed KV pool (vLLM) say how many tokens it holds: bytes per token measured.
        pools = [m["memory"] for m in cells.values() if (m.get("memory") or {}).get("kv_cache_tokens")]
        per_token = {}
        if pools and "kv_bytes_per_token" in t:
            per_token = {
                "kv_bytes_per_token_measured": pools[0]["kv_cache_bytes"] / pools[0]["kv_cache_tokens"],
                "kv_bytes_per_token_analytic": int(t["kv_bytes_per_token"].iloc[0]),
            }
        return {
            **per_token,
            "rows": t.astype(object).where(t.notna(), None).to_dict(orient="records"),
            "measured": bool(measured.any()),
            "sources": sorted({s for s in t["source"].dropna()}),
            "budget_bytes": budget,
            "budget_source": budget_source,
            "fits": fits,
            "kv_measured_over_analytic": {"min": _f(kv_ratio.min()), "max": _f(kv_ratio.max())},
            "weights_measured_over_analytic": _f((t["measured_weights_bytes"] / t["analytic_weights_bytes"]).where(measured).median()),
        }

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        if not v.get("rows"):
            return []
        t = pd.DataFrame(v["rows"])
        text = [
            "Analytic model: weights = parameters × dtype bytes; KV = concurrency × context × KV bytes per token "
            "(2 × layers × KV heads × head_dim × dtype bytes). It has no activation or runtime term: those are measured only.",
            "Measured: "
            + ("; ".join(v["sources"]) if v.get("measured") else "nothing (simulated engine): only the analytic bars are shown."),
        ]
        kv = v.get("kv_measured_over_analytic") or {}
        if kv.get("min") is not None:
            text.append(
                f"Measured KV / analytic KV: {kv['min']:.3f} … {kv['max']:.3f} (1.0 when every request of the wave was resident at once)."
            )
        if v.get("kv_bytes_per_token_measured") is not None:
            text.append(
                f"KV bytes per token: measured {v['kv_bytes_per_token_measured']:,.0f} B (the engine's KV pool bytes ÷ the "
                f"tokens it holds) vs analytic {v['kv_bytes_per_token_analytic']:,} B."
            )
        if v.get("weights_measured_over_analytic") is not None:
            text.append(f"Measured weights / analytic weights: {v['weights_measured_over_analytic']:.4f} (measured counts buffers too).")
        if v.get("budget_bytes"):
            text.append(
                f"Budget for 'fits': {v['budget_bytes'] / GIB:.3g} GiB ({v['budget_source']}). Measured: largest concurrency run whose "
                "measured peak stayed inside it (a cell that failed, e.g. out of memory, does not fit). Analytic: (budget − "
                "analytic weights − measured activation and other) / (context × KV bytes per token)."
            )
        table = pd.DataFrame(
            {
                "cell": t["cell"],
                "context": t["context"],
                "concurrency": t["concurrency"],
                **{f"{_NAMES[k]} MiB": t[f"measured_{k}"] / MIB for k in COMPONENTS},
                "total MiB": t["measured_total_bytes"] / MIB,
                "analytic weights MiB": t["analytic_weights_bytes"] / MIB if "analytic_weights_bytes" in t else None,
                "analytic KV MiB": t["analytic_kv_cache_bytes"] / MIB if "analytic_kv_cache_bytes" in t else None,
            }
        )
        secs = [Section(title="E5: memory decomposition, measured vs analytic", text=text, table=table, figures=[self._bars(t)])]
        if v.get("fits"):
            fits = pd.DataFrame(v["fits"]).drop(columns=["overhead_assumed_bytes"], errors="ignore")
            secs.append(Section(title="E5: largest concurrency that fits", table=fits))
        return secs

    @staticmethod
    def _bars(t: pd.DataFrame) -> go.Figure:
        fig = go.Figure()
        x = t["cell"].tolist()
        groups = [("measured", {k: t[f"measured_{k}"] for k in COMPONENTS})]
        if "analytic_weights_bytes" in t:
            groups.append(("analytic", {"weights_bytes": t["analytic_weights_bytes"], "kv_cache_bytes": t["analytic_kv_cache_bytes"]}))
        for group, comps in groups:
            base = pd.Series(0.0, index=t.index)
            for k, vals in comps.items():
                vals = vals.astype("float64")
                if vals.isna().all():
                    continue
                mib = vals.fillna(0.0) / MIB
                fig.add_trace(
                    go.Bar(
                        x=x,
                        y=mib,
                        base=base.tolist(),
                        name=f"{_NAMES[k]} ({group})",
                        offsetgroup=group,
                        legendgroup=group,
                        marker={"color": _COLORS[k], "pattern": {"shape": "/" if group == "analytic" else ""}},
                    )
                )
                base = base + mib
        title = "Memory per cell: measured (solid) vs analytic (hatched), MiB"
        fig.update_layout(barmode="group", title=title, height=460, yaxis_title="MiB")
        return fig


def _f(x: Any) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


ANALYSIS = E5Analysis()
