"""Run several tracks back to back in one process and pack their packets: the GPU evidence suite.

A lent GPU machine gives few, time-limited calls, and each call returns a handful of files. This
runs `track:config` items one after another on one embedded Ray (engines start once per cell
anyway), stops starting new items when the deadline nears, and packs every packet (without the
per-cell scratch files) into one tar.gz, plus a one-line-per-item index and the error lines of the
engines' own logs.

    python -m cluster.gpu_suite e0:configs/gpu/e0-qwen3-8b.yaml e5:configs/gpu/e5-qwen3-8b.yaml \\
        --out /tmp/runs --pack $OUT/packets.tgz --deadline-s 540
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import time
from pathlib import Path


def run_items(items: list[str], out: Path, deadline_s: float, min_left_s: float) -> list[dict]:
    from cluster.config import load_yaml, resolve
    from cluster.driver import Driver, RunOptions

    t0 = time.monotonic()
    done: list[dict] = []
    for item in items:
        track, _, cfg_path = item.partition(":")
        left = deadline_s - (time.monotonic() - t0)
        if left < min_left_s:
            done.append({"item": item, "status": "not started", "reason": f"{left:.0f} s left of the deadline"})
            continue
        t = time.monotonic()
        try:
            cfg = resolve(track, load_yaml(Path(cfg_path)) if cfg_path else {})
            if cfg.simulated:  # evidence is real by definition; the CLI's --simulate has no equal here
                raise ValueError("engine.kind: the evidence suite runs real engines only, not 'simulated'")
            run_dir = Driver(cfg, RunOptions(out_dir=out)).run()
            m = json.loads((run_dir / "manifest.json").read_text())
            s = json.loads((run_dir / "summary.json").read_text())
            done.append(
                {
                    "item": item,
                    "status": m["status"],
                    "run_dir": str(run_dir),
                    "verdict": s.get("verdicts", {}).get("verdict"),
                    "wall_s": time.monotonic() - t,
                }
            )
        except Exception as e:  # one item failing must not cost the others their packets
            done.append({"item": item, "status": "error", "reason": f"{type(e).__name__}: {e}", "wall_s": time.monotonic() - t})
        print(json.dumps(done[-1]), flush=True)
    return done


# What the engines' processes said that a failing cell's record cannot: vLLM's and NIXL's/UCX's
# own errors stay in Ray's worker logs, on the machine, and the machine is gone after the lease.
_LOG_LINE = re.compile(r"error|exception|traceback|nixl|ucx|kv_load|failed", re.IGNORECASE)
LOG_EXCERPT_LINES = 4000


def log_excerpt(logs: Path, dest: Path, max_lines: int = LOG_EXCERPT_LINES) -> int:
    """The lines of Ray's worker logs under `logs` that name an error or the KV transport, the last
    `max_lines` of them, each prefixed with its file; returns how many were written."""
    lines: list[str] = []
    for f in sorted(logs.glob("worker-*")):
        with f.open(errors="replace") as fh:
            lines.extend(f"{f.name}: {line.rstrip()}" for line in fh if _LOG_LINE.search(line))
    dest.write_text("\n".join(lines[-max_lines:]) + ("\n" if lines else ""))
    return min(len(lines), max_lines)


def pack(out: Path, dest: Path, index: list[dict], logs: Path | None = None) -> None:
    (out / "suite-index.json").write_text(json.dumps(index, indent=2))
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(out / "suite-index.json", arcname="suite-index.json")
        if logs is not None and logs.is_dir():
            log_excerpt(logs, out / "engine-log-excerpt.txt")
            tar.add(out / "engine-log-excerpt.txt", arcname="engine-log-excerpt.txt")
        for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
            for f in sorted(run_dir.iterdir()):
                if f.is_file():
                    tar.add(f, arcname=f"{run_dir.name}/{f.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="+", help="track:config.yaml (config optional: the quick profile)")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--pack", type=Path, help="write every packet (no cells/ scratch) into this tar.gz")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="start no item after this many seconds")
    ap.add_argument("--min-left-s", type=float, default=90.0, help="an item needs at least this long to be started")
    ap.add_argument(
        "--logs",
        type=Path,
        default=Path("/tmp/ray/session_latest/logs"),
        help="Ray's session logs: their error and KV-transport lines go into the pack as engine-log-excerpt.txt",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    index = run_items(args.items, args.out, args.deadline_s, args.min_left_s)
    if args.pack:
        pack(args.out, args.pack, index, args.logs)
    return 0 if all(i["status"] == "complete" for i in index) else 1


if __name__ == "__main__":
    sys.exit(main())
