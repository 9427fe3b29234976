"""Where a GPU run's wall time went, read from its packet alone, for runs compared side by side.

A packet from the lent GPU machine travels without its `cells/` folder, and 1-second GPU
utilisation cannot see a sub-second gap between two cells. What the packet does hold: the GPU's
memory over time (telemetry.parquet), so the moment the engine had its KV cache (memory past half
its peak: the end of the engine's start), and every request's send and last token on the load
generator's clock, per cell and per phase (requests.parquet). From these, per run:

- `engine_ready_s`: run start to the KV cache allocated (Ray, the engine process, weights, profile);
- `warmup_s`, `measured_s`: the cells' warm-up and measured loads, first send to last token, summed;
- `rest_s`: from the KV cache to the GPU's last busy sample, less both loads: the engine's last
  steps of start-up, the hop probes, the cells' gaps and the driver's rounds between them.

Where a run used several GPUs, their samples are taken together: the engine is ready when the first
GPU passes half the largest GPU's peak, and busy until the last busy sample of any; `rest_s` is
then an upper bound of what lay between the loads. The A/B it was written for ran on one GPU.

Packets are grouped by the commit their manifest names (an A/B of two commits run interleaved in
one lease); the output gives each group's means and the ratio of the second group's to the first's.

    python benchmarks/run_timeline.py PACKET [PACKET ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.packet import Packet, load_packet

READY_SHARE = 0.5  # the engine is ready once the GPU holds this share of its peak memory (the KV cache)
MEANS = ("wall_s", "engine_ready_s", "warmup_s", "measured_s", "rest_s")


@dataclass(frozen=True)
class Timeline:
    packet: str
    commit: str
    depth: int
    wall_s: float
    engine_ready_s: float | None
    warmup_s: float
    measured_s: float
    rest_s: float | None
    warmup_by_cell: dict[str, float]


def _spans(requests: pd.DataFrame, warmup: bool) -> dict[str, float]:
    """Per cell, first send to last token of its warm-up or measured requests (one clock per phase)."""
    rows = requests[requests["warmup"] == warmup]
    g = rows.groupby("cell_id").agg(a=("t_sent", "min"), b=("t_last_token", "max"))
    return {str(c): float(r.b - r.a) for c, r in g.iterrows()}


def timeline(p: Packet) -> Timeline:
    m = p.manifest
    t0, t1 = (datetime.fromisoformat(m[k]).timestamp() for k in ("started_at", "ended_at"))
    warm, measured = _spans(p.requests, True), _spans(p.requests, False)
    loads = sum(warm.values()) + sum(measured.values())
    ready = rest = None
    tel = p.telemetry
    if tel is not None and len(tel) and tel["gpu_mem_used_bytes"].max() > 0:
        up = tel[tel["gpu_mem_used_bytes"] >= READY_SHARE * tel["gpu_mem_used_bytes"].max()]["t_wall"].min()
        busy = tel[tel["gpu_util_percent"] > 0]["t_wall"].max()
        ready, rest = float(up - t0), float(busy - up - loads)
    return Timeline(
        packet=p.root.name,
        commit=str((m.get("versions") or {}).get("pdbench_git_sha") or "?")[:7],
        depth=int((m.get("engine_pool") or {}).get("depth", 1)),
        wall_s=t1 - t0,
        engine_ready_s=ready,
        warmup_s=sum(warm.values()),
        measured_s=sum(measured.values()),
        rest_s=rest,
        warmup_by_cell=warm,
    )


def by_commit(lines: list[Timeline]) -> dict[str, dict[str, float]]:
    """Each commit's mean of every time, in the order the commits first appear."""
    out: dict[str, dict[str, float]] = {}
    for c in dict.fromkeys(t.commit for t in lines):
        group = [t for t in lines if t.commit == c]
        out[c] = {k: statistics.fmean(v) for k in MEANS if (v := [x for t in group if (x := getattr(t, k)) is not None])}
        out[c]["runs"] = len(group)
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packets", nargs="+", type=Path, help="run folders (manifest.json, requests.parquet, telemetry.parquet)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    lines = [timeline(load_packet(d)) for d in args.packets]
    groups = by_commit(lines)
    first, *rest = list(groups.values())
    ratios = {k: rest[0][k] / first[k] for k in MEANS if rest and k in first and k in rest[0] and first[k]}
    if args.json:
        print(json.dumps({"runs": [asdict(t) for t in lines], "by_commit": groups, "ratio_second_to_first": ratios}, indent=2))
        return 0
    print("| packet | commit | depth | wall s | engine ready s | warm-up s | measured s | rest s | warm-up per cell s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in lines:
        cells = ", ".join(f"{c} {s:.1f}" for c, s in t.warmup_by_cell.items())
        print(f"| {t.packet} | {t.commit} | {t.depth} | {t.wall_s:.1f} | {_fmt(t.engine_ready_s)} | {t.warmup_s:.1f} | ", end="")
        print(f"{t.measured_s:.1f} | {_fmt(t.rest_s)} | {cells} |")
    for c, g in groups.items():
        print(f"{c}: {int(g['runs'])} runs, means " + ", ".join(f"{k} {g[k]:.1f}" for k in MEANS if k in g))
    if ratios:
        print("second commit / first: " + ", ".join(f"{k} ×{v:.3f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
