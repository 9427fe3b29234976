"""The GPU evidence suite's runner, exercised on the CPU with the reference engine."""

import json
import tarfile

from cluster.gpu_suite import main


def test_runs_items_packs_packets_and_skips_past_deadline(ray_local, tmp_path):
    cfg = tmp_path / "e0.yaml"
    cfg.write_text("workload: {num_requests: 4, warmup_requests: 0}\nparams: {tolerance: 0.95, rounds: 1}\n")
    dest = tmp_path / "packets.tgz"
    rc = main([f"e0:{cfg}", "e0:", "--out", str(tmp_path / "runs"), "--pack", str(dest), "--deadline-s", "1", "--min-left-s", "0"])
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("suite-index.json"))
    assert index[0]["status"] == "complete" and index[0]["verdict"] == "reproducible"
    assert index[1]["status"] == "not started"  # the first item used up the 1 s deadline
    assert rc == 1
    run = index[0]["run_dir"].rsplit("/", 1)[-1]
    assert f"{run}/manifest.json" in names and f"{run}/report.html" in names
    assert not any("/cells" in n for n in names)


def test_a_bad_item_does_not_stop_the_next(ray_local, tmp_path, capsys):
    rc = main(["e9:", "--out", str(tmp_path / "runs"), "--deadline-s", "100", "--min-left-s", "0"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and line["status"] == "error" and "e9" in line["reason"]


def test_the_evidence_suite_refuses_simulated_engines(tmp_path, capsys):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("engine: {kind: simulated}\n")
    rc = main([f"e0:{cfg}", "--out", str(tmp_path / "runs"), "--deadline-s", "100", "--min-left-s", "0"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and line["status"] == "error" and "simulated" in line["reason"]


def test_the_pack_carries_the_error_lines_of_the_engines_logs(tmp_path):
    from cluster.gpu_suite import log_excerpt, pack

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker-1.err").write_text("loading weights\nUCX  ERROR failed to select lane\nstep 3 ok\n")
    (logs / "worker-2.out").write_text("nixl agent ready\n" + "fine\n" * 3)
    (logs / "raylet.out").write_text("error the suite does not want\n")
    out = tmp_path / "runs"
    out.mkdir()
    pack(out, tmp_path / "p.tgz", [], logs)
    with tarfile.open(tmp_path / "p.tgz") as tar:
        text = tar.extractfile("engine-log-excerpt.txt").read().decode()
    assert text.splitlines() == ["worker-1.err: UCX  ERROR failed to select lane", "worker-2.out: nixl agent ready"]
    assert log_excerpt(logs, tmp_path / "short.txt", max_lines=1) == 1
    assert (tmp_path / "short.txt").read_text() == "worker-2.out: nixl agent ready\n"
