"""`pdbench compare`: runs side by side (a scaling study over 1, 2, 4 nodes; before/after a
change), from their packets alone.

Simulated and real runs are never mixed silently: comparing them is refused unless asked for,
and then every simulated run carries SIMULATED in its label, on every table and figure.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import yaml

from analysis.packet import Packet, load_packet, write_json, write_text
from analysis.plots import PALETTE
from analysis.report import html_document, markdown_document
from analysis.tracks.base import Section


def _ms(key: str, q: str) -> Any:
    return lambda m: None if (v := (m.get(key) or {}).get(q)) is None else v * 1e3


def _pct(key: str) -> Any:
    return lambda m: None if m.get(key) is None else m[key] * 100


# summary.json name → (column title with its unit, how to read it from a cell's metrics)
METRICS: dict[str, tuple[str, Any]] = {
    "request_throughput_rps": ("req/s", lambda m: m.get("request_throughput_rps")),
    "output_token_throughput_tps": ("out tok/s", lambda m: m.get("output_token_throughput_tps")),
    "ttft_s.p50": ("TTFT p50 (ms)", _ms("ttft_s", "p50")),
    "ttft_s.p99": ("TTFT p99 (ms)", _ms("ttft_s", "p99")),
    "tpot_s.p50": ("TPOT p50 (ms)", _ms("tpot_s", "p50")),
    "tpot_s.p99": ("TPOT p99 (ms)", _ms("tpot_s", "p99")),
    "itl_s.p50": ("ITL p50 (ms)", _ms("itl_s", "p50")),
    "e2e_s.p50": ("E2E p50 (ms)", _ms("e2e_s", "p50")),
    "slo_attainment": ("SLO attainment (%)", _pct("slo_attainment")),
    "goodput_rps": ("goodput req/s", lambda m: m.get("goodput_rps")),
    # Beside TTFT: two runs whose closed-loop users moved differently measured different regimes.
    "schedule.lockstep_share": ("users in lockstep (%)", lambda m: _pct("lockstep_share")(m.get("schedule") or {})),
}
CHARTS = ("out tok/s", "req/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "E2E p50 (ms)", "SLO attainment (%)")


class MixedModes(ValueError):
    """Simulated and real runs asked to be compared without --allow-simulated."""


def check_modes(packets: list[Packet], allow_simulated: bool) -> None:
    sim = [p.manifest.get("run_id") for p in packets if p.simulated]
    real = [p.manifest.get("run_id") for p in packets if not p.simulated]
    if sim and real and not allow_simulated:
        raise MixedModes(
            f"refusing to compare simulated runs ({', '.join(map(str, sim))}) with real ones "
            f"({', '.join(map(str, real))}): a simulated run's numbers come from an analytic law, not an engine. "
            "Pass --allow-simulated to compare them anyway; every simulated run is then labelled SIMULATED."
        )


def _nodes(p: Packet) -> int:
    return len(p.manifest.get("hardware", {}).get("nodes", [])) or 1


def _wall_s(m: dict[str, Any]) -> float | None:
    """The run's wall time from its manifest (a scaling study's first number); None if unknown."""
    try:
        return (datetime.fromisoformat(m["ended_at"]) - datetime.fromisoformat(m["started_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _gpus(p: Packet) -> int:
    return sum(n.get("gpu", {}).get("count", 0) for n in p.manifest.get("hardware", {}).get("nodes", []))


def _distinguishing(p: Packet) -> dict[str, str]:
    m = p.manifest
    n, g = _nodes(p), _gpus(p)
    return {
        "track": str(m.get("track")),
        "nodes": f"{n} node{'s' if n > 1 else ''}",
        "gpus": f"{g} GPU{'s' if g != 1 else ''}",
        "engine": "SIMULATED" if p.simulated else str(m.get("engine")),
        "model": str((m.get("model") or {}).get("name")),
        "git": str((m.get("versions") or {}).get("pdbench_git_sha"))[:7],
    }


def labels(packets: list[Packet]) -> list[str]:
    """Short, unique run labels: a letter, then what tells the runs apart (track, nodes, GPUs,
    engine, model, commit: only those that differ), else the run id; SIMULATED where it applies."""
    facts = [_distinguishing(p) for p in packets]
    differ = [k for k in facts[0] if len({f[k] for f in facts}) > 1] if facts else []
    out = []
    for i, (p, f) in enumerate(zip(packets, facts, strict=True)):
        what = ", ".join(f[k] for k in differ)
        run_id = str(p.manifest.get("run_id"))
        lab = f"{chr(ord('A') + i) if i < 26 else i}: {what or run_id}"
        if p.simulated and "SIMULATED" not in lab:
            lab += " SIMULATED"
        out.append(lab)
    if len(set(out)) < len(out):  # same facts, e.g. two repeats of one config: the run ids tell them apart
        out = [f"{lab} ({p.manifest.get('run_id')})" for lab, p in zip(out, packets, strict=True)]
    return out


def runs_table(packets: list[Packet], labs: list[str]) -> pd.DataFrame:
    rows = []
    for lab, p in zip(labs, packets, strict=True):
        m = p.manifest
        rows.append(
            {
                "run": lab,
                "run_id": m.get("run_id"),
                "track": m.get("track"),
                "evidence": m.get("evidence"),
                "engine": m.get("engine"),
                "model": (m.get("model") or {}).get("name"),
                "config hash": str(m.get("config_hash"))[:12],
                "status": m.get("status"),
                "cells": len(m.get("cells") or {}) or None,
                "wall (s)": _wall_s(m),
                "engine starts": (m.get("engine_pool") or {}).get("engine_starts"),
                "nodes": _nodes(p),
                "GPUs": _gpus(p),
                "hardware": (m.get("hardware") or {}).get("summary"),
                "git": str((m.get("versions") or {}).get("pdbench_git_sha"))[:10],
            }
        )
    return pd.DataFrame(rows)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(packets: list[Packet], labs: list[str]) -> pd.DataFrame:
    """Config fields (config.yaml) whose values differ between the runs."""
    flat = []
    for p in packets:
        f = p.root / "config.yaml"
        flat.append(_flatten(yaml.safe_load(f.read_text()) or {}) if f.is_file() else {})
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    rows = [{"field": k, **{lab: str(f.get(k)) for lab, f in zip(labs, flat, strict=True)}} for k in differ]
    return pd.DataFrame(rows)


def side_by_side(packets: list[Packet], labs: list[str]) -> pd.DataFrame:
    """One row per (cell, metric); a column per run, and each run's ratio to the first (A)."""
    cells = sorted({c for p in packets for c in p.summary.get("cells", {})})
    rows = []
    for cid in cells:
        for title, get in METRICS.values():
            vals = []
            for p in packets:
                m = ((p.summary.get("cells") or {}).get(cid) or {}).get("metrics")
                vals.append(get(m) if m else None)
            if all(v is None for v in vals):
                continue
            row: dict[str, Any] = {"cell": cid, "metric": title}
            row.update(dict(zip(labs, vals, strict=True)))
            for lab, v in zip(labs[1:], vals[1:], strict=True):
                row[f"{lab.split(':')[0]}/A"] = v / vals[0] if (v is not None and vals[0]) else None
            rows.append(row)
    return pd.DataFrame(rows)


