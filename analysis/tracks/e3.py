"""E3 verdict and report: aggregated vs disaggregated on the same workload and engine count.

The oracle: greedy decoding is deterministic, so the disaggregated cell must produce exactly the
aggregated cell's token ids, request by request. Verdict `identical` needs that plus every
request completed; the checks beside it say whether each KV transfer succeeded (a recomputed
prefill also gives identical tokens, but proves nothing about the transfer) and whether the bytes
moved equal the analytic KV size of each prompt.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.formatting import DASH, bytes_rate, ms, num, pct
from analysis.metrics import LOCKSTEP_GAP_S, LOCKSTEP_GAP_SHARE, LOCKSTEP_MIN_USERS, burst_sizes
from analysis.packet import Packet
from analysis.records import measured
from analysis.tracks.base import Headline, Section, TrackAnalysis
from analysis.transfers import ASYNC_TIMES, bytes_vs_analytic, measured_transfers, moving_transfers, with_stall_ratio

MODES = ("aggregated", "disaggregated")
BREAKDOWN = (
    ("server_queue_s", "queue", "#c7c7c7"),
    ("prefill_s", "prefill", "#1f77b4"),
    ("transfer_s", "transfer", "#d62728"),
    ("first_decode_s", "first decode", "#2ca02c"),
)
# How many users sent together (analysis.metrics.burst_sizes): one prompt alone, a few, a wave.
BURSTS = (
    ("alone", 1, 1),
    (f"2–{LOCKSTEP_MIN_USERS - 1} together", 2, LOCKSTEP_MIN_USERS - 1),
    (f"{LOCKSTEP_MIN_USERS}+ together (a wave)", LOCKSTEP_MIN_USERS, None),
)
_SIDE_BY_SIDE = (
    ("TTFT p50 (ms)", ("ttft_s", "p50"), ms),
    ("transfer time per request p50 (ms)", ("transfer_s", "p50"), ms),
    ("transfer time per request p99 (ms)", ("transfer_s", "p99"), ms),
    ("TTFT p99 (ms)", ("ttft_s", "p99"), ms),
    ("TPOT p50 (ms)", ("tpot_s", "p50"), ms),
    ("TPOT p99 (ms)", ("tpot_s", "p99"), ms),
    ("ITL p50 (ms)", ("itl_s", "p50"), ms),
    ("ITL p99 (ms)", ("itl_s", "p99"), ms),
    ("E2E p50 (ms)", ("e2e_s", "p50"), ms),
    ("E2E p99 (ms)", ("e2e_s", "p99"), ms),
    ("request throughput (req/s)", ("request_throughput_rps",), num),
    ("output token throughput (tok/s)", ("output_token_throughput_tps",), num),
    ("goodput (req/s meeting every SLO)", ("goodput_rps",), num),
    ("SLO attainment", ("slo_attainment",), pct),
)


def _cells_of(cells: dict[str, Any], mode: str) -> list[str]:
    return sorted(c for c, m in cells.items() if m.get("serving_mode") == mode)


def backend_of(cell: dict[str, Any], transfers: pd.DataFrame | None = None) -> str:
    """The KV backend a disaggregated cell ran: its label (E3 with params.backends), else what its
    transfer rows name, else the config's (packets from before backends had names)."""
    label = (cell.get("labels") or {}).get("kv_backend")
    if label:
        return str(label)
    named: list[Any] = list(transfers["backend"].dropna().unique()) if transfers is not None and "backend" in transfers else []
    return str(named[0]) if len(named) == 1 else "kv_transfer.backend"


def _verdict(*verdicts: str) -> str:
    """The run's verdict over its disaggregated cells: the worst of theirs."""
    for worst in ("different", "incomplete"):
        if worst in verdicts:
            return worst
    return "identical"


