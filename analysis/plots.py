"""Plotly figures every report has: latency percentile curves, request timelines, throughput.

A series (a cell, an arrival process) keeps one colour in every panel of a figure: colours are
assigned by name, never by the order traces happen to be added in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis.records import measured

_TIMELINE_ROWS = 120  # beyond this a Gantt chart stops being readable
PALETTE = qualitative.D3 + qualitative.Dark24


def colours(names: list[str]) -> dict[str, str]:
    """One colour per series name, the same in every panel (sorted names: stable across figures)."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(map(str, names))))}


_CDF_PANELS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL (every gap between tokens)"), ("e2e_s", "E2E"))


def latency_cdfs(df: pd.DataFrame) -> go.Figure:
    """Percentile curves of TTFT, TPOT, ITL and E2E per cell: where p50, p90, p99 sit, and the tail."""
    df = measured(df)
    df = df[df["ok"].astype(bool)]
    by_cell = dict(tuple(df.groupby(df["cell_id"].astype(str), sort=True)))  # one pass, not one per cell and panel
    cells = list(by_cell)
    colour = colours(cells)
    fig = make_subplots(rows=2, cols=2, subplot_titles=[f"{t} (ms)" for _, t in _CDF_PANELS], vertical_spacing=0.14)
    traces, rows, cols = [], [], []  # added at once: one trace at a time re-checked the figure's every trace (a sweep has thousands)
    for i, (col, _title) in enumerate(_CDF_PANELS):
        r, c = divmod(i, 2)
        for cell in cells:
            g = by_cell[cell]
            vals = [x for gaps in g[col] for x in gaps] if col == "itl_s" else list(g[col].dropna())
            if not vals:
                continue
            x = np.sort(np.asarray(vals, dtype="float64")) * 1e3
            y = np.arange(1, len(x) + 1) / len(x) * 100
            traces.append(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    line={"shape": "hv", "color": colour[cell]},
                    name=cell,
                    legendgroup=cell,
                    showlegend=i == 0,
                    hovertemplate="%{x:.1f} ms: p%{y:.0f}<extra>" + cell + "</extra>",
                )
            )
            rows.append(r + 1)
            cols.append(c + 1)
        fig.update_xaxes(title_text="ms", row=r + 1, col=c + 1)
        fig.update_yaxes(title_text="percentile", range=[0, 100], row=r + 1, col=c + 1)
    fig.add_traces(traces, rows=rows, cols=cols)
    fig.update_layout(title="Latency percentile curves (CDF) per cell, measured requests", height=640)
    return fig


def timeline(df: pd.DataFrame, cell_id: str) -> go.Figure:
    """Gantt of one cell's requests on the load generator's clock.

    TTFT is split by the engine's own durations (queue, prefill, transfer, first decode step);
    what is left of TTFT after them is shown as `client/network` (actor hops, streaming).
    """
    m = measured(df)  # warm-up requests ran on a clock of their own, before the measured phase
    g = m[(m["cell_id"] == cell_id) & m["ok"].astype(bool)].sort_values("t_sent").head(_TIMELINE_ROWS)
    y = g["request_id"].astype(str)
    server = g[["server_queue_s", "prefill_s", "transfer_s", "first_decode_s"]].fillna(0.0)
    other = (g["ttft_s"] - server.sum(axis=1)).clip(lower=0.0)
    stages = [
        ("queue", server["server_queue_s"], "#c7c7c7"),
        ("prefill", server["prefill_s"], "#1f77b4"),
        ("transfer", server["transfer_s"], "#d62728"),
        ("first decode", server["first_decode_s"], "#9467bd"),
        ("client/network", other, "#ffbb78"),
        ("decode", g["t_last_token"] - g["t_first_token"], "#2ca02c"),
    ]
    fig = go.Figure()
    base = g["t_sent"].copy()
    for name, width, color in stages:
        if (width > 0).any():
            fig.add_trace(go.Bar(y=y, x=width, base=base, orientation="h", name=name, marker_color=color))
        base = base + width
    fig.update_layout(
        title=f"Request timeline, cell {cell_id} (seconds since the measured phase began"
        + (f"; first {_TIMELINE_ROWS} of {len(m[m['cell_id'] == cell_id])} requests)" if len(g) == _TIMELINE_ROWS else ")"),
        barmode="overlay",
        height=max(300, 14 * len(g) + 120),
        yaxis={"autorange": "reversed", "title": "request"},
        xaxis={"title": "s"},
    )
    return fig


def throughput(df: pd.DataFrame) -> go.Figure:
    """Cumulative output tokens over time, one line per cell; the slope is token throughput."""
    df = measured(df)
    fig = go.Figure()
    colour = colours(list(df["cell_id"].astype(str).unique()))
    for cell, g in df[df["ok"].astype(bool)].groupby("cell_id", sort=True):
        g = g.sort_values("t_last_token")
        fig.add_trace(
            go.Scatter(
                x=g["t_last_token"], y=g["output_tokens"].cumsum(), mode="lines+markers", name=str(cell), line={"color": colour[str(cell)]}
            )
        )
    fig.update_layout(title="Cumulative output tokens", xaxis_title="s", yaxis_title="tokens", height=380)
    return fig


def telemetry(df: pd.DataFrame) -> go.Figure:
    """Node telemetry over the run: GPU utilisation and memory where GPUs exist, else CPU."""
    t0 = df["t_wall"].min()
    gpu = df[df["gpu"].notna()] if "gpu" in df else df.iloc[0:0]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if not gpu.empty:
        for (node, idx), g in gpu.groupby(["node_id", "gpu"], sort=True):
            name = f"{str(node)[:8]} gpu{idx:.0f}"
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["gpu_util_percent"], name=f"{name} util %"), secondary_y=False)
            mem = go.Scatter(x=g["t_wall"] - t0, y=g["gpu_mem_used_bytes"] / 2**30, name=f"{name} GiB", line={"dash": "dot"})
            fig.add_trace(mem, secondary_y=True)
        fig.update_yaxes(title_text="GPU utilisation %", secondary_y=False)
        fig.update_yaxes(title_text="GPU memory GiB", secondary_y=True)
    else:
        for node, g in df.groupby("node_id", sort=True):
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["cpu_percent"], name=f"{str(node)[:8]} CPU %"), secondary_y=False)
            mem = go.Scatter(x=g["t_wall"] - t0, y=g["host_mem_used_bytes"] / 2**30, name=f"{str(node)[:8]} host GiB", line={"dash": "dot"})
            fig.add_trace(mem, secondary_y=True)
        fig.update_yaxes(title_text="CPU %", secondary_y=False)
        fig.update_yaxes(title_text="host memory GiB", secondary_y=True)
    fig.update_layout(title="Telemetry (NVML / psutil, one sampler per node)", xaxis_title="s since the run began", height=380)
    return fig