def verdicts_table(packets: list[Packet], labs: list[str]) -> pd.DataFrame:
    """Run-level results the tracks publish (E0 verdict, E2 capacity and max-rate goodput)."""
    rows = []
    for lab, p in zip(labs, packets, strict=True):
        v = p.summary.get("verdicts") or {}
        g = v.get("max_rate_goodput") or {}
        cells = p.summary.get("cells", {})
        rows.append(
            {
                "run": lab,
                "verdict": v.get("verdict"),
                "closed-loop capacity req/s": v.get("capacity_rps"),
                "max-rate goodput req/s": g.get("rate_rps"),
                "max-rate goodput status": g.get("status"),
                "cells ok/all": f"{sum(c.get('status') == 'ok' for c in cells.values())}/{len(cells)}",
            }
        )
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all")


def _figure(table: pd.DataFrame, labs: list[str], metric: str) -> go.Figure:
    fig = go.Figure()
    t = table[table["metric"] == metric]
    colour = dict(zip(labs, colours_in_order(len(labs)), strict=True))
    for lab in labs:
        fig.add_trace(go.Bar(x=t["cell"], y=t[lab], name=lab, marker_color=colour[lab]))
    fig.update_layout(barmode="group", title=f"{metric} per cell", height=400)
    return fig


def colours_in_order(n: int) -> list[str]:
    """Run A, B, C... keep one colour each across every chart."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def compare(run_dirs: list[Path], out_dir: Path, allow_simulated: bool = False) -> Path:
    """Write compare.md, compare.html and compare.json for these runs into out_dir."""
    if len(run_dirs) < 2:
        raise ValueError("compare needs at least two run folders")
    packets = [load_packet(Path(d)) for d in run_dirs]
    check_modes(packets, allow_simulated)
    labs = labels(packets)
    runs = runs_table(packets, labs)
    diffs = config_differences(packets, labs)
    table = side_by_side(packets, labs)
    verdicts = verdicts_table(packets, labs)
    tracks = sorted({str(p.manifest.get("track")) for p in packets})
    text = ["Ratios are to run A. Cells are matched by cell id; a cell a run lacks shows –."]
    if len(tracks) > 1:
        text.append(f"These runs are of different tracks ({', '.join(tracks)}): only cells with the same id line up.")
    sim = any(p.simulated for p in packets)
    if sim:
        text.insert(0, "Includes SIMULATED runs (analytic latency law, no engine): their numbers are not measurements.")
    secs = [
        Section(title="Runs", table=runs),
        Section(title="Config differences", text=[] if not diffs.empty else ["No differences: the configs are identical."], table=diffs),
        Section(title="Run-level results", table=verdicts),
        Section(
            title="Cells side by side",
            text=text,
            table=table,
            figures=[_figure(table, labs, m) for m in CHARTS if not table.empty and (table["metric"] == m).any()],
        ),
    ]
    evidence = ", ".join(sorted({str(p.manifest.get("evidence")) for p in packets}))
    facts = {"runs": len(packets), "tracks": ", ".join(tracks), "evidence": evidence}
    title = "pdbench comparison — " + " vs ".join(str(p.manifest.get("run_id")) for p in packets)
    warning = "**INCLUDES SIMULATED RUNS** — labelled SIMULATED; not measurements." if sim else None
    out_dir = Path(out_dir)
    write_text(out_dir / "compare.md", markdown_document(title, warning, facts, secs))
    banner = "INCLUDES SIMULATED RUNS" if sim else f"evidence: {evidence}"
    write_text(out_dir / "compare.html", html_document(title, banner, sim, facts, secs))
    write_json(
        out_dir / "compare.json",
        {
            "runs": runs.to_dict(orient="records"),
            "config_differences": diffs.to_dict(orient="records"),
            "run_level": verdicts.to_dict(orient="records"),
            "cells": table.astype(object).where(table.notna(), None).to_dict(orient="records"),
        },
    )
    return out_dir
