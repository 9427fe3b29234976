"""E0 verdict: reproducible only if the config hash, every greedy token and the medians agree."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import pandas as pd

from analysis.metrics import cell_metrics, SLO
from analysis.records import measured
from analysis.tracks.base import Section, TrackAnalysis

# Medians compared between repeats (name in summary.json → how to read it).
_MEDIANS = {
    "output_token_throughput_tps": lambda m: m["output_token_throughput_tps"],
    "ttft_s.p50": lambda m: m["ttft_s"]["p50"],
    "tpot_s.p50": lambda m: m["tpot_s"]["p50"],
    "e2e_s.p50": lambda m: m["e2e_s"]["p50"],
}


def _rel_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    hi = max(abs(a), abs(b))
    return 0.0 if hi == 0 else abs(a - b) / hi


class E0Analysis(TrackAnalysis):
    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        tol = float(params.get("tolerance", 0.25))
        ids = sorted(cells)
        repeats = int(params.get("repeats", 2))
        if len(ids) < repeats:  # a crashed repeat is no evidence of reproducibility
            return {"verdict": "incomplete", "tolerance": tol, "checks": [
                {"check": "every repeat finished", "ok": False, "detail": {"finished": ids, "repeats": repeats}}]}
        checks: list[dict[str, Any]] = []
        hashes = {c: cells[c].get("config_hash") for c in ids}
        checks.append(
            {"check": "config hash identical", "ok": len(set(hashes.values())) == 1, "detail": hashes}
        )
        # The same config must also have built the same model: engines report a weight checksum.
        weights = {c: ((cells[c].get("engine_info") or {}).get("extra") or {}).get("weight_checksum") for c in ids}
        if any(weights.values()):
            checks.append(
                {"check": "engine weights identical", "ok": len(set(weights.values())) == 1, "detail": weights}
            )
        df = measured(requests)
        tokens = {c: df[df["cell_id"] == c].set_index("request_id")["output_token_ids"] for c in ids}
        failed = int((~df["ok"].astype(bool)).sum())
        checks.append({"check": "every request completed", "ok": failed == 0, "detail": {"failed": failed}})
        mismatched: list[str] = []
        for a, b in combinations(ids, 2):
            if set(tokens[a].index) != set(tokens[b].index):
                mismatched.append(f"{a}/{b}: different request ids")
                continue
            for rid in tokens[a].index:
                if list(tokens[a][rid]) != list(tokens[b][rid]):
                    mismatched.append(f"{a}/{b}:{rid}")
        checks.append(
            {
                "check": "greedy token ids identical request by request",
                "ok": not mismatched,
                "detail": {"requests_compared": int(len(tokens[ids[0]])) if ids else 0, "mismatches": mismatched[:20]},
            }
        )
        metrics = {c: cell_metrics(df[df["cell_id"] == c], SLO()) for c in ids}
        for name, get in _MEDIANS.items():
            worst = max((_rel_diff(get(metrics[a]), get(metrics[b])) or 0.0 for a, b in combinations(ids, 2)), default=0.0)
            checks.append(
                {
                    "check": f"{name} within {tol:.0%}",
                    "ok": worst <= tol,
                    "detail": {"values": {c: get(metrics[c]) for c in ids}, "max_relative_difference": worst},
                }
            )
        verdict = "reproducible" if all(c["ok"] for c in checks) else "not reproducible"
        return {"verdict": verdict, "tolerance": tol, "checks": checks}

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        v = summary.get("verdicts", {})
        if not v:
            return []
        rows = [
            {"check": c["check"], "result": "pass" if c["ok"] else "FAIL", "evidence": _short(c["detail"])}
            for c in v["checks"]
        ]
        return [
            Section(
                title=f"E0 verdict: {v['verdict']}",
                text=[
                    f"The same workload ran {len(summary.get('cells', {}))} times with the same seed. "
                    f"Reproducible means: identical config hash, identical greedy token ids for every "
                    f"request, and throughput/latency medians within {v['tolerance']:.0%} of each other."
                ],
                table=pd.DataFrame(rows),
            )
        ]


def _short(detail: dict[str, Any]) -> str:
    if "values" in detail:
        vals = ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in detail["values"].items())
        return f"{vals}; max rel. diff {detail['max_relative_difference']:.1%}"
    if "mismatches" in detail:
        return f"{detail['requests_compared']} requests compared; mismatches: {detail['mismatches'] or 'none'}"
    return ", ".join(f"{k}={str(x)[:16]}" for k, x in detail.items())


ANALYSIS = E0Analysis()
