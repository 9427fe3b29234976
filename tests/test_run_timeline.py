"""benchmarks/run_timeline.py: a packet's wall split into engine start, warm-up, measured load and
the rest, from its own files; two commits' runs side by side."""

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_timeline

T0 = 1_800_000_000.0


def _packet(root: Path, sha: str, depth: int, ready_at: float, loads: dict[str, tuple[float, float]], wall: float) -> Path:
    """A run: the GPU memory rises at `ready_at`, then busy until the loads end; each cell's warm-up
    and measured phase last as given (each on its own clock from 0)."""
    root.mkdir(parents=True)
    stamp = lambda t: pd.Timestamp(T0 + t, unit="s", tz="UTC").isoformat()  # noqa: E731
    manifest = {"run_id": root.name, "track": "e2", "status": "complete", "evidence": "real"}
    manifest |= {"started_at": stamp(0), "ended_at": stamp(wall), "versions": {"pdbench_git_sha": sha}, "engine_pool": {"depth": depth}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    rows = [
        {"cell_id": c, "request_id": f"{c}-{w}", "warmup": w, "t_sent": 0.0, "t_last_token": span}
        for c, (warm, measured) in loads.items()
        for w, span in ((True, warm), (False, measured))
    ]
    pd.DataFrame(rows).to_parquet(root / "requests.parquet")
    busy_until = ready_at + sum(w + m for w, m in loads.values())
    tel = [
        {"t_wall": T0 + t, "gpu_mem_used_bytes": (130e9 if t >= ready_at else 1e9), "gpu_util_percent": float(ready_at <= t <= busy_until)}
        for t in range(int(wall) + 1)
    ]
    pd.DataFrame(tel).to_parquet(root / "telemetry.parquet")
    return root


def test_a_runs_wall_splits_into_engine_start_warm_up_load_and_rest(tmp_path):
    p = _packet(tmp_path / "a", "aaaaaaa111", 1, 50.0, {"c16": (6.0, 30.0), "poisson": (14.0, 17.0)}, 120.0)
    t = run_timeline.timeline(run_timeline.load_packet(p))
    assert (t.commit, t.depth, t.wall_s, t.engine_ready_s) == ("aaaaaaa", 1, 120.0, 50.0)
    assert (t.warmup_s, t.measured_s) == (20.0, 47.0) and t.warmup_by_cell == {"c16": 6.0, "poisson": 14.0}
    assert t.rest_s == 0.0  # busy exactly as long as the loads: nothing between them


def test_two_commits_side_by_side_give_means_and_the_ratio(tmp_path, capsys):
    old = [_packet(tmp_path / f"o{i}", "0ld0000", 1, 50.0, {"c": (10.0, 30.0)}, 100.0 + i) for i in range(2)]
    new = [_packet(tmp_path / "n0", "new0000", 2, 50.0, {"c": (4.0, 30.0)}, 90.0)]
    assert run_timeline.main([str(d) for d in old + new] + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by_commit"]["0ld0000"]["runs"] == 2 and out["by_commit"]["0ld0000"]["wall_s"] == 100.5
    assert out["ratio_second_to_first"]["warmup_s"] == 0.4 and out["ratio_second_to_first"]["wall_s"] == 90.0 / 100.5
    assert run_timeline.main([str(d) for d in old + new]) == 0
    assert "second commit / first: wall_s ×0.896" in capsys.readouterr().out
