"""E0 verdict: correctness (config, weights, tokens) decides reproducibility; timing is judged apart.

Identical greedy tokens from the same config and weights are what "reproducible" means. Timing on
a shared host moves for reasons outside the run (other processes, a noisy neighbour), so the
medians are compared against the larger of the configured tolerance and the noise the run itself
measured: each repeat's requests are split into blocks (in send order), and the spread of the
block values gives the standard error of that repeat's median.

Repeats run interleaved in rounds (cells rep0.round0, rep1.round0, rep0.round1, ...), each cell one
stretch of the same requests, so every repeat samples the same stretches of time. A repeat is all
its rounds merged back: its tokens are compared request by request, its timing computed over every
round (throughput: tokens over the rounds' summed durations, never the gaps between them). A timing difference beyond both
is reported as unstable timing, beside the host load recorded for each repeat, never as a
correctness failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from analysis.formatting import num
from analysis.records import measured
from analysis.tracks.base import Headline, Section, TrackAnalysis
from workloads.tracks.e0 import E0Params

NOISE_BLOCKS = 4  # blocks each repeat is split into to measure its own noise
NOISE_SIGMAS = 3.0  # a difference within this many standard errors is noise


def _throughput(g: pd.DataFrame) -> float | None:
    # Send times are per cell: each round's duration is its own, summed over the repeat's rounds.
    dur = sum(float(r["t_last_token"].max() - r["t_sent"].min()) for _, r in g.groupby("cell_id")) if not g.empty else 0.0
    return float(g["output_tokens"].sum()) / dur if dur > 0 else None


def _median(col: str) -> Callable[[pd.DataFrame], float | None]:
    def get(g: pd.DataFrame) -> float | None:
        x = g[col].dropna()
        return float(x.median()) if not x.empty else None

    return get


# Timing compared between repeats (name in the checks → how to compute it from requests).
_MEDIANS: dict[str, Callable[[pd.DataFrame], float | None]] = {
    "output token throughput": _throughput,
    "TTFT median": _median("ttft_s"),
    "TPOT median": _median("tpot_s"),
    "E2E median": _median("e2e_s"),
}


def _rel_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    hi = max(abs(a), abs(b))
    return 0.0 if hi == 0 else abs(a - b) / hi


def relative_noise(g: pd.DataFrame, get: Callable[[pd.DataFrame], float | None]) -> float:
    """Relative standard error of `get` over one repeat, from its values on blocks of requests."""
    g = g.sort_values(["round", "t_sent"] if "round" in g else "t_sent")
    k = min(NOISE_BLOCKS, len(g) // 4)
    if k < 2:
        return 0.0
    vals = [v for b in np.array_split(np.arange(len(g)), k) if (v := get(g.iloc[b])) is not None]
    if len(vals) < 2 or not np.mean(vals):
        return 0.0
    return float(np.std(vals, ddof=1) / abs(np.mean(vals)) / math.sqrt(len(vals)))


def _repeat_of(cell_id: str, meta: dict[str, Any]) -> tuple[str, int]:
    """(repeat, round) of a cell from its labels; a cell without them is a whole repeat."""
    labels = meta.get("labels") or {}
    return (f"rep{labels['repeat']}" if "repeat" in labels else cell_id), int(labels.get("round", 0))


def _incomplete(tol: float, rounds: int, finished: list[str], repeats: int) -> dict[str, Any]:
    return {
        "verdict": "incomplete",
        "tolerance": tol,
        "rounds": rounds,
        "checks": [
            {"check": "every repeat finished", "kind": "correctness", "ok": False, "detail": {"finished": finished, "repeats": repeats}}
        ],
    }


def _identity_checks(cells: dict[str, Any], where: dict[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """Same config and same weights in every repeat."""
    # A round's cells must be the same cell config (the same stretch of requests) in every repeat.
    hashes = {c: cells[c].get("config_hash") for c in sorted(cells)}
    same = all(len({h for c, h in hashes.items() if where[c][1] == r}) == 1 for r in {rd for _, rd in where.values()})
    checks = [{"check": "config hash identical", "kind": "correctness", "ok": same, "detail": hashes}]
    # The same config must also have built the same model: engines report a weight checksum.
    weights = {c: ((cells[c].get("engine_info") or {}).get("extra") or {}).get("weight_checksum") for c in sorted(cells)}
    if any(weights.values()):
        checks.append(
            {"check": "engine weights identical", "kind": "correctness", "ok": len(set(weights.values())) == 1, "detail": weights}
        )
    return checks


def _token_checks(df: pd.DataFrame, ids: list[str]) -> list[dict[str, Any]]:
    """Every request completed, and greedy tokens equal request by request between repeats."""
    tokens = {c: df[df["repeat"] == c].set_index("request_id")["output_token_ids"] for c in ids}
    failed = int((~df["ok"].astype(bool)).sum())
    mismatched: list[str] = []
    for a, b in combinations(ids, 2):
        if set(tokens[a].index) != set(tokens[b].index):
            mismatched.append(f"{a}/{b}: different request ids")
            continue
        mismatched += [f"{a}/{b}:{rid}" for rid in tokens[a].index if list(tokens[a][rid]) != list(tokens[b][rid])]
    detail = {"requests_compared": len(tokens[ids[0]]) if ids else 0, "mismatches": mismatched[:20]}
    return [
        {"check": "every request completed", "kind": "correctness", "ok": failed == 0, "detail": {"failed": failed}},
        {"check": "greedy token ids identical request by request", "kind": "correctness", "ok": not mismatched, "detail": detail},
    ]


def _timing_checks(df: pd.DataFrame, ids: list[str], tol: float) -> list[dict[str, Any]]:
    """Each timing median within the larger of the tolerance and the noise the repeats measured."""
    done = {c: df[(df["repeat"] == c) & df["ok"].astype(bool)] for c in ids}
    checks = []
    for name, get in _MEDIANS.items():
        values = {c: get(done[c]) for c in ids}
        noise = {c: relative_noise(done[c], get) for c in ids}
        worst, band = 0.0, tol
        for a, b in combinations(ids, 2):
            worst = max(worst, _rel_diff(values[a], values[b]) or 0.0)
            band = max(band, NOISE_SIGMAS * math.hypot(noise[a], noise[b]))
        detail = {"metric": name, "values": values, "max_relative_difference": worst, "noise_relative_se": noise, "allowed": band}
        checks.append({"check": f"{name} within max({tol:.0%}, measured noise)", "kind": "timing", "ok": worst <= band, "detail": detail})
    return checks


class E0Analysis(TrackAnalysis):
    compares_like_cells = True

    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        p = {**E0Params().model_dump(), **params}
        tol, repeats = float(p["tolerance"]), int(p["repeats"])
        # Not the planning default: a packet from before rounds existed ran each repeat as one cell.
        rounds = int(params.get("rounds", 1))
        where = {c: _repeat_of(c, m) for c, m in cells.items()}
        finished = {r: sorted(c for c, (rr, _) in where.items() if rr == r) for r, _ in where.values()}
        ids = sorted(r for r, cs in finished.items() if len(cs) >= rounds)
        if len(ids) < repeats:  # a crashed repeat (or round) is no evidence of reproducibility
            return _incomplete(tol, rounds, ids, repeats)
        df = measured(requests)
        df = df[df["cell_id"].isin(list(where))]
        df = df.assign(repeat=df["cell_id"].map(lambda c: where[c][0]), round=df["cell_id"].map(lambda c: where[c][1]))
        checks = _identity_checks(cells, where) + _token_checks(df, ids) + _timing_checks(df, ids, tol)
        correct = all(c["ok"] for c in checks if c["kind"] == "correctness")
        stable = all(c["ok"] for c in checks if c["kind"] == "timing")
        verdict = "not reproducible" if not correct else ("reproducible" if stable else "reproducible, timing unstable")
        return {
            "verdict": verdict,
            "correctness": "pass" if correct else "fail",
            "timing": "stable" if stable else "unstable",
            "tolerance": tol,
            "rounds": rounds,
            "checks": checks,
        }

    def headline(self, summary: dict[str, Any]) -> list[Headline]:
        v = summary.get("verdicts") or {}
        if not v.get("checks"):
            return []
        out = []
        bad = [c["check"] for c in v["checks"] if c.get("kind", "correctness") == "correctness" and not c["ok"]]
        tokens = next((c["detail"] for c in v["checks"] if c["check"].startswith("greedy")), None)
        if bad:
            out.append(Headline("correctness", "FAIL: " + "; ".join(bad)))
        elif tokens:
            n = tokens["requests_compared"]
            out.append(Headline("correctness", f"pass: config, weights and greedy tokens of {n} requests identical"))
        timing = [c for c in v["checks"] if c.get("kind") == "timing"]
        if timing:
            # The check nearest its allowance (or furthest past it) says how close timing came to unstable.
            worst = max(timing, key=lambda c: c["detail"]["max_relative_difference"] - c["detail"]["allowed"])
            d = worst["detail"]
            out.append(
                Headline(
                    "timing",
                    f"{v.get('timing')}: nearest its limit, {d.get('metric', worst['check'])} differs by "
                    f"{d['max_relative_difference']:.1%} between repeats (allowed {d['allowed']:.1%})",
                )
            )
        loads = [c["host_load"] for c in summary.get("cells", {}).values() if c.get("host_load")]
        if loads:
            out.append(
                Headline(
                    "host load",
                    f"load average up to {num(max(h['load_avg_1m'] for h in loads))} on {loads[0]['cores']} cores; "
                    f"other processes up to {max(h['other_processes_cpu_percent'] for h in loads):.0f}% CPU, "
                    f"steal up to {max(h['cpu_steal_percent'] for h in loads):.1f}%",
                )
            )
        return out

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        if not v:
            return []
        cells = summary.get("cells", {})
        kind = {c["check"]: c.get("kind", "correctness") for c in v["checks"]}
        rows = [
            {"check": c["check"], "result": "pass" if c["ok"] else "FAIL", "evidence": _short(c["check"], c["detail"])} for c in v["checks"]
        ]
        correctness = pd.DataFrame([r for r in rows if kind[r["check"]] == "correctness"])
        repeats = len({_repeat_of(c, m)[0] for c, m in cells.items()})
        rounds = int(v.get("rounds", 1))
        interleaved = (
            f", the repeats interleaved in {rounds} rounds (each round one stretch of the requests, run by every "
            "repeat in turn, so all repeats sample the same stretches of time; a repeat's checks merge its rounds)"
            if rounds > 1
            else ""
        )
        timing = pd.DataFrame([r for r in rows if kind[r["check"]] == "timing"])
        out = [
            Section(
                title=f"E0 verdict: {v['verdict']}",
                text=[
                    f"The same workload ran {repeats} times with the same seed{interleaved}. Reproducible means: identical "
                    "config hash and engine weights, every request completed, and identical greedy token ids for "
                    "every request. Timing is judged apart (below): it can only make the verdict say the timing "
                    "was unstable, never that identical tokens did not reproduce."
                ],
                table=correctness,
            )
        ]
        if not timing.empty:
            out.append(
                Section(
                    title=f"E0 timing: {v.get('timing', 'stable')}",
                    text=[
                        f"Medians between repeats may differ by the larger of {v['tolerance']:.0%} and the noise each "
                        f"repeat measured itself ({NOISE_SIGMAS:g} standard errors of the difference, from "
                        f"{NOISE_BLOCKS} blocks of requests per repeat). The host load table (with the cells) says whether other "
                        "work on the machine moved the timing."
                    ],
                    table=timing,
                )
            )
        return out


def _value(name: str, x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    return f"{x:.1f} tok/s" if name.startswith("output token") else f"{x * 1e3:.1f} ms"


def _short(name: str, detail: dict[str, Any]) -> str:
    """One readable line of evidence per check (no raw dicts)."""
    if "values" in detail:
        vals = ", ".join(f"{k} {_value(name, x)}" for k, x in detail["values"].items())
        noise = ", ".join(f"{k} ±{x:.1%}" for k, x in (detail.get("noise_relative_se") or {}).items())
        allowed = detail.get("allowed")
        extra = f"; allowed {allowed:.1%} (noise s.e.: {noise})" if allowed is not None else ""
        return f"{vals}; max difference {detail['max_relative_difference']:.1%}{extra}"
    if "mismatches" in detail:
        return f"{detail['requests_compared']} requests compared; mismatches: {', '.join(detail['mismatches']) or 'none'}"
    if "failed" in detail:
        return f"{detail['failed']} failed"
    if "finished" in detail:
        return f"finished {', '.join(detail['finished']) or 'none'} of {detail['repeats']} repeats"
    return ", ".join(f"{k} {str(x)[:12]}" for k, x in detail.items())


ANALYSIS = E0Analysis()
