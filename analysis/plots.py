"""Plotly figures every report has: latency distributions, request timeline, throughput."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.records import measured

_TIMELINE_ROWS = 120  # beyond this a Gantt chart stops being readable


def latency_distributions(df: pd.DataFrame) -> go.Figure:
    df = measured(df)
    df = df[df["ok"].astype(bool)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT (ms)", "TPOT (ms)"))
    for cell, g in df.groupby("cell_id", sort=True):
        fig.add_trace(go.Box(y=g["ttft_s"] * 1e3, name=str(cell), boxpoints="all", legendgroup=str(cell)), 1, 1)
        fig.add_trace(
            go.Box(y=g["tpot_s"] * 1e3, name=str(cell), boxpoints="all", legendgroup=str(cell), showlegend=False), 1, 2
        )
    fig.update_layout(title="Latency distributions per cell", height=420)
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
        title=f"Request timeline, cell {cell_id} (seconds since the measured phase began)",
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
    for cell, g in df[df["ok"].astype(bool)].groupby("cell_id", sort=True):
        g = g.sort_values("t_last_token")
        fig.add_trace(
            go.Scatter(x=g["t_last_token"], y=g["output_tokens"].cumsum(), mode="lines+markers", name=str(cell))
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
            name = f"{str(node)[:8]} gpu{int(idx)}"
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["gpu_util_percent"], name=f"{name} util %"), secondary_y=False)
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["gpu_mem_used_bytes"] / 2**30, name=f"{name} GiB", line={"dash": "dot"}), secondary_y=True)
        fig.update_yaxes(title_text="GPU utilisation %", secondary_y=False)
        fig.update_yaxes(title_text="GPU memory GiB", secondary_y=True)
    else:
        for node, g in df.groupby("node_id", sort=True):
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["cpu_percent"], name=f"{str(node)[:8]} CPU %"), secondary_y=False)
            fig.add_trace(go.Scatter(x=g["t_wall"] - t0, y=g["host_mem_used_bytes"] / 2**30, name=f"{str(node)[:8]} host GiB", line={"dash": "dot"}), secondary_y=True)
        fig.update_yaxes(title_text="CPU %", secondary_y=False)
        fig.update_yaxes(title_text="host memory GiB", secondary_y=True)
    fig.update_layout(title="Telemetry (NVML / psutil, one sampler per node)", xaxis_title="s since the run began", height=380)
    return fig
