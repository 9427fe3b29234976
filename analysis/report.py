"""report.md and a self-contained report.html, rebuilt from a packet's files alone.

The HTML inlines plotly.js (opens offline, no CDN) and escapes every string that came from a
config, a model or a dataset.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import plotly.offline
import yaml

from analysis import plots
from analysis.formatting import cell as fmt_cell
from analysis.headline import cell_rows, headlines, host_load_rows
from analysis.metrics import LOCKSTEP_MIN_USERS
from analysis.packet import Packet, write_text
from analysis.tracks import Section, get_analysis
from analysis.workload import workload_table

SMALL_SAMPLE = 100  # below this many requests a p99 is one of the largest two values
# Cells whose share of users in lockstep differs by this much ran in different regimes: the report says so.
LOCKSTEP_NOTE_SPREAD = 0.25
MAX_TIMELINES = 6  # cells with a timeline figure; more are sampled across the load range
# Cells drawn as curves (percentile curves, throughput); more are sampled across the load range: a
# curve per cell of a 1,000-cell sweep is unreadable and cost the driver ~5 ms per cell to draw.
MAX_CURVES = 24


def _fmt(x: Any) -> str:
    return fmt_cell(x)


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |")
    return "\n".join(lines)


def cell_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Per-cell numbers as a reader wants them: rates, latencies in ms, attainment in %."""
    return cell_rows(summary)


def small_sample_warning(summary: dict[str, Any]) -> str | None:
    small = {c: (v.get("metrics") or {}).get("completed", 0) for c, v in sorted(summary.get("cells", {}).items()) if v.get("metrics")}
    small = {c: n for c, n in small.items() if n < SMALL_SAMPLE}
    if not small:
        return None
    sizes = sorted(set(small.values()))
    if len(sizes) == 1:
        listed = f"{'every cell has' if len(small) == len(summary.get('cells', {})) else ', '.join(small) + ':'} {sizes[0]}"
    else:
        listed = ", ".join(f"{c}: {n}" for c, n in list(small.items())[:8]) + (" …" if len(small) > 8 else "")
    return (
        f"Small samples ({listed} measured requests): with fewer than {SMALL_SAMPLE} requests a p99 is interpolated "
        "between the one or two largest values, close to the maximum. Read it as the worst request, not a stable tail."
    )


def lockstep_note(summary: dict[str, Any], track: str) -> str | None:
    """Where a track compares cells that run the same workload (E0, E3), cells whose closed-loop users
    settled in different regimes, some in waves and some spread out: their TTFTs are not comparable
    as they stand (docs/metrics.md, `lockstep_share`). A sweep's cells differ on purpose."""
    if not get_analysis(track).compares_like_cells:
        return None
    found = {c: ((v.get("metrics") or {}).get("schedule") or {}).get("lockstep_share") for c, v in summary.get("cells", {}).items()}
    share: dict[str, float] = {c: float(s) for c, s in found.items() if s is not None}
    if not share:
        return None
    low, high = min(share, key=lambda c: share[c]), max(share, key=lambda c: share[c])
    if share[high] - share[low] < LOCKSTEP_NOTE_SPREAD:
        return None
    return (
        f"Users in lockstep differ between cells: {high} {share[high]:.0%} of its measured requests left in bursts of "
        f"{LOCKSTEP_MIN_USERS} or more users, {low} {share[low]:.0%} (the Cells table has every cell's share). Users "
        "whose requests end together send together again, and the engine then prefills each wave in one step (and a "
        "disaggregated pair moves its KV at once): a cell in waves and a cell whose users spread out measure "
        "different regimes, and their TTFTs differ for that reason too."
    )


def _facts(packet: Packet) -> dict[str, Any]:
    m = packet.manifest
    pool = {"engine starts": _engine_starts(m.get("engine_pool") or {}), "cell wall times": _cell_walls(m.get("cells") or {})}
    return {
        "run id": m.get("run_id"),
        "track": m.get("track"),
        "evidence": m.get("evidence"),
        "engine": m.get("engine"),
        "serving modes": ", ".join(m.get("serving_modes", [])),
        "model": _model(m.get("model") or {}),
        "config hash": m.get("config_hash"),
        "status": m.get("status"),
        "git": _git(m.get("versions") or {}),
        "hardware": m.get("hardware", {}).get("summary"),
        "started": m.get("started_at"),
        "ended": m.get("ended_at"),
    } | {k: v for k, v in pool.items() if v is not None}


def _engine_starts(pool: dict[str, Any]) -> str | None:
    """Says how many engines the run started: with warm engines a sweep pays one start per engine config."""
    if "engine_starts" not in pool:
        return None
    policy = "warm engines reused" if pool.get("reuse") else "a fresh engine per cell"
    if pool.get("depth", 1) > 1:
        policy += f", the next cell's call queued behind the running one ({pool.get('cells_queued', 0)} cells)"
    return f"{pool['engine_starts']} ({pool.get('cells_on_warm_engines', 0)} cells on warm engines; {policy})"


