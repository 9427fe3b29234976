"""E2: throughput–latency curves, their Pareto front, SLO attainment vs rate, and both goodputs.

Per-request goodput (vLLM's): requests meeting every SLO per second, per cell (`goodput_rps`).
Max-rate goodput (DistServe's): the highest request rate whose attainment meets the target,
bracketed by the rate search (workloads/search.py) from the probes' attainment.
"""

from __future__ import annotations

from typing import Any, cast

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.formatting import ms, num, pct
from analysis.plots import colours
from analysis.records import measured
from analysis.tracks.base import Headline, Section, TrackAnalysis
from workloads.search import bracket, meets_target
from workloads.tracks.e2 import RateSearch


def _q(m: dict[str, Any] | None, key: str, q: str) -> float | None:
    return None if not m or not m.get(key) else m[key].get(q)


def points(cells: dict[str, Any]) -> pd.DataFrame:
    """One row per cell with what the curves need; failed cells keep their row (no metrics)."""
    rows = []
    for cid, c in sorted(cells.items()):
        lab, m = c.get("labels", {}), c.get("metrics") or {}
        phase = lab.get("phase")
        rows.append(
            {
                "cell": cid,
                "phase": phase,
                "series": "closed loop" if phase == "closed" else lab.get("arrival"),
                "concurrency": lab.get("concurrency"),
                "rate": lab.get("rate"),
                "burstiness": lab.get("burstiness"),
                "status": c.get("status", "ok"),
                "req_s": m.get("request_throughput_rps"),
                "out_tok_s": m.get("output_token_throughput_tps"),
                "ttft_p50_s": _q(m, "ttft_s", "p50"),
                "ttft_p99_s": _q(m, "ttft_s", "p99"),
                "tpot_p50_s": _q(m, "tpot_s", "p50"),
                "tpot_p99_s": _q(m, "tpot_s", "p99"),
                "slo_attainment": m.get("slo_attainment"),
                "goodput_rps": m.get("goodput_rps"),
                "target": (m.get("slo") or {}).get("attainment"),
            }
        )
    return pd.DataFrame(rows)


def pareto(df: pd.DataFrame, x: str, y: str) -> list[str]:
    """Cells not dominated on (higher x, lower y): the best throughput for each latency."""
    d = df.dropna(subset=[x, y]).sort_values([x, y], ascending=[False, True])
    front: list[str] = []
    best_y = float("inf")
    for row in d.itertuples():
        if getattr(row, y) < best_y:
            front.append(str(row.cell))
            best_y = getattr(row, y)
    return front


def _number(x: Any) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def max_rate_goodput(df: pd.DataFrame, params: dict[str, Any], gpus: int) -> dict[str, Any] | None:
    # The search's settings as it ran them: the track's own defaults under what the packet says.
    search = {**RateSearch().model_dump(), **(params.get("search") or {})}
    if not search["enabled"]:
        return None
    b_target = float(search["burstiness"])
    # Failed probes are no evidence either way (as in the search itself); the report lists them.
    probes = df[df["phase"].isin(["sweep", "search"]) & (df["burstiness"] == b_target) & (df["status"] == "ok")]
    if probes.empty:
        return None
    targets = probes["target"].dropna()
    target = float(targets.to_numpy()[0]) if not targets.empty else None
    rows = zip(probes["rate"], probes["slo_attainment"], probes["target"], strict=True)
    passes = {float(r): meets_target(_number(a), _number(t)) for r, a, t in rows}
    b = bracket(passes)
    return {
        "rate_rps": b.passing,
        "first_failing_rps": b.failing,
        "bracket_width_rps": b.width,
        "status": b.status,
        "non_monotone_rates": list(b.non_monotone),
        "target_attainment": target,
        "arrival": "poisson" if b_target == 1.0 else f"gamma (burstiness {b_target:g})",
        "probes": int(len(probes)),
        "search_probes": int((probes["phase"] == "search").sum()),
        "rate_per_gpu_rps": (b.passing / gpus) if (b.passing is not None and gpus) else None,
    }


def _gpus(cells: dict[str, Any]) -> int:
    for c in cells.values():
        ids = ((c.get("engine_info") or {}).get("node") or {}).get("gpu_ids")
        if ids is not None:
            return len(ids)
    return 0


