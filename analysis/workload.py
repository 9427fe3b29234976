"""The workload and SLO table at the top of a report: what was asked of the engine and what counts
as good, so "SLO attainment 87.5%" can be read without opening config.yaml."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.formatting import DASH, ms, num, pct
from analysis.records import measured


def length(spec: dict[str, Any] | None) -> str:
    if not spec:
        return DASH
    kind = spec.get("kind")
    if kind == "fixed":
        return f"fixed {spec['value']}"
    if kind == "uniform":
        return f"uniform {spec['low']}–{spec['high']}"
    if kind == "normal":
        return f"normal mean {num(spec['mean'])}, std {num(spec['std'])}, clipped to {spec['min']}–{spec['max']}"
    return str(kind)


def arrival(spec: dict[str, Any] | None) -> str:
    if not spec:
        return DASH
    kind = spec.get("kind")
    if kind == "closed":
        return f"closed loop, {spec['concurrency']} concurrent users (each sends when its previous request ends)"
    if kind == "poisson":
        return f"open loop, Poisson, {num(spec['rate'])} req/s"
    if kind == "gamma":
        return f"open loop, gamma, {num(spec['rate'])} req/s, burstiness {num(spec.get('burstiness', 1.0))}"
    return str(kind)


def _observed(x: pd.Series) -> str:
    x = x.dropna()
    if x.empty:
        return ""
    return f" (observed min {num(int(x.min()))}, median {num(float(x.median()))}, max {num(int(x.max()))})"


def _varies(summary: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """Cell labels among `keys` that differ between cells (a sweep): the config's value is a default only."""
    labels = [c.get("labels") or {} for c in summary.get("cells", {}).values()]
    return [k for k in keys if len({repr(lab.get(k)) for lab in labels}) > 1]


def workload_table(config: dict[str, Any], requests: pd.DataFrame, summary: dict[str, Any]) -> pd.DataFrame:
    w = config.get("workload") or {}
    slo = config.get("slo") or {}
    m = measured(requests) if not requests.empty else requests
    cells = summary.get("cells", {})
    rows = [
        ("cells", f"{len(cells)}"),
        ("measured requests per cell", num(w.get("num_requests")) + (f" ({len(m)} in all)" if not m.empty else "")),
        ("warm-up requests per cell", f"{num(w.get('warmup_requests'))} (sent first, excluded from every metric and table)"),
        ("input length (tokens)", length(w.get("input_len")) + (_observed(m["input_tokens"]) if "input_tokens" in m else "")),
        ("output length (tokens)", length(w.get("output_len")) + (_observed(m["output_tokens"]) if "output_tokens" in m else "")),
    ]
    swept = _varies(summary, ("arrival", "rate", "concurrency", "burstiness"))
    rows.append(("arrival", arrival(w.get("arrival")) if not swept else f"varies per cell ({', '.join(swept)}): see the cells"))
    rows += [
        ("SLO: TTFT", DASH if slo.get("ttft_s") is None else f"≤ {ms(slo['ttft_s'])} ms"),
        ("SLO: TPOT", DASH if slo.get("tpot_s") is None else f"≤ {ms(slo['tpot_s'])} ms"),
        ("SLO: E2E", "not checked" if slo.get("e2e_s") is None else f"≤ {ms(slo['e2e_s'])} ms"),
        ("SLO attainment", "share of measured requests that completed inside every SLO above (failed requests count against it)"),
        ("attainment target (max-rate goodput)", pct(slo.get("attainment"))),
        ("seed", num(config.get("seed"))),
    ]
    return pd.DataFrame(rows, columns=["workload / SLO", "value"])