def _cell_walls(cells: dict[str, Any]) -> str | None:
    """Per-cell wall time beside whether the cell started its engine: what an engine start costs, read
    off the run; the part of it a cell waited behind the one before on its warm engine; and how long
    the engine sat idle between that cell's load and this one's (what warm engines leave of a start)."""

    def notes(c: dict[str, Any]) -> str:
        parts = [str(c["engine"])] if c.get("engine") else []
        parts += [f"{c['setup_s']:.1f} s to start it"] if c.get("engine") == "fresh" and c.get("setup_s") else []
        parts += [f"{c['queued_s']:.1f} s of it queued"] if c.get("queued_s") else []
        parts += [f"engine idle {c['gap_s']:.2f} s before its load"] if isinstance(c.get("gap_s"), (int, float)) else []
        return f" ({', '.join(parts)})" if parts else ""

    walls = [f"{name} {c['wall_s']:.1f} s" + notes(c) for name, c in cells.items() if isinstance(c.get("wall_s"), (int, float))]
    return ", ".join(walls) or None


def _model(model: dict[str, Any]) -> str | None:
    arch = model.get("architecture_hash")
    return f"{model.get('name')}" + (f" (architecture hash {str(arch)[:12]})" if arch else "") if model.get("name") else None


def _git(v: dict[str, Any]) -> str | None:
    sha = v.get("pdbench_git_sha")
    return f"{sha}{' (modified)' if v.get('pdbench_git_dirty') else ''}" if sha else None


def _config(packet: Packet) -> dict[str, Any]:
    f = packet.root / "config.yaml"
    return (yaml.safe_load(f.read_text()) or {}) if f.is_file() else {}


def spread_cells(summary: dict[str, Any], cells: list[str], most: int) -> list[str]:
    """Every cell when at most `most`; else `most` cells spread from the least to the most loaded (by request rate)."""
    if len(cells) <= most:
        return cells
    rate = {c: ((summary.get("cells", {}).get(c) or {}).get("metrics") or {}).get("request_throughput_rps") or 0.0 for c in cells}
    ordered = sorted(cells, key=lambda c: (rate[c], c))
    step = (len(ordered) - 1) / (most - 1)
    return [ordered[round(i * step)] for i in range(most)]


def curves_left_out(drawn: list[str], cells: list[str]) -> str:
    """What the curve figures leave out of a run with more cells than MAX_CURVES."""
    return (
        f"This run has {len(cells):,} cells: the curves here and under Throughput are {len(drawn)} of them, spread from the "
        f"least to the most loaded by request rate ({', '.join(drawn)}). The other {len(cells) - len(drawn):,} cells are left "
        "out of these figures; every cell's percentiles are in the Cells table."
    )


def _curve_sections(packet: Packet) -> list[Section]:
    """Percentile curves and throughput, one curve per cell, at most MAX_CURVES cells."""
    df = packet.requests
    cells = sorted(df["cell_id"].astype(str).unique())
    drawn = spread_cells(packet.summary, cells, MAX_CURVES)
    note = [curves_left_out(drawn, cells)] if len(drawn) < len(cells) else []
    if note:
        df = df[df["cell_id"].astype(str).isin(drawn)]
    return [
        Section(
            title="Latency percentiles",
            text=[
                "Each curve is one cell: the share of requests (y) at or below a latency (x). ITL counts every gap between tokens.",
                *note,
            ],
            figures=[plots.latency_cdfs(df)],
        ),
        Section(title="Throughput", text=["The same cells as the percentile curves."] if note else [], figures=[plots.throughput(df)]),
    ]


def lead_sections(packet: Packet) -> list[Section]:
    """What comes before anything else: the verdict and headline numbers, the workload and SLOs, the cells."""
    head = pd.DataFrame([{"": h.label, "value": h.value} for h in headlines(packet.summary, packet.manifest)])
    track = str(packet.manifest.get("track", ""))
    notes = [n for n in (small_sample_warning(packet.summary), lockstep_note(packet.summary, track)) if n]
    return [
        Section(title="Headline", table=head),
        Section(title="Workload and SLOs", table=workload_table(_config(packet), packet.requests, packet.summary)),
        Section(
            title="Cells",
            text=[
                "Measured requests only (warm-up excluded). Latencies in ms; SLO attainment is the share of measured "
                "requests inside every SLO.",
                *notes,
            ],
            table=cell_table(packet.summary),
        ),
        Section(
            title="Host load",
            text=[
                "Measured on the driver's host over each cell (psutil): load average, CPU stolen by the hypervisor, "
                "and CPU used by processes that are not this run's. A busy host slows requests without anything "
                "being wrong with the engine."
            ],
            table=host_load_rows(packet.summary),
        ),
    ]