class E2Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        df = points(cells)
        closed = df[df["phase"] == "closed"]
        best = df.iloc[int(df["goodput_rps"].argmax())] if df["goodput_rps"].notna().any() else None
        return {
            "capacity_rps": float(closed["req_s"].max()) if closed["req_s"].notna().any() else None,
            "max_rate_goodput": max_rate_goodput(df, params, _gpus(cells)),
            "best_per_request_goodput": None if best is None else {"cell": best["cell"], "goodput_rps": float(best["goodput_rps"])},
            "pareto_ttft_p99": pareto(df, "out_tok_s", "ttft_p99_s"),
            "pareto_tpot_p50": pareto(df, "out_tok_s", "tpot_p50_s"),
        }

    def headline(self, summary: dict[str, Any]) -> list[Headline]:
        v = summary.get("verdicts") or {}
        out = []
        if v.get("capacity_rps"):
            out.append(Headline("closed-loop capacity", f"{num(v['capacity_rps'])} req/s"))
        g = v.get("max_rate_goodput")
        if g:
            rate = {"bracketed": g["rate_rps"], "above_range": g["rate_rps"]}.get(g["status"])
            what = f"{num(rate)} req/s" if rate is not None else f"below {num(g['first_failing_rps'])} req/s"
            cond = f"{g['arrival']}, {pct(g['target_attainment'])} of requests inside every SLO"
            out.append(Headline("max-rate goodput", f"{what} ({cond}; {g['status'].replace('_', ' ')})"))
        b = v.get("best_per_request_goodput")
        if b:
            out.append(Headline("best per-request goodput", f"{num(b['goodput_rps'])} req/s (cell {b['cell']})"))
        return out

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        df = points(summary.get("cells", {}))
        if df.empty:
            return []
        out = [self._goodput(v, df), Section(title="E2: throughput–latency", text=self._curve_text(v), figures=[self._curves(df, v)])]
        out.append(
            Section(
                title="E2: SLO attainment vs rate",
                text=["Open-loop cells: attainment and per-request goodput against the offered rate (figure in report.html)."],
                figures=[self._attainment(df)],
            )
        )
        load = offered_vs_achieved(df, requests)
        if not load.empty:
            out.append(
                Section(
                    title="E2: offered vs achieved load",
                    text=[
                        "Offered: the rate the arrival process was asked for. Sent: measured requests over the span of "
                        "their send times (below the offered rate when the load generator fell behind, or by chance "
                        "for few requests). Completed: finished requests per second of the measured window. A cell "
                        "whose completions fall short of its offered rate was overloaded."
                    ],
                    table=load.drop(columns=["series"]).assign(
                        **{c: load[c].map(num) for c in ("offered (req/s)", "sent (req/s)", "completed (req/s)")}
                    ),
                    figures=[offered_figure(load, series_colours(df))],
                )
            )
        return out

    @staticmethod
    def _goodput(v: dict[str, Any], df: pd.DataFrame) -> Section:
        g = v.get("max_rate_goodput")
        text = [
            "Two goodputs, named apart (docs/metrics.md): per-request goodput = requests meeting every SLO per "
            "second of one cell (vLLM's; column per-request goodput); max-rate goodput = the highest request rate whose "
            "SLO attainment reaches the target (DistServe's), bracketed by a bounded rate search."
        ]
        if v.get("capacity_rps"):
            text.append(f"Closed-loop capacity (highest request throughput of the concurrency sweep): {v['capacity_rps']:.3g} req/s.")
        if g:
            if g["status"] == "bracketed":
                text.append(
                    f"Max-rate goodput ({g['arrival']}, ≥ {g['target_attainment']:.0%} of requests inside every SLO): "
                    f"{g['rate_rps']:.4g} req/s; {g['first_failing_rps']:.4g} req/s misses it (bracket {g['bracket_width_rps']:.3g} req/s, "
                    f"{g['probes']} probes of which {g['search_probes']} by the search)."
                )
                if g["rate_per_gpu_rps"] is not None:
                    text.append(f"Per GPU: {g['rate_per_gpu_rps']:.4g} req/s.")
            elif g["status"] == "below_range":
                text.append(f"Max-rate goodput below the search range: even {g['first_failing_rps']:.4g} req/s misses the target.")
            elif g["status"] == "above_range":
                text.append(f"Max-rate goodput above the search range: {g['rate_rps']:.4g} req/s still meets the target.")
            if g["non_monotone_rates"]:
                text.append(
                    f"Attainment is not monotone in rate: {g['non_monotone_rates']} met the target above a failing rate "
                    "(ignored; noise or overload effects)."
                )
        else:
            text.append("No max-rate goodput: the search did not run (disabled, or no capacity measured).")
        if v.get("best_per_request_goodput"):
            b = v["best_per_request_goodput"]
            text.append(f"Highest per-request goodput: {b['goodput_rps']:.3g} req/s in cell {b['cell']}.")
        probes = df[df["phase"].isin(["sweep", "search"])].sort_values(["series", "rate"])
        table = pd.DataFrame(
            {
                "cell": probes["cell"],
                "phase": probes["phase"],
                "arrival": probes["series"],
                "offered rate (req/s)": probes["rate"].map(num),
                "status": probes["status"],
                "SLO attainment": probes["slo_attainment"].map(pct),
                "per-request goodput (req/s)": probes["goodput_rps"].map(num),
                "completed (req/s)": probes["req_s"].map(num),
                "TTFT p99 (ms)": probes["ttft_p99_s"].map(ms),
                "TPOT p50 (ms)": probes["tpot_p50_s"].map(ms),
            }
        )
        return Section(title="E2: goodput", text=text, table=table)

    @staticmethod
    def _curve_text(v: dict[str, Any]) -> list[str]:
        return [
            "Each point is a cell: closed-loop cells by concurrency, open-loop cells by rate. Ringed points lie on the "
            "Pareto front (no other cell has both more throughput and lower latency).",
            f"Pareto front, output tok/s vs TTFT p99: {', '.join(v.get('pareto_ttft_p99', [])) or '—'}.",
            f"Pareto front, output tok/s vs TPOT p50: {', '.join(v.get('pareto_tpot_p50', [])) or '—'}.",
        ]

    @staticmethod
    def _curves(df: pd.DataFrame, v: dict[str, Any]) -> go.Figure:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT p99 (ms)", "TPOT p50 (ms)"))
        colour = series_colours(df)
        for col, (key, front) in enumerate((("ttft_p99_s", v.get("pareto_ttft_p99", [])), ("tpot_p50_s", v.get("pareto_tpot_p50", []))), 1):
            for name, g in df.dropna(subset=["out_tok_s"]).groupby("series", sort=True):
                g = g.sort_values("out_tok_s")
                fig.add_trace(
                    go.Scatter(
                        x=g["out_tok_s"],
                        y=g[key] * 1e3,
                        mode="lines+markers",
                        name=str(name),
                        legendgroup=str(name),
                        showlegend=col == 1,
                        text=g["cell"],
                        line={"color": colour[str(name)]},
                        marker={
                            "color": colour[str(name)],
                            "size": [14 if c in front else 7 for c in g["cell"]],
                            "line": {"width": [2 if c in front else 0 for c in g["cell"]], "color": "black"},
                        },
                    ),
                    1,
                    col,
                )
            fig.update_xaxes(title_text="output tokens/s", row=1, col=col)
        fig.update_layout(title="Throughput vs latency", height=440)
        return fig

    @staticmethod
    def _attainment(df: pd.DataFrame) -> go.Figure:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("SLO attainment (%)", "per-request goodput (req/s)"))
        open_ = df[df["rate"].notna()]
        colour = series_colours(df)
        for name, g in open_.groupby("series", sort=True):
            g = g.sort_values("rate")
            style = {"line": {"color": colour[str(name)]}, "marker": {"color": colour[str(name)]}}
            fig.add_trace(
                go.Scatter(
                    x=g["rate"],
                    y=g["slo_attainment"] * 100,
                    mode="lines+markers",
                    name=str(name),
                    legendgroup=str(name),
                    text=g["cell"],
                    **style,
                ),
                1,
                1,
            )
            fig.add_trace(
                go.Scatter(
                    x=g["rate"],
                    y=g["goodput_rps"],
                    mode="lines+markers",
                    name=str(name),
                    legendgroup=str(name),
                    showlegend=False,
                    text=g["cell"],
                    **style,
                ),
                1,
                2,
            )
        target = df["target"].dropna()
        if not target.empty:
            fig.add_hline(y=float(target.iloc[0]) * 100, line_dash="dash", annotation_text="target", row=1, col=1)
        fig.update_xaxes(title_text="request rate (req/s)")
        fig.update_layout(title="Open loop: attainment and goodput vs offered rate", height=420)
        return fig


