"""pdbench compare: side by side from packets alone; simulated and real never mixed silently."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from analysis.compare import MixedModes, compare
from cluster.cli import app


def fake_run(root, run_id, evidence, nodes, tps, seed=0):
    d = root / run_id
    d.mkdir(parents=True)
    manifest = {
        "run_id": run_id,
        "track": "e2",
        "evidence": evidence,
        "engine": "simulated" if evidence == "simulated" else "vllm",
        "config_hash": run_id * 4,
        "status": "complete",
        "model": {"name": "qwen3-8b"},
        "hardware": {"summary": f"{nodes} nodes", "nodes": [{"gpu": {"count": 8}}] * nodes},
        "versions": {"pdbench_git_sha": "abc"},
    }
    metrics = {
        "output_token_throughput_tps": tps,
        "request_throughput_rps": tps / 100,
        "ttft_s": {"p50": 0.1, "p99": 0.3},
        "schedule": {"lockstep_share": min(1.0, nodes / 4)},
    }
    summary = {
        "run_id": run_id,
        "track": "e2",
        "evidence": evidence,
        "cells": {"closed-c8": {"status": "ok", "metrics": metrics}, f"only-{run_id}": {"status": "ok", "metrics": metrics}},
        "verdicts": {"capacity_rps": tps / 100, "max_rate_goodput": {"rate_rps": tps / 200, "status": "bracketed"}},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text(yaml.safe_dump({"track": "e2", "seed": seed, "engine": {"kind": manifest["engine"]}}))
    return d


def test_scaling_study_side_by_side(tmp_path):
    runs = [fake_run(tmp_path, f"r{n}", "real", n, 1000.0 * n) for n in (1, 2, 4)]
    out = compare(runs, tmp_path / "cmp")
    data = json.loads((out / "compare.json").read_text())
    assert [r["nodes"] for r in data["runs"]] == [1, 2, 4] and [r["GPUs"] for r in data["runs"]] == [8, 16, 32]
    tput = next(r for r in data["cells"] if r["cell"] == "closed-c8" and r["metric"] == "out tok/s")
    assert tput["B/A"] == pytest.approx(2.0) and tput["C/A"] == pytest.approx(4.0)
    assert [r["max-rate goodput req/s"] for r in data["run_level"]] == [5.0, 10.0, 20.0]
    assert data["config_differences"] == [], "same config on bigger clusters"
    md = (out / "compare.md").read_text()
    assert "only-r1" in md and "SIMULATED" not in md
    assert [r["run"] for r in data["runs"]] == ["A: 1 node, 8 GPUs", "B: 2 nodes, 16 GPUs", "C: 4 nodes, 32 GPUs"]
    assert not re.search(r"\bnan\b|\bNone\b", md), "a value a run lacks is written –"
    assert "| – |" in md
    ttft = next(r for r in data["cells"] if r["cell"] == "closed-c8" and r["metric"] == "TTFT p99 (ms)")
    assert ttft["A: 1 node, 8 GPUs"] == pytest.approx(300.0)
    waves = next(r for r in data["cells"] if r["cell"] == "closed-c8" and r["metric"] == "users in lockstep (%)")
    assert [waves[r["run"]] for r in data["runs"]] == [25.0, 50.0, 100.0]  # beside TTFT: which regime each run was in
    html = (out / "compare.html").read_text()
    assert "Plotly.newPlot" in html and html.count("plotly-graph-div") >= 3


def test_scaling_study_reads_each_runs_wall_time_cells_and_engine_starts(tmp_path):
    runs = [fake_run(tmp_path, f"r{n}", "simulated", n, 100.0 * n) for n in (4, 8)]
    for d, (wall, starts) in zip(runs, ((120, 4), (70, 8)), strict=True):
        m = json.loads((d / "manifest.json").read_text())
        m |= {"started_at": "2026-11-28T10:00:00+00:00", "ended_at": f"2026-11-28T10:{wall // 60:02d}:{wall % 60:02d}+00:00"}
        m |= {"cells": {f"c{i}": {"status": "ok"} for i in range(40)}, "engine_pool": {"engine_starts": starts}}
        (d / "manifest.json").write_text(json.dumps(m))
    data = json.loads((compare(runs, tmp_path / "cmp", allow_simulated=True) / "compare.json").read_text())
    assert [(r["wall (s)"], r["cells"], r["engine starts"]) for r in data["runs"]] == [(120.0, 40, 4), (70.0, 40, 8)]


def test_runs_alike_in_every_fact_are_told_apart_by_run_id(tmp_path):
    runs = [fake_run(tmp_path, f"r{i}", "real", 1, 1000.0) for i in range(2)]
    data = json.loads((compare(runs, tmp_path / "cmp") / "compare.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["A: r0", "B: r1"]


def test_mixing_simulated_and_real_is_refused_unless_asked(tmp_path):
    real = fake_run(tmp_path, "real1", "real", 1, 1000.0)
    sim = fake_run(tmp_path, "sim1", "simulated", 1, 5000.0, seed=1)
    with pytest.raises(MixedModes, match="--allow-simulated"):
        compare([real, sim], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    res = CliRunner().invoke(app, ["compare", str(real), str(sim), "-o", str(tmp_path / "cli")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "refusing" in res.output
    out = compare([real, sim], tmp_path / "cmp", allow_simulated=True)
    md = (out / "compare.md").read_text()
    assert "INCLUDES SIMULATED RUNS" in md and "B: SIMULATED" in md and "A: vllm" in md
    assert "SIMULATED" in (out / "compare.html").read_text()
    diffs = json.loads((out / "compare.json").read_text())["config_differences"]
    assert {d["field"] for d in diffs} == {"seed", "engine.kind"}
    # Two simulated runs compare without the flag: nothing real is being mixed in.
    assert compare([sim, fake_run(tmp_path, "sim2", "simulated", 2, 1.0)], tmp_path / "cmp2")


def test_compare_needs_two_runs_and_real_folders(tmp_path):
    res = CliRunner().invoke(app, ["compare", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "at least two" in res.output
    res = CliRunner().invoke(app, ["compare", str(tmp_path), str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "not a pdbench run folder" in res.output