def sections(packet: Packet) -> list[Section]:
    df = packet.requests
    # A track's sections read measured rows; a run where no cell measured anything has none.
    out = (
        get_analysis(packet.manifest.get("track", "")).packet_sections(packet)
        if not df.empty
        else [Section(title="No measurements", text=["No cell measured a successful request: the reasons are under Failed cells."])]
    )
    by_cell = packet.summary.get("cells", {})
    failed = {c: v.get("error") for c, v in by_cell.items() if v.get("status") not in ("ok", "refused")}
    if failed:
        out.append(Section(title="Failed cells", table=pd.DataFrame([{"cell": c, "reason": r} for c, r in failed.items()])))
    refused = {c: v.get("error") for c, v in by_cell.items() if v.get("status") == "refused"}
    if refused:
        out.append(
            Section(
                title="Refused cells",
                text=[
                    "Cells whose KV backend cannot run on this machine: each was checked where its engines would run "
                    "and refused with the reason below; nothing fell back to another backend."
                ],
                table=pd.DataFrame([{"cell": c, "reason": r} for c, r in refused.items()]),
            )
        )
    if not df.empty:
        out += _curve_sections(packet)
        cells = spread_cells(packet.summary, sorted(df["cell_id"].astype(str).unique()), MAX_TIMELINES)
        out.append(
            Section(
                title="Request timelines",
                text=[f"One Gantt chart per cell ({', '.join(cells)}): TTFT split into the engine's own stages, then decode."],
                figures=[plots.timeline(df, c) for c in cells],
            )
        )
        if packet.telemetry is not None and not packet.telemetry.empty:
            out.append(Section(title="Telemetry", figures=[plots.telemetry(packet.telemetry)]))
    return out


def markdown_document(
    title: str, warning: str | None, facts: dict[str, Any], secs: list[Section], lead: list[Section] | None = None
) -> str:
    """A report page in Markdown: title, an optional warning quote, the lead sections, a facts table, the sections."""
    lines = [f"# {title}", ""]
    if warning:
        lines += [f"> {warning}", ""]
    for s in lead or []:
        lines += [f"## {s.title}", ""] + [x for t in s.text for x in (t, "")]
        if s.table is not None and not s.table.empty:
            lines += [_md_table(s.table), ""]
    lines += (["## Run", ""] if lead else []) + ["| fact | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.items()]
    for s in secs:
        lines += ["", f"## {s.title}", ""]
        lines += [x for t in s.text for x in (t, "")]
        if s.table is not None and not s.table.empty:
            lines.append(_md_table(s.table))
    return "\n".join(lines) + "\n"


def html_document(
    title: str,
    banner: str,
    simulated: bool,
    facts: dict[str, Any],
    secs: list[Section],
    plotly_js: str = "inline",
    lead: list[Section] | None = None,
) -> str:
    """The same page as HTML; a red banner when simulated. `plotly_js="inline"` embeds plotly.js
    (self-contained, ~4.7 MB); anything else is a URL the page loads it from instead
    (docs/evidence/ keeps one shared copy beside its packets)."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}"
        "th{background:#f2f2f2}"
        ".sim{background:#b00;color:#fff;font-size:2.5em;padding:.4em;text-align:center;font-weight:bold}"
        ".real{background:#064;color:#fff;font-size:1.2em;padding:.3em;text-align:center}</style>",
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        if plotly_js == "inline"
        else f"<script type='text/javascript' src='{e(plotly_js, quote=True)}'></script>",
        "</head><body>",
    ]
    parts.append(f"<div class='{'sim' if simulated else 'real'}'>{e(banner)}</div>")
    parts.append(f"<h1>{e(title)}</h1>")

    def section(s: Section) -> None:
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts.extend(f"<p>{e(t)}</p>" for t in s.text)
        if s.table is not None and not s.table.empty:
            parts.append(s.table.map(_fmt).to_html(index=False, escape=True))
        parts.extend(f.to_html(full_html=False, include_plotlyjs=False) for f in s.figures)

    for s in lead or []:
        section(s)
    parts.append("<h2>Run</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in facts.items()]
    parts.append("</table>")
    for s in secs:
        section(s)
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(packet: Packet, secs: list[Section], lead: list[Section] | None = None) -> str:
    m = packet.manifest
    warning = "**SIMULATED RUN** — analytic latency law, no real engine. Not comparable with real runs." if packet.simulated else None
    title = f"pdbench report — {m.get('track', '?').upper()} `{m.get('run_id')}`"
    return markdown_document(title, warning, _facts(packet), secs, lead if lead is not None else lead_sections(packet))


def render_html(packet: Packet, secs: list[Section], plotly_js: str = "inline", lead: list[Section] | None = None) -> str:
    m = packet.manifest
    evidence = str(m.get("evidence"))
    banner = f"SIMULATED RUN — evidence: {evidence}" if packet.simulated else f"evidence: {evidence}"
    title = f"pdbench {m.get('track')} {m.get('run_id')}"
    lead = lead if lead is not None else lead_sections(packet)
    return html_document(title, banner, packet.simulated, _facts(packet), secs, plotly_js, lead)


def write_reports(packet: Packet, plotly_js: str = "inline") -> None:
    secs, lead = sections(packet), lead_sections(packet)  # built once for both documents (a table row per cell)
    write_text(packet.root / "report.md", render_markdown(packet, secs, lead))
    write_text(packet.root / "report.html", render_html(packet, secs, plotly_js, lead))
