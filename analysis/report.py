"""report.md and a self-contained report.html, rebuilt from a packet's files alone.

The HTML inlines plotly.js (opens offline, no CDN) and escapes every string that came from a
config, a model or a dataset.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import plotly.offline

from analysis import plots
from analysis.packet import Packet, write_text
from analysis.tracks import Section, get_analysis

_FACTS = ("run_id", "track", "mode", "engine", "serving_modes", "model", "config_hash", "status")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _ms(d: dict | None, key: str) -> float | None:
    return None if not d or d.get(key) is None else d[key] * 1e3


def _yes_no(x: bool | None) -> str:
    return "" if x is None else ("yes" if x else "NO")


def _schedule_columns(m: dict[str, Any]) -> dict[str, Any]:
    """Offered vs achieved rate, send lag, and the two flags (docs/metrics.md, `schedule_kept`, `steady`)."""
    sch = m.get("schedule") or {}
    st = m.get("steady_state") or {}
    q = st.get("ttft_p50_by_quartile_s") or []
    return {
        "offered req/s": sch.get("target_rate_rps"),
        "sent req/s": sch.get("achieved_rate_rps"),
        "send lag p99 ms": _ms(sch.get("send_lag_s"), "p99"),
        "schedule kept": _yes_no(sch.get("schedule_kept")),
        "steady TTFT p50 ms": _ms(st.get("ttft_s"), "p50"),
        "TTFT p50 Q1→Q4 ms": " → ".join(f"{v * 1e3:.3g}" for v in q if v is not None),
        "steady": _yes_no(st.get("steady")),
        # The harness's share of TTFT (client minus engine, per request; docs/metrics.md `harness`).
        "harness TTFT p50 ms": _ms((m.get("harness") or {}).get("ttft_s"), "p50"),
    }


def cell_table(summary: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for cid, cell in sorted(summary.get("cells", {}).items()):
        m = cell.get("metrics") or {}
        rows.append(
            {
                "cell": cid,
                "status": cell.get("status"),
                "mode": cell.get("serving_mode"),
                "requests ok/all": f"{m.get('completed', 0)}/{m.get('requests', 0)}",
                "req/s": m.get("request_throughput_rps"),
                "out tok/s": m.get("output_token_throughput_tps"),
                "TTFT p50 ms": _ms(m.get("ttft_s"), "p50"),
                "TTFT p99 ms": _ms(m.get("ttft_s"), "p99"),
                "TPOT p50 ms": _ms(m.get("tpot_s"), "p50"),
                "TPOT p99 ms": _ms(m.get("tpot_s"), "p99"),
                "E2E p50 ms": _ms(m.get("e2e_s"), "p50"),
                "SLO att.": m.get("slo_attainment"),
                "goodput req/s": m.get("goodput_rps"),
                **_schedule_columns(m),
            }
        )
    return pd.DataFrame(rows)


def _facts(packet: Packet) -> dict[str, Any]:
    m = packet.manifest
    return {
        "run_id": m.get("run_id"),
        "track": m.get("track"),
        "mode": m.get("mode"),
        "engine": m.get("engine"),
        "serving_modes": ", ".join(m.get("serving_modes", [])),
        "model": f"{m.get('model', {}).get('name')} (arch {str(m.get('model', {}).get('architecture_hash'))[:12]})",
        "config_hash": m.get("config_hash"),
        "status": m.get("status"),
        "git": f"{m.get('versions', {}).get('pdbench_git_sha')} dirty={m.get('versions', {}).get('pdbench_git_dirty')}",
        "hardware": m.get("hardware", {}).get("summary"),
        "started": m.get("started_at"),
        "ended": m.get("ended_at"),
    }


def sections(packet: Packet) -> list[Section]:
    df = packet.requests
    out = get_analysis(packet.manifest.get("track", "")).packet_sections(packet)
    out.append(Section(title="Cells", table=cell_table(packet.summary)))
    failed = {c: v.get("error") for c, v in packet.summary.get("cells", {}).items() if v.get("status") != "ok"}
    if failed:
        out.append(Section(title="Failed cells", table=pd.DataFrame([{"cell": c, "reason": r} for c, r in failed.items()])))
    if not df.empty:
        figs = [plots.latency_distributions(df), plots.throughput(df)]
        first = sorted(df["cell_id"].unique())[0]
        figs.append(plots.timeline(df, first))
        if packet.telemetry is not None and not packet.telemetry.empty:
            figs.append(plots.telemetry(packet.telemetry))
        out.append(Section(title="Figures", text=["Interactive in report.html."], figures=figs))
    return out


def markdown_document(title: str, warning: str | None, facts: dict[str, Any], secs: list[Section]) -> str:
    """A report page in Markdown: title, an optional warning quote, a facts table, the sections."""
    lines = [f"# {title}", ""]
    if warning:
        lines += [f"> {warning}", ""]
    lines += ["| fact | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.items()]
    for s in secs:
        lines += ["", f"## {s.title}", ""]
        lines += [t for t in s.text] + ([""] if s.text else [])
        if s.table is not None and not s.table.empty:
            lines.append(_md_table(s.table))
    return "\n".join(lines) + "\n"


def html_document(
    title: str, banner: str, simulated: bool, facts: dict[str, Any], secs: list[Section], plotly_js: str = "inline"
) -> str:
    """The same page as HTML; a red banner when simulated. `plotly_js="inline"` embeds plotly.js
    (self-contained, ~4.7 MB); anything else is a URL the page loads it from instead
    (docs/evidence/ keeps one shared copy beside its packets)."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        ".sim{background:#b00;color:#fff;font-size:2.5em;padding:.4em;text-align:center;font-weight:bold}"
        ".real{background:#064;color:#fff;font-size:1.2em;padding:.3em;text-align:center}</style>",
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        if plotly_js == "inline"
        else f"<script type='text/javascript' src='{e(plotly_js, quote=True)}'></script>",
        "</head><body>",
    ]
    parts.append(f"<div class='{'sim' if simulated else 'real'}'>{e(banner)}</div>")
    parts.append(f"<h1>{e(title)}</h1><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in facts.items()]
    parts.append("</table>")
    for s in secs:
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts += [f"<p>{e(t)}</p>" for t in s.text]
        if s.table is not None and not s.table.empty:
            parts.append(s.table.map(_fmt).to_html(index=False, escape=True))
        parts += [f.to_html(full_html=False, include_plotlyjs=False) for f in s.figures]
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(packet: Packet, secs: list[Section]) -> str:
    m = packet.manifest
    warning = "**SIMULATED RUN** — analytic latency law, no real engine. Not comparable with real runs." if packet.simulated else None
    return markdown_document(f"pdbench report — {m.get('track', '?').upper()} `{m.get('run_id')}`", warning, _facts(packet), secs)


def render_html(packet: Packet, secs: list[Section], plotly_js: str = "inline") -> str:
    m = packet.manifest
    mode = str(m.get("mode"))
    banner = f"SIMULATED RUN — mode: {mode}" if packet.simulated else f"mode: {mode}"
    return html_document(f"pdbench {m.get('track')} {m.get('run_id')}", banner, packet.simulated, _facts(packet), secs, plotly_js)


def write_reports(packet: Packet, plotly_js: str = "inline") -> None:
    secs = sections(packet)
    write_text(packet.root / "report.md", render_markdown(packet, secs))
    write_text(packet.root / "report.html", render_html(packet, secs, plotly_js))
