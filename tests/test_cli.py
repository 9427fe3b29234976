from typer.testing import CliRunner

from cluster.cli import app

runner = CliRunner()


def test_help_explains_every_run_option():
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--config", "--engine", "--simulate", "--address", "--out", "--seed"):
        assert opt in res.output


def test_tracks_lists_e0():
    res = runner.invoke(app, ["tracks"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "e0" in res.output and "reproduce" in res.output


def test_doctor_says_which_engines_run_here():
    res = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "engine reference" in res.output and "engine vllm" in res.output


def test_bad_config_names_field_and_exits_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("engine: {max_batch_size: 0}\n")
    res = runner.invoke(app, ["run", "e0", "-c", str(p), "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "engine.max_batch_size" in res.output


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "not a pdbench run folder" in res.output


def test_vllm_refused_where_missing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:  # a GPU node: the refusal does not apply
        return
    res = runner.invoke(app, ["run", "e0", "--engine", "vllm", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "engine.kind" in res.output and "pip install -e '.[vllm]'" in res.output


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("pdbench ")


def test_help_has_exit_codes_and_no_bool_metavars():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["serve", "--help"],
        ["compare", "--help"],
        ["runs", "list", "--help"],
        ["doctor", "--help"],
    ):
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "<bool>" not in res.output and "BOOLEAN" not in res.output, (args, res.output)
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Exit codes" in top and "4 failing verdict" in top and "3 partial" in top


def test_doctor_keeps_the_extra_in_install_hints():
    import importlib.util

    res = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    if importlib.util.find_spec("vllm") is None:
        assert "pip install -e '.[vllm]'" in res.output


def _packet(root, run_id, status="complete", verdict="reproducible", started="2026-01-02T03:04:05+00:00"):
    import json

    d = root / run_id
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(
        json.dumps({"run_id": run_id, "track": "e0", "status": status, "evidence": "real", "engine": "reference", "started_at": started})
    )
    metrics = {
        "requests": 8,
        "completed": 8,
        "request_throughput_rps": 2.5,
        "output_token_throughput_tps": 80.0,
        "ttft_s": {"p50": 0.02, "p99": 0.05},
        "tpot_s": {"p50": 0.01, "p99": 0.02},
        "itl_s": {"p50": 0.01, "p99": 0.03},
        "slo_attainment": 1.0,
    }
    (d / "summary.json").write_text(json.dumps({"cells": {"rep0": {"status": "ok", "metrics": metrics}}, "verdicts": {"verdict": verdict}}))
    return d


def test_runs_list_defaults_to_runs_and_prints_a_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PDBENCH_OUT", raising=False)
    _packet(tmp_path / "runs", "e0-b", verdict="not reproducible", started="2026-01-03T00:00:00+00:00")
    _packet(tmp_path / "runs", "e0-a")
    res = runner.invoke(app, ["runs", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "e0-" in ln]
    assert "e0-a" in lines[0] and "e0-b" in lines[1], "oldest first"
    assert "reproducible" in lines[0] and "not reproducible" in lines[1] and "real" in lines[0] and "2026-01-02 03:04:05" in lines[0]


def _fake_run(monkeypatch, tmp_path, status, verdict):
    from cluster.driver import Driver

    d = _packet(tmp_path, "e0-x", status=status, verdict=verdict)
    monkeypatch.setattr(Driver, "run", lambda self, on_progress=None: d)


def test_exit_code_follows_the_verdict_and_the_summary_shows_numbers(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    _fake_run(monkeypatch, tmp_path / "a", "complete", "reproducible")
    res = runner.invoke(app, ["run", "e0", "--out", out, "--no-progress"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "TTFT p99 (ms)" in res.output and "50" in res.output and "100%" in res.output and "verdict" in res.output
    for status, verdict, code in (
        ("complete", "not reproducible", 4),
        ("partial", "reproducible", 3),
        ("failed", None, 1),
        ("complete", "reproducible, timing unstable", 0),
    ):
        _fake_run(monkeypatch, tmp_path / f"{status}-{code}", status, verdict)
        res = runner.invoke(app, ["run", "e0", "--out", out, "--no-progress"], env={"COLUMNS": "200"})
        assert res.exit_code == code, (status, verdict, res.output)


def test_an_embedded_ray_that_does_not_start_is_one_line(tmp_path, monkeypatch):
    from cluster import ray_env

    def timed_out(**kw):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet failed")

    monkeypatch.setattr(ray_env.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env.ray, "init", timed_out)
    res = runner.invoke(app, ["run", "e0", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    assert "the embedded Ray did not start: The current node timed out during startup" in res.output
    assert "load average" in res.output


def test_address_without_a_reachable_cluster_is_one_line(tmp_path, monkeypatch):
    from cluster import ray_env

    def unreachable(address):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray_env, "connect", unreachable)
    res = runner.invoke(app, ["run", "e0", "--address", "auto", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "--address auto: no reachable Ray cluster" in res.output and "Traceback" not in res.output
    assert res.output.count("error:") == 1 and "Could not find" not in res.output, res.output
    res = runner.invoke(app, ["serve", "--address", "auto"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--address auto: no reachable Ray cluster" in res.output and "Traceback" not in res.output


def test_run_and_cell_stamps_are_to_the_millisecond():
    """Cells of a fast sweep start within one second of each other: their order reads from the stamps."""
    from datetime import datetime

    from cluster.run_manifest import now

    stamp = now()
    assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0 and len(stamp.split("T")[1].split("+")[0]) == len("12:00:00.123")