def offered_vs_achieved(df: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """Open-loop cells: the rate asked for, the rate requests were sent at, the rate they completed at."""
    open_ = df[df["rate"].notna() & (df["status"] == "ok")]
    if open_.empty or requests.empty:
        return pd.DataFrame()
    m = measured(requests)
    rows = []
    for r in open_.sort_values(["series", "rate"]).itertuples():
        sent = m.loc[m["cell_id"] == r.cell, "t_sent"]
        span = float(sent.max() - sent.min()) if len(sent) > 1 else 0.0
        rows.append(
            {
                "cell": r.cell,
                "series": r.series,
                "offered (req/s)": float(cast(float, r.rate)),
                "sent (req/s)": (len(sent) - 1) / span if span > 0 else None,
                "completed (req/s)": r.req_s,
                "requests": int(len(sent)),
            }
        )
    return pd.DataFrame(rows)


def series_colours(df: pd.DataFrame) -> dict[str, str]:
    """One colour per series (closed loop, each arrival process) across every E2 figure."""
    return colours(list(df["series"].dropna().astype(str)))


def offered_figure(load: pd.DataFrame, colour: dict[str, str]) -> go.Figure:
    fig = go.Figure()
    for name, g in load.groupby("series", sort=True):
        c = colour[str(name)]
        fig.add_trace(
            go.Scatter(
                x=g["offered (req/s)"],
                y=g["completed (req/s)"],
                mode="lines+markers",
                name=f"{name} completed",
                text=g["cell"],
                line={"color": c},
                marker={"color": c},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=g["offered (req/s)"],
                y=g["sent (req/s)"],
                mode="markers",
                name=f"{name} sent",
                text=g["cell"],
                marker={"color": c, "symbol": "x", "size": 9},
            )
        )
    hi = float(load[["offered (req/s)", "completed (req/s)"]].max().max() or 1.0)
    fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="achieved = offered", line={"color": "grey", "dash": "dot"}))
    fig.update_layout(
        title="Offered vs achieved request rate (open loop)", xaxis_title="offered (req/s)", yaxis_title="achieved (req/s)", height=420
    )
    return fig


ANALYSIS = E2Analysis()