def judge(agg: pd.DataFrame, dis: pd.DataFrame, t: pd.DataFrame) -> dict[str, Any]:
    """One disaggregated cell against the aggregated one: the oracle and its transfer checks."""
    rows = {"aggregated": agg, "disaggregated": dis}
    checks: list[dict[str, Any]] = []
    failed = {m: int((~r["ok"].astype(bool)).sum()) for m, r in rows.items()}
    checks.append({"check": "every request completed in both modes", "ok": not any(failed.values()), "detail": failed})
    a, d = (r.set_index("request_id")["output_token_ids"] for r in (agg, dis))
    missing = sorted(set(a.index) ^ set(d.index))
    common = sorted(set(a.index) & set(d.index))
    mismatches = [rid for rid in common if list(a[rid]) != list(d[rid])]
    checks.append(
        {
            "check": "greedy token ids identical request by request (oracle)",
            "ok": not mismatches and not missing and bool(common),
            "detail": {"requests_compared": len(common), "mismatches": mismatches[:20], "missing": missing[:20]},
        }
    )
    n_req = len(dis)
    if not t.empty and "status" in t:  # requests with nothing to move are no transfer: neither counted nor required
        n_req -= int((t["status"] == "none").sum())
        t = moving_transfers(t)
    t_ok = int(t["ok"].sum()) if not t.empty else 0
    reasons = sorted({str(e) for e in t.loc[~t["ok"], "error"]}) if not t.empty else []
    checks.append(
        {
            "check": "every KV transfer succeeded (none recomputed)",
            "ok": n_req > 0 and len(t) == n_req and t_ok == n_req,
            "detail": {"requests": n_req, "transfers": int(len(t)), "ok": t_ok, "reasons": reasons[:5]},
        }
    )
    if t.empty or t["bytes"].notna().any():  # a backend that moves the KV out of pdbench's sight has no byte count to check
        counts = bytes_vs_analytic(t) if not t.empty else {"exact": 0, "within_padding": 0, "outside": 0}
        checks.append(
            {
                "check": "bytes moved = analytic KV size of each prompt (within block padding)",
                "ok": t_ok > 0 and counts["outside"] == 0 and counts["exact"] + counts["within_padding"] == t_ok,
                "detail": counts,
            }
        )
    if missing or any(failed.values()) or not common:
        verdict = "incomplete"
    else:
        verdict = "identical" if not mismatches else "different"
    return {"verdict": verdict, "checks": checks}


