"""What a reader looks at first, shared by the terminal summary and the report: the verdict and the
track's headline numbers, and one formatted row per cell."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from analysis.formatting import DASH, ms, num, pct
from analysis.tracks import Headline, get_analysis


def _q(m: dict[str, Any], key: str, q: str) -> Any:
    return (m.get(key) or {}).get(q)


def natural_key(cell_id: str) -> list[Any]:
    """poisson-r8.961 before poisson-r17.92: numbers inside cell ids compare as numbers."""
    return [float(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+(?:\.\d+)?)", cell_id))]


def cell_rows(summary: dict[str, Any], latencies: tuple[str, ...] = ("ttft_s", "tpot_s", "itl_s", "e2e_s")) -> pd.DataFrame:
    """One row per cell, every value a formatted string: rates, latencies (ms), SLO attainment (%)."""
    names = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "E2E"}
    rows = []
    for cid, c in sorted(summary.get("cells", {}).items(), key=lambda kv: natural_key(kv[0])):
        m = c.get("metrics") or {}
        row = {
            "cell": cid,
            "status": c.get("status") or DASH,
            "mode": c.get("serving_mode") or DASH,
            "requests ok/all": f"{m.get('completed', 0)}/{m.get('requests', 0)}" if m else DASH,
            "req/s": num(m.get("request_throughput_rps")),
            "out tok/s": num(m.get("output_token_throughput_tps")),
        }
        for key in latencies:
            for q in ("p50", "p99"):
                row[f"{names[key]} {q} (ms)"] = ms(_q(m, key, q))
        row["SLO attainment"] = pct(m.get("slo_attainment"))
        row.update(_schedule_columns(m))
        rows.append(row)
    df = pd.DataFrame(rows)
    # Columns no cell has anything for (a closed loop has no offered rate) are left out.
    return df[[c for c in df.columns if c not in _SCHEDULE_COLUMNS or (df[c] != DASH).any()]] if not df.empty else df


def _yes_no(x: Any) -> str:
    return DASH if x is None else ("yes" if x else "NO")


_SCHEDULE_COLUMNS = (
    "offered req/s",
    "sent req/s",
    "send lag p99 (ms)",
    "schedule kept",
    "steady TTFT p50 (ms)",
    "TTFT p50 Q1→Q4 (ms)",
    "steady",
    "users in lockstep",
    "harness TTFT p50 (ms)",
)


def _schedule_columns(m: dict[str, Any]) -> dict[str, str]:
    """Offered vs achieved rate, send lag, the steady-state window, a closed loop's lockstep and the
    harness's share of TTFT, with the two flags (docs/metrics.md: `schedule_kept`, `steady`,
    `lockstep_share`, `harness`)."""
    sch = m.get("schedule") or {}
    st = m.get("steady_state") or {}
    q = [v for v in (st.get("ttft_p50_by_quartile_s") or []) if v is not None]
    return {
        "offered req/s": num(sch.get("target_rate_rps")),
        "sent req/s": num(sch.get("achieved_rate_rps")),
        "send lag p99 (ms)": ms(_q(sch, "send_lag_s", "p99")),
        "schedule kept": _yes_no(sch.get("schedule_kept")),
        "steady TTFT p50 (ms)": ms(_q(st, "ttft_s", "p50")),
        "TTFT p50 Q1→Q4 (ms)": " → ".join(ms(v) for v in q) or DASH,
        "steady": _yes_no(st.get("steady")),
        "users in lockstep": pct(sch.get("lockstep_share")),
        "harness TTFT p50 (ms)": ms(_q(m.get("harness") or {}, "ttft_s", "p50")),
    }


def headlines(summary: dict[str, Any], manifest: dict[str, Any]) -> list[Headline]:
    """Run status and verdict, then what the track says matters most."""
    cells = summary.get("cells", {})
    ok = sum(c.get("status") == "ok" for c in cells.values())
    out = [Headline("status", f"{manifest.get('status', DASH)} ({ok}/{len(cells)} cells ok), evidence {manifest.get('evidence', DASH)}")]
    verdict = (summary.get("verdicts") or {}).get("verdict")
    if verdict:
        out.append(Headline("verdict", str(verdict)))
    out += get_analysis(str(manifest.get("track", ""))).headline(summary)
    return out


def host_load_rows(summary: dict[str, Any]) -> pd.DataFrame:
    """How busy the driver's host was during each cell (cluster/hostload.py): why timing may have moved."""
    rows = []
    for cid, c in sorted(summary.get("cells", {}).items(), key=lambda kv: natural_key(kv[0])):
        h = c.get("host_load")
        if h:
            rows.append(
                {
                    "cell": cid,
                    "cores": h["cores"],
                    "load avg (1 min)": f"{h['load_avg_1m']:.2f}",
                    "CPU busy": f"{h['cpu_busy_percent']:.0f}%",
                    "CPU steal": f"{h['cpu_steal_percent']:.1f}%",
                    "CPU of other processes": f"{h['other_processes_cpu_percent']:.0f}%",
                }
            )
    return pd.DataFrame(rows)
