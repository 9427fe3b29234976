"""One Ray job per experiment, on a real Ray head with its dashboard, as on a cluster.

The head is `ray start --head --block` in a child process owned by this test (the session's
embedded Ray stays untouched), with token authentication on and the dashboard on loopback. The test
submits `pdbench run e0 --address auto` through the Jobs SDK, waits, pulls the packet from a
pyarrow.fs URI, checks it, and scrapes pdbench's live metrics from the node's Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_serve import free_port

ROOT = Path(__file__).resolve().parents[1]

SMALL_E0 = {
    "workload": {
        "num_requests": 6,
        "warmup_requests": 1,
        "input_len": {"kind": "uniform", "low": 8, "high": 32},
        "output_len": {"kind": "fixed", "value": 8},
        "arrival": {"kind": "closed", "concurrency": 2},
    },
    "params": {"rounds": 1},  # one cell per repeat: this is about Ray Jobs, not E0's rounds (fewer engine starts)
}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` as a cluster head runs it; SIGTERM ends it and all it started."""
    tmp = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(16)
    (tmp / "token").write_text(token)
    # Its own Ray temp dir: `--address auto` inside the job resolves through the head's temp dir,
    # and /tmp/ray is shared with every other Ray on this machine. Short: Unix sockets live there.
    ray_tmp = tempfile.mkdtemp(prefix="pdbench-ray-", dir="/tmp")
    gcs, dash, metrics, client, agent = (free_port() for _ in range(5))
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp / "token"),
        "RAY_metrics_report_interval_ms": "1000",
        "PDBENCH_STAGING": str(tmp / "staging"),
        # The job's entrypoint runs `pdbench` from this environment, as a cluster node's PATH would.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(k, None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_cli,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=4",
        f"--temp-dir={ray_tmp}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (Path(ray_tmp) / "ray_current_cluster").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "no head"
            time.sleep(1)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics", "token": token, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for _ in range(10):  # the head's last children may still write logs for a moment
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if not Path(ray_tmp).exists():
                break
            time.sleep(1)


def test_dashboard_requires_the_token(head):
    r = httpx.get(f"{head['dashboard']}/api/jobs/", timeout=30)
    assert r.status_code == 401
    r = httpx.get(f"{head['dashboard']}/api/jobs/", headers={"Authorization": f"Bearer {head['token']}"}, timeout=30)
    assert r.status_code == 200


def test_one_job_per_experiment_writes_its_packet_to_shared_storage(head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from analysis.packet import load_packet
    from cluster.storage import list_runs, pull

    tmp: Path = head["tmp"]
    config = tmp / "e0-small.yaml"
    config.write_text(yaml.safe_dump(SMALL_E0))
    store = f"file://{tmp / 'store'}"
    client = JobSubmissionClient(head["dashboard"], headers={"Authorization": f"Bearer {head['token']}"})
    entrypoint = f"pdbench run e0 --address auto --config {config} --out {store} --no-progress"
    deadline = time.monotonic() + 120
    while True:  # the node's job agent comes up a little after the dashboard
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 420
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    runs = list_runs(store)
    assert len(runs) == 1 and runs[0] in logs  # the job prints where its packet is
    local = pull(f"{store}/{runs[0]}", tmp / "pulled")
    p = load_packet(local)
    assert p.manifest["status"] == "complete" and p.manifest["ray"]["address"] == "auto"
    assert sorted(p.manifest["cells"]) == ["rep0", "rep1"]
    assert len(p.requests) == 2 * 7 and p.requests["ok"].all()
    assert (local / "report.html").is_file() and (local / "cells" / "rep0" / "cell.json").is_file()
    assert not list(local.rglob("*.tmp"))
    head["run_id"] = runs[0]


def test_live_metrics_reach_prometheus_tagged_by_run_cell_and_role(head):
    run_id = head.get("run_id")
    if run_id is None:
        pytest.fail("needs the job of test_one_job_per_experiment_writes_its_packet_to_shared_storage")
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(head["metrics"], timeout=30).text
        if f'run="{run_id}"' in text and "pdbench_ttft_seconds" in text:
            break
        time.sleep(2)
    series = [line for line in text.splitlines() if line.startswith("ray_pdbench_") and f'run="{run_id}"' in line]
    names = {re.match(r"(ray_pdbench_\w+?)(_bucket|_count|_sum|_total)?\{", s).group(1) for s in series}
    assert {"ray_pdbench_ttft_seconds", "ray_pdbench_tpot_seconds", "ray_pdbench_output_tokens"} <= names, sorted(names)
    roles = set(re.findall(r'role="(\w+)"', "\n".join(series)))
    assert {"loadgen", "engine"} <= roles
    out_tokens = [s for s in series if s.startswith("ray_pdbench_output_tokens") and 'role="loadgen"' in s]
    # 7 requests × 8 tokens per cell, counted by the client.
    assert sorted(float(s.rsplit(" ", 1)[1]) for s in out_tokens) == [56.0, 56.0], out_tokens
    print(json.dumps(sorted({s.split("{")[0] for s in series})))