class E3Analysis(TrackAnalysis):
    compares_like_cells = True

    def verdicts_with_transfers(
        self, requests: pd.DataFrame, transfers: pd.DataFrame | None, cells: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        """The oracle per disaggregated cell (one per KV backend) against the aggregated cell; the
        run's verdict is the worst of theirs. One disaggregated cell: its verdict and checks as they are."""
        by_mode = {m: _cells_of(cells, m) for m in MODES}
        if not all(by_mode.values()):
            return {"verdict": "incomplete", "checks": [], "reason": f"needs one ok cell of each mode, got {by_mode}"}
        agg = requests[requests["cell_id"].isin(by_mode["aggregated"])]
        per: dict[str, Any] = {}
        for cid in by_mode["disaggregated"]:
            t = transfers[transfers["cell_id"] == cid] if transfers is not None else pd.DataFrame()
            per[cid] = {"backend": backend_of(cells[cid], t), **judge(agg, requests[requests["cell_id"] == cid], t)}
        if len(per) == 1:
            (only,) = per.values()
            return {"verdict": only["verdict"], "checks": only["checks"], "backends": per}
        checks = [{**c, "check": f"{cid} ({v['backend']}): {c['check']}"} for cid, v in per.items() for c in v["checks"]]
        return {"verdict": _verdict(*(v["verdict"] for v in per.values())), "checks": checks, "backends": per}

    def headline(self, summary: dict[str, Any]) -> list[Headline]:
        cells = summary.get("cells", {})
        agg = next((c.get("metrics") for c in cells.values() if c.get("serving_mode") == "aggregated" and c.get("metrics")), None)
        disagg = {cid: c["metrics"] for cid, c in cells.items() if c.get("serving_mode") == "disaggregated" and c.get("metrics")}
        out = []
        for cid, d_metrics in disagg.items() if agg else ():
            name = "disaggregated" if len(disagg) == 1 else cid  # one line per backend when E3 compares several
            for label, path, fmt, unit in (
                ("TTFT p50", ("ttft_s", "p50"), ms, " ms"),
                ("TPOT p50", ("tpot_s", "p50"), ms, " ms"),
                ("output throughput", ("output_token_throughput_tps",), num, " tok/s"),
            ):
                a, d = _get(agg, path), _get(d_metrics, path)
                ratio = f" (×{d / a:.2f})" if a and d is not None else ""
                out.append(Headline(f"{label} aggregated → {name}", f"{fmt(a)}{unit} → {fmt(d)}{unit}{ratio}"))
        for cid, c in cells.items():
            t = c.get("transfers")
            if t:
                out.append(
                    Headline(
                        f"KV transfers ({cid})",
                        f"{t['ok']}/{t['transfers']} ok; {moved_text(t)} for "
                        f"{num((t['analytic_bytes_total'] or 0) / 1e6)} MB of analytic KV",
                    )
                )
        return out

    def packet_sections(self, packet: Packet) -> list[Section]:
        summary = packet.summary
        out: list[Section] = [verdict_section(packet)] if summary.get("verdicts") else []
        out.append(Section(title="Aggregated vs disaggregated", table=side_by_side(summary)))
        df = measured(packet.requests) if not packet.requests.empty else packet.requests
        if not df.empty:
            table = ttft_breakdown(df)
            out.append(
                Section(
                    title="TTFT breakdown (mean, ms)",
                    text=[
                        "Engine-side parts, each measured in the process where it happens; `other` is what is left "
                        "of the client's TTFT (actor hops, streaming)."
                    ],
                    table=table,
                    figures=[breakdown_figure(table)],
                )
            )
            out.append(
                Section(
                    title="TTFT by how many users sent together",
                    text=[
                        "Closed-loop users whose requests end together send together again (the Cells table's "
                        f'"users in lockstep"). Sends each closer to the one before than {LOCKSTEP_GAP_S * 1e3:g} ms and '
                        f"than {LOCKSTEP_GAP_SHARE:g} of the cell's mean gap between sends count as together: "
                        "such a wave is prefilled in one step and its KV moved at once, so a transfer path whose "
                        "bandwidth the wave shares shows a transfer time that grows with the wave."
                    ],
                    table=by_burst(df),
                )
            )
        t = packet.transfers
        if t is not None and not t.empty:
            moved = with_stall_ratio(measured_transfers(t), df)
            out.append(
                Section(
                    title="KV transfer accounting",
                    text=[
                        "Per stage over successful transfers: extract and put on the prefill side, wait for the "
                        "reference, fetch (ray.wait fetch_local), get and inject on the decode side. Stall = "
                        "wait_ref + fetch; stall ratio = stall / request E2E. Asynchronous loads (vLLM): queued = "
                        "the step that started the load → a worker took it; kv_wait = that step → KV injected (the "
                        "request could not run meanwhile); ready_to_injected = the sender's KV complete → the "
                        "receiver's KV injected (one host's monotonic clock).",
                        *transfer_totals(summary),
                    ],
                    table=transfer_table(summary),
                    figures=[throughput_figure(moved), stall_figure(moved)],
                )
            )
        return out


def verdict_section(packet: Packet) -> Section:
    """The oracle's verdict and its checks (per backend where several ran)."""
    summary = packet.summary
    v = summary["verdicts"]
    n = request_counts(packet.requests)
    rows = [{"check": c["check"], "result": "pass" if c["ok"] else "FAIL", "evidence": evidence(c["detail"], n)} for c in v["checks"]]
    return Section(
        title=f"E3 oracle verdict: {v['verdict']}",
        text=[
            "The same requests ran aggregated (two engine replicas, requests spread over them) and "
            "disaggregated (a prefill engine and a decode engine, the KV moved by the cell's KV backend: "
            f"{backends_text(summary)}). Greedy decoding is deterministic: identical means every request's "
            "token ids match; with several backends each disaggregated cell is judged against the aggregated one."
        ]
        + [
            "The checks cover every request sent, warm-up included (a warm-up request's tokens must match "
            f"too): {counts_text(packet.requests)}. The tables and figures below cover the measured requests only."
        ]
        + ([reason_text(v["reason"])] if v.get("reason") else []),
        table=pd.DataFrame(rows) if rows else None,
    )


def request_counts(requests: pd.DataFrame) -> dict[str, int]:
    """Requests per serving mode, warm-up included: what the checks count."""
    if requests.empty:
        return {}
    return {str(k): int(v) for k, v in requests.groupby("serving_mode").size().items()}


def counts_text(requests: pd.DataFrame) -> str:
    if requests.empty:
        return "no requests"
    parts = []
    for mode, g in requests.groupby("serving_mode", sort=True):
        w = int(g["warmup"].astype(bool).sum())
        parts.append(f"{mode} {len(g)} ({w} warm-up + {len(g) - w} measured)")
    return ", ".join(parts)


def reason_text(reason: str) -> str:
    return reason.replace("{", "").replace("}", "").replace("'", "")


def evidence(detail: dict[str, Any], counts: dict[str, int]) -> str:
    """One readable line per check, in place of the raw detail dict."""
    if "requests_compared" in detail:
        out = f"{detail['requests_compared']} requests compared (warm-up included)"
        if detail.get("mismatches"):
            out += f"; token ids differ: {', '.join(map(str, detail['mismatches']))}"
        if detail.get("missing"):
            out += f"; ran in one mode only: {', '.join(map(str, detail['missing']))}"
        return out if (detail.get("mismatches") or detail.get("missing")) else out + "; all identical"
    if "transfers" in detail:
        out = f"{detail['ok']}/{detail['requests']} requests' KV transferred ({detail['transfers']} transfers attempted)"
        return out + (f"; failures: {'; '.join(detail['reasons'])}" if detail.get("reasons") else "")
    if set(detail) >= {"exact", "within_padding", "outside"}:
        return f"{detail['exact']} exact, {detail['within_padding']} within block padding, {detail['outside']} outside"
    if set(detail) <= set(MODES):  # failed requests per mode
        return ", ".join(f"{m}: {detail[m]} failed of {counts.get(m, 0)}" for m in MODES if m in detail)
    return ", ".join(f"{k} {x}" for k, x in detail.items())


def moved_text(t: dict[str, Any]) -> str:
    if t.get("bytes_total") is None:
        return "bytes moved not visible to pdbench (the backend moves them inside vLLM)"
    return f"{num(t['bytes_total'] / 1e6)} MB moved"


def backends_text(summary: dict[str, Any]) -> str:
    cells = summary.get("cells", {})
    return ", ".join(f"{c} {backend_of(cells[c])}" for c in _cells_of(cells, "disaggregated")) or "none"


def _get(m: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    cur: Any = m
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur if isinstance(cur, (int, float)) else None


def side_by_side(summary: dict[str, Any]) -> pd.DataFrame:
    """The aggregated cell, then each disaggregated cell (one per KV backend) with its ratio to
    the aggregated one; a cell that did not measure shows its status instead of numbers."""
    cells = summary.get("cells", {})
    agg: dict[str, Any] = next((cells[c] for c in _cells_of(cells, "aggregated")), {})
    dis = {c: cells[c] for c in _cells_of(cells, "disaggregated")}
    head: dict[str, Any] = {"metric": "KV backend / status", "aggregated": agg.get("status") or DASH}
    for c, cell in dis.items():
        head[c] = f"{backend_of(cell)} / {cell.get('status')}"
        head[f"{c} / aggregated"] = str(cell.get("error") or "") if cell.get("status") != "ok" else ""
    rows = [head]
    for name, path, fmt in _SIDE_BY_SIDE:
        a = _get(agg.get("metrics"), path)
        row: dict[str, Any] = {"metric": name, "aggregated": fmt(a)}
        for c, cell in dis.items():
            d = _get(cell.get("metrics"), path)
            row[c] = fmt(d)
            row[f"{c} / aggregated"] = f"×{d / a:.2f}" if a and d is not None else DASH
        rows.append(row)
    return pd.DataFrame(rows)


def ttft_breakdown(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cell, g in df[df["ok"].astype(bool)].groupby("cell_id", sort=True):
        parts = {label: float(g[col].fillna(0.0).mean()) * 1e3 for col, label, _ in BREAKDOWN}
        ttft = float(g["ttft_s"].mean()) * 1e3
        rows.append({"cell": cell, **parts, "other": max(ttft - sum(parts.values()), 0.0), "TTFT": ttft})
    return pd.DataFrame(rows)


def by_burst(df: pd.DataFrame) -> pd.DataFrame:
    """TTFT and its prefill and transfer by how many users sent together, per cell (completed
    measured requests). A wave's prompts are prefilled in one step and their KV moved at once, so a
    transfer path whose bandwidth the wave's prompts must share shows a transfer time that grows
    with the wave, as one that moves them side by side at full speed does not; and two cells whose
    users were in waves to a different extent are compared request for request."""
    rows = []
    for cell, g in df.groupby("cell_id", sort=True):
        size = burst_sizes(g["t_sent"].to_numpy(float))
        done = g["ok"].astype(bool).to_numpy()
        for label, lo, hi in BURSTS:
            upper = size.max() if hi is None else hi
            sub = g[done & (size >= lo) & (size <= upper)]
            if sub.empty:
                continue
            row = {"cell": cell, "sent": label, "requests": len(sub), "TTFT p50 (ms)": ms(sub["ttft_s"].median())}
            for col, label_ in (("prefill_s", "prefill p50 (ms)"), ("transfer_s", "transfer p50 (ms)")):
                row[label_] = ms(sub[col].median()) if col in sub and sub[col].notna().any() else DASH
            rows.append(row)
    return pd.DataFrame(rows)


def breakdown_figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for _, label, color in (*BREAKDOWN, ("", "other", "#ffbb78")):
        fig.add_trace(go.Bar(x=table["cell"], y=table[label], name=label, marker_color=color))
    title = "TTFT breakdown: queue → prefill → transfer → first decode (mean)"
    fig.update_layout(barmode="stack", title=title, yaxis_title="ms", height=420)
    return fig


def transfer_table(summary: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for cid, cell in sorted(summary.get("cells", {}).items()):
        t = cell.get("transfers")
        if not t:
            continue
        for stage in ("extract_s", "put_s", "wait_ref_s", "fetch_s", "get_s", "inject_s", "total_s", "stall_s", *ASYNC_TIMES):
            if stage not in t["stages_s"]:
                continue
            d = t["stages_s"].get(stage) or {}
            tp = (t["throughput_bytes_per_s"].get(stage) or {}).get("p50")
            rows.append(
                {
                    "cell": cid,
                    "stage": stage[:-2].replace("_", " "),
                    "p50 (ms)": ms(d.get("p50")),
                    "p99 (ms)": ms(d.get("p99")),
                    "sum (ms)": ms(t["stage_totals_s"].get(stage)),
                    "throughput p50": bytes_rate(tp),
                }
            )
    return pd.DataFrame(rows)


def transfer_totals(summary: dict[str, Any]) -> list[str]:
    out = []
    for cid, cell in sorted(summary.get("cells", {}).items()):
        t = cell.get("transfers")
        if not t:
            continue
        ratio = (t.get("stall_ratio") or {}).get("p50")
        reasons = "; ".join(f"{n}× {r}" for r, n in t["failure_reasons"].items()) or "none"
        out.append(
            f"{cid}: {t['ok']}/{t['transfers']} transfers of measured requests ok (failures: {reasons}); "
            f"{moved_text(t)} for {num((t['analytic_bytes_total'] or 0) / 1e6)} MB of analytic KV "
            f"(overhead {pct(t['overhead_ratio'])}); stall ratio p50 {num(ratio)}."
        )
        for engine, c in sorted((cell.get("kv_connector") or {}).items()):
            out.append(
                f"{cid}: the {engine} engine's steps spent {c['blocked_s'] * 1e3:,.1f} ms in the KV connector over "
                f"{c['steps']:,} steps ({c['loads']} loads, {c['saves']} saves) during {c['load_wall_s']:.1f} s of load: "
                f"stall {c['stall']:.2%} of wall time."
            )
    return out


def throughput_figure(t: pd.DataFrame) -> go.Figure:
    ok = t[t["ok"]]
    fig = go.Figure()
    for stage in ("total_s", "put_s", "fetch_s", "inject_s"):
        good = ok[ok[stage] > 0]
        fig.add_trace(
            go.Scatter(
                x=good["bytes"].astype("float64"),
                y=good["bytes"].astype("float64") / good[stage] / 1e6,
                mode="markers",
                name=stage[:-2],
            )
        )
    fig.update_layout(
        title="KV transfer throughput vs size", xaxis={"title": "bytes", "type": "log"}, yaxis={"title": "MB/s", "type": "log"}, height=420
    )
    return fig


def stall_figure(t: pd.DataFrame) -> go.Figure:
    ok = t[t["ok"] & t["stall_ratio"].notna()]
    fig = go.Figure(go.Histogram(x=ok["stall_ratio"], nbinsx=30, name="stall ratio"))
    title = "Stall ratio (decode-side wait for KV ÷ request E2E)"
    fig.update_layout(title=title, xaxis_title="stall ratio", yaxis_title="requests", height=380)
    return fig


ANALYSIS = E3Analysis()
