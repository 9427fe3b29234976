"""A real local-Ray E0 run end to end, and the packet it leaves behind."""

import json
from html.parser import HTMLParser

import pandas as pd
import pytest
import yaml

from analysis.packet import CELL_REQUESTS, read_rows
from analysis.schemas import read_requests
from cluster.config import config_hash, resolve
from cluster.driver import Driver, RunOptions


@pytest.fixture(scope="module")
def e0_run(ray_local, tmp_path_factory):
    # Timing tolerance wide open: this machine is shared and noisy; the timing rule itself is
    # tested on hand-made records in test_e0_verdict.py. Tokens and hashes are checked exactly.
    # Default rounds (2): four cells, rep0.round0, rep1.round0, rep0.round1, rep1.round1, 6 measured requests each.
    cfg = resolve("e0", {"workload": {"num_requests": 12, "warmup_requests": 2}, "params": {"tolerance": 0.95}})
    out = tmp_path_factory.mktemp("runs")
    run_dir = Driver(cfg, RunOptions(out_dir=out)).run()
    return cfg, run_dir


def test_packet_files_present(e0_run):
    _, run_dir = e0_run
    for name in ("manifest.json", "config.yaml", "requests.parquet", "summary.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_manifest_facts(e0_run):
    cfg, run_dir = e0_run
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["evidence"] == "real" and m["schema_version"] == 2 and m["engine"] == "reference" and m["status"] == "complete"
    assert m["config_hash"] == config_hash(cfg)
    assert len(m["model"]["architecture_hash"]) == 64
    assert m["model"]["kv_bytes_per_token"] == 2 * 4 * 2 * 64 * 4
    assert m["versions"]["ray"] and m["versions"]["torch"] and "pdbench_git_dirty" in m["versions"]
    assert m["hardware"]["nodes"][0]["cpu"]["logical_cores"] >= 1
    assert m["ray"]["cluster_resources"]["CPU"] >= 1
    assert m["seeds"]["config"] == 0 and set(m["cells"]) == {"rep0.round0", "rep1.round0", "rep0.round1", "rep1.round1"}
    assert all(c["status"] == "ok" for c in m["cells"].values())


def test_resolved_config_round_trips(e0_run):
    cfg, run_dir = e0_run
    again = resolve("e0", yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert config_hash(again) == config_hash(cfg)


def test_requests_schema_and_warmup(e0_run):
    _, run_dir = e0_run
    df = pd.read_parquet(run_dir / "requests.parquet")
    needed = {
        "run_id",
        "cell_id",
        "request_id",
        "serving_mode",
        "engine",
        "warmup",
        "ok",
        "error",
        "input_tokens",
        "output_tokens",
        "t_scheduled",
        "t_sent",
        "t_first_token",
        "t_last_token",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "queue_delay_s",
        "itl_s",
        "server_queue_s",
        "prefill_s",
        "transfer_s",
        "first_decode_s",
        "output_token_ids",
    }
    assert needed <= set(df.columns)
    # Every round warms up the same way, then sends its half of the measured requests.
    assert len(df) == 4 * (2 + 6) and df["warmup"].sum() == 4 * 2
    halves = df[~df["warmup"]].groupby("cell_id")["request_id"].apply(sorted)
    assert halves["rep0.round0"] == halves["rep1.round0"] == [f"r{i:05d}" for i in range(6)]
    assert halves["rep0.round1"] == halves["rep1.round1"] == [f"r{i:05d}" for i in range(6, 12)]
    # Interleaved: each round's cells ran before the next round's started.
    meta = {c: json.loads((run_dir / "cells" / c / "cell.json").read_text()) for c in halves.index}
    order = sorted(meta, key=lambda c: meta[c]["started_at"])
    assert order == ["rep0.round0", "rep1.round0", "rep0.round1", "rep1.round1"]
    assert df["ok"].all() and (df["serving_mode"] == "aggregated").all()
    assert (df["ttft_s"] > 0).all() and (df["e2e_s"] >= df["ttft_s"]).all()
    assert df["transfer_s"].isna().all()
    # The engine's own prefill time fits inside the client's TTFT.
    assert (df["prefill_s"] <= df["ttft_s"]).all()


def test_e0_verdict_reproducible(e0_run):
    _, run_dir = e0_run
    s = json.loads((run_dir / "summary.json").read_text())
    v = s["verdicts"]
    tokens = next(c for c in v["checks"] if c["check"].startswith("greedy"))
    assert tokens["ok"] and tokens["detail"]["requests_compared"] == 12
    # Identical tokens are reproducible whatever a busy host did to the timing.
    assert v["correctness"] == "pass" and v["verdict"].startswith("reproducible"), v
    assert v["rounds"] == 2
    assert s["cells"]["rep0.round0"]["host_load"]["cores"] >= 1
    assert s["cells"]["rep0.round0"]["metrics"]["ttft_s"]["p99"] > 0


def test_reports_parse_and_carry_the_verdict(e0_run):
    _, run_dir = e0_run
    md = (run_dir / "report.md").read_text()
    assert "E0 verdict: reproducible" in md and "| evidence | real |" in md
    assert "ran 2 times with the same seed, the repeats interleaved in 2 rounds" in md
    html = (run_dir / "report.html").read_text()

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag in ("script", "link"):
                assert not any(k in ("src", "href") for k, _ in attrs), "report.html must load nothing"

    p = P()
    p.feed(html)
    assert p.tags.count("table") >= 2 and "script" in p.tags
    assert "Plotly.newPlot" in html
    assert "E0 verdict: reproducible" in html


def test_report_rebuilds_from_files_alone(e0_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from cluster.cli import app

    _, run_dir = e0_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "report.md").unlink()
    (copy / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert (copy / "report.md").read_text() == (run_dir / "report.md").read_text()


def test_git_facts_from_environment_when_tree_has_no_git(monkeypatch):
    from cluster import manifest

    monkeypatch.setattr(manifest, "_git", lambda *a: None)
    monkeypatch.setenv("PDBENCH_GIT_SHA", "abc123")
    monkeypatch.setenv("PDBENCH_GIT_DIRTY", "0")
    v = manifest.versions()
    assert v["pdbench_git_sha"] == "abc123" and v["pdbench_git_dirty"] is False
    assert v["pdbench_git_source"] == "PDBENCH_GIT_SHA"


def test_shipper_sha_wins_over_a_stale_git_in_the_copy(monkeypatch):
    from cluster import manifest

    monkeypatch.setattr(manifest, "_git", lambda *a: "old000" if a[0] == "rev-parse" else " M x.py")
    monkeypatch.setenv("PDBENCH_GIT_SHA", "new111")
    monkeypatch.setenv("PDBENCH_GIT_DIRTY", "0")
    v = manifest.versions()
    assert v["pdbench_git_sha"] == "new111" and v["pdbench_git_dirty"] is False
    assert v["pdbench_git_seen"] == {"sha": "old000", "dirty": True}
    monkeypatch.delenv("PDBENCH_GIT_SHA")
    v = manifest.versions()
    assert v["pdbench_git_sha"] == "old000" and v["pdbench_git_dirty"] is True and "pdbench_git_source" not in v


def test_report_can_share_one_plotly_copy(e0_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from cluster.cli import app

    _, run_dir = e0_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    res = CliRunner().invoke(app, ["report", str(copy), "--plotly-js", "../plotly.min.js"])
    assert res.exit_code == 0, res.output
    html = (copy / "report.html").read_text()
    assert "src='../plotly.min.js'" in html and "Plotly.newPlot" in html
    assert len(html) < len((run_dir / "report.html").read_text()) / 5


def test_telemetry_sampled_over_the_run(e0_run):
    _, run_dir = e0_run
    t = pd.read_parquet(run_dir / "telemetry.parquet")
    m = json.loads((run_dir / "manifest.json").read_text())
    assert len(t) >= 2 and set(t["node_id"]) <= {n["node_id"] for n in m["ray"]["nodes"]}
    assert t["cpu_percent"].notna().all() and (t["host_mem_used_bytes"] > 0).all()
    assert "Telemetry (NVML" in (run_dir / "report.html").read_text()


def test_timeline_shows_measured_requests_only(e0_run):
    from analysis.plots import timeline

    _, run_dir = e0_run
    df = pd.read_parquet(run_dir / "requests.parquet")
    ids = {y for tr in timeline(df, "rep0.round0").data for y in tr.y}
    assert ids and not any(i.startswith("w") for i in ids)
    assert ids == set(df[(df["cell_id"] == "rep0.round0") & ~df["warmup"]]["request_id"])


def test_resume_reruns_only_the_missing_round_and_reproduces_its_tokens(e0_run, tmp_path):
    import shutil

    cfg, run_dir = e0_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "cells" / "rep1.round1")
    kept = {c: (copy / "cells" / c / "cell.json").read_text() for c in ("rep0.round0", "rep1.round0", "rep0.round1")}
    Driver(cfg, RunOptions(out_dir=tmp_path, resume=copy)).run()
    assert {c: (copy / "cells" / c / "cell.json").read_text() for c in kept} == kept, "finished rounds are not run again"
    old, new = (read_rows(d / "cells" / "rep1.round1" / CELL_REQUESTS, read_requests).set_index("request_id") for d in (run_dir, copy))
    assert new["output_token_ids"].map(list).to_dict() == old["output_token_ids"].map(list).to_dict()
    v = json.loads((copy / "summary.json").read_text())["verdicts"]
    assert v["correctness"] == "pass" and v["verdict"].startswith("reproducible"), v
