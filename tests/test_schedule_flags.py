"""An open-loop cell the engine and the load generator cannot keep up with is flagged in the packet."""

import json

import pandas as pd
import ray

from analysis.report import cell_table
from cluster.config import resolve
from cluster.driver import Driver, RunOptions


def test_overloaded_open_loop_cell_is_flagged(ray_local, tmp_path):
    # 200,000 req/s (5 us apart) is past what the load generator can send and 200 prompts of 64 tokens queue for
    # ~1.7 s of serial prefill on the simulated engine: the schedule slips and TTFT climbs.
    cfg = resolve(
        "e0",
        {
            "engine": {"kind": "simulated"},
            "params": {"repeats": 2, "rounds": 1},
            "workload": {
                "num_requests": 200,
                "warmup_requests": 2,
                "input_len": {"kind": "fixed", "value": 64},
                "output_len": {"kind": "fixed", "value": 4},
                "arrival": {"kind": "poisson", "rate": 200000},
            },
        },
    )
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    summary = json.loads((run_dir / "summary.json").read_text())
    for cell in summary["cells"].values():
        m = cell["metrics"]
        assert m["schedule"]["target_rate_rps"] == 200000
        assert m["schedule"]["achieved_rate_rps"] < 0.95 * m["schedule"]["scheduled_rate_rps"]
        assert m["schedule"]["schedule_kept"] is False
        q = m["steady_state"]["ttft_p50_by_quartile_s"]
        assert m["steady_state"]["steady"] is False and q[3] > 1.5 * q[0]
    table = cell_table(summary)
    assert list(table["schedule kept"]) == ["NO", "NO"] and list(table["steady"]) == ["NO", "NO"]
    md = (run_dir / "report.md").read_text()
    assert "| schedule kept |" in md and "| steady |" in md and "| NO |" in md
    # Where it ran, in one pandas line and in the manifest.
    node = ray.get_runtime_context().get_node_id()
    df = pd.read_parquet(run_dir / "requests.parquet")
    assert set(df.groupby("engine_node_id").size().index) == {node} and (df["loadgen_node_id"] == node).all()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(c["nodes"] == {"loadgen": [node], "engine": [node]} for c in manifest["cells"].values())
