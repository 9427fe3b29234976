"""Fault injection, inputs: every user mistake is one line naming the input and the fix (no
traceback), hostile paths are refused, and input pdbench would ignore is refused by name."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from analysis.errortext import one_line, strip_ansi
from cluster.cli import app
from cluster.config import ConfigError, resolve

WIDE = {"COLUMNS": "400"}


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), env=WIDE)


def _one_line_error(res, *needles: str) -> None:
    """Exit 2 and one line: `error: <input>: <what and the fix>`; a config error is the one
    `error: invalid config:` header with one indented line per bad field."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert lines and lines[0].startswith("error:"), res.output
    if lines[0] == "error: invalid config:":
        assert len(lines) == 2 and lines[1].startswith("  "), res.output
        lines = [lines[1]]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output and "\x1b" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --- run: --out, -c, --resume -------------------------------------------------------------------
def test_out_naming_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(_cli("run", "e0", "--simulate", "-o", str(tmp_path / "f")), "--out", "is a file")


def test_out_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(_cli("run", "e0", "--simulate", "-o", str(tmp_path / "f" / "runs")), "--out", "cannot write to")


def test_out_on_a_read_only_place():
    _one_line_error(_cli("run", "e0", "--simulate", "-o", "/proc/pdbench-runs"), "--out", "cannot write to /proc/pdbench-runs")


def test_config_naming_a_folder(tmp_path):
    _one_line_error(_cli("run", "e0", "--simulate", "-c", str(tmp_path)), "--config", "is a folder")


def test_config_naming_a_binary_file(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    _one_line_error(_cli("run", "e0", "--simulate", "-c", str(tmp_path / "c.yaml")), "--config", "not a text file")


def test_config_with_broken_yaml_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("engine: {kind: [\n  oops")
    _one_line_error(_cli("run", "e0", "--simulate", "-c", str(tmp_path / "c.yaml")), "--config", "not valid YAML")


def test_resume_naming_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(_cli("run", "e0", "--simulate", "--resume", str(tmp_path / "f")), "--resume", "is not a folder")


@pytest.mark.parametrize("manifest", ['{"run_id": "x", "tr', "[1, 2]", ""], ids=["truncated", "not-an-object", "empty"])
def test_resume_of_a_run_with_a_damaged_manifest(tmp_path, manifest):
    (tmp_path / "manifest.json").write_text(manifest)
    _one_line_error(_cli("run", "e0", "--simulate", "--resume", str(tmp_path)), "--resume", "manifest")


# --- report ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("manifest.json", '{"run_id": "x", "track": "e0", "sta', "manifest.json is truncated or not JSON"),
        ("manifest.json", '"just a string"', "is not a pdbench manifest"),
        ("summary.json", '{"cells": {', "summary.json is truncated or not JSON"),
        ("requests.parquet", "PAR1 not really", "requests.parquet is not a readable parquet file"),
    ],
    ids=["truncated-manifest", "manifest-not-object", "truncated-summary", "corrupt-requests"],
)
def test_report_on_a_damaged_packet(tmp_path, name, content, needle):
    (tmp_path / "manifest.json").write_text('{"run_id": "x", "track": "e0", "status": "complete", "evidence": "real"}')
    (tmp_path / name).write_text(content)
    _one_line_error(_cli("report", str(tmp_path)), needle)


def test_report_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(_cli("report", str(tmp_path / "f")), "not a pdbench run folder")


# --- serve -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--port", "70000"], "--port: 70000 is not a TCP port"),
        (["--port", "0"], "--port: 0 is not a TCP port"),
        (["--port", "-5"], "--port: -5 is not a TCP port"),
        (["--host", "999.1.1.1"], "--host: '999.1.1.1' is not an address"),
        (["--host", "no-such-host.invalid"], "--host: 'no-such-host.invalid'"),
        (["--host", "192.0.2.1"], "--host/--port: cannot listen on 192.0.2.1:8000"),  # TEST-NET: not this machine's
    ],
    ids=["port-too-high", "port-zero", "port-negative", "host-bad-ip", "host-unresolvable", "host-not-local"],
)
def test_serve_refuses_an_impossible_address_before_starting_ray(args, needle):
    _one_line_error(_cli("serve", *args), needle)


def test_serve_refuses_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_error(_cli("serve", "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")


# --- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["/nonexistent/model-folder", "./models/missing", "missing-arch.json", "~/no/such/model"])
def test_a_missing_model_path_is_refused_before_any_engine_starts(tmp_path, model):
    res = _cli("run", "e0", "--engine", "reference", "-o", str(tmp_path), "-c", str(_cfg(tmp_path, {"engine": {"model": model}})))
    _one_line_error(res, "engine.model: no such file or folder", model)
    assert not any(p.name != "c.yaml" for p in tmp_path.iterdir())


def test_a_model_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    res = _cli("run", "e0", "-o", str(tmp_path), "-c", str(_cfg(tmp_path, {"engine": {"model": str(tmp_path / "weights")}})))
    _one_line_error(res, "engine.model:", "without a config.json")


def test_serve_refuses_a_missing_model_path():
    _one_line_error(_cli("serve", "--model", "/nonexistent/model-folder"), "engine.model: no such file or folder")


def _cfg(tmp_path, data) -> object:
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(data))
    return p


# --- remote errors: one line in the packet, the traceback in errors.log ------------------------
def test_ansi_codes_are_stripped():
    assert strip_ansi("\x1b[36mray::EngineActor.start()\x1b[39m \x1b[1;31mboom\x1b[0m") == "ray::EngineActor.start() boom"


def test_a_ray_task_error_is_its_root_cause_in_one_line():
    from ray.exceptions import RayTaskError

    try:
        raise FileNotFoundError("[Errno 2] No such file: '/x/config.json'")
    except FileNotFoundError as cause:
        wrapped = RayTaskError("EngineActor.start", "Traceback (most recent call last):\n  File x\n" * 50, cause)
    wrapped = wrapped.as_instanceof_cause()
    line = one_line(wrapped)
    assert line == "FileNotFoundError: [Errno 2] No such file: '/x/config.json'"


def test_request_errors_are_one_line_in_tables_and_whole_in_the_log():
    import pyarrow as pa

    from cluster.cell_record import one_line_errors

    tb = "ActorDiedError: The actor died unexpectedly\n\tclass_name: EngineActor\n\x1b[31mTraceback ...\x1b[0m"
    rows = pa.table({"error": [None, tb, "HTTP 500: short", tb], "ok": [True, False, False, False]})
    out, logged = one_line_errors(rows)
    assert out is not None and out.schema == rows.schema
    assert out["error"].to_pylist() == [
        None,
        "ActorDiedError: The actor died unexpectedly",
        "HTTP 500: short",
        "ActorDiedError: The actor died unexpectedly",
    ]
    assert logged == [tb]  # each long text once
    clean = rows.slice(2, 1)
    assert one_line_errors(clean) == (clean, [])


def test_one_line_is_bounded():
    assert len(one_line(RuntimeError("x" * 5000))) <= 300


def test_a_cell_failing_inside_its_actor_keeps_one_line_and_logs_the_traceback(ray_local, tmp_path):
    from cluster.driver import Driver, RunOptions
    from workloads.requests import RequestSpec
    from workloads.text import workload_of
    from workloads.tracks.base import CellPlan, Track, TrackParams, register

    @register
    class _Remote(Track):
        name = "ztest-remote-error"
        question = "test only: a remote exception"
        params_model = TrackParams

        def cells(self, workload, params):
            bad = (RequestSpec("r00000", (1, 2, 10**6), 4),)  # outside the vocabulary: the engine actor raises
            return [CellPlan("bad", "aggregated", workload_of(bad, workload.arrival), requests=bad)]

    cfg = resolve("ztest-remote-error", {"engine": {"kind": "simulated"}})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    m = json.loads((run_dir / "manifest.json").read_text())
    err = m["cells"]["bad"]["error"]
    assert "\n" not in err and "\x1b" not in err and len(err) <= 300 and "vocabulary" in err
    assert (run_dir / "errors.log").is_file() and (run_dir / "cells" / "bad" / "errors.log").is_file()
    assert m["cells"]["bad"]["log"] == "cells/bad/errors.log"
    assert "\x1b" not in (run_dir / "errors.log").read_text()
    cell = json.loads((run_dir / "cells" / "bad" / "cell.json").read_text())
    assert "traceback" not in cell


def test_a_config_error_is_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError):
        resolve("e0", {"workload": {"arrival": {"kind": "poisson", "rate": 1e-9}}})


# --- 8. hostile paths --------------------------------------------------------------------------
def _stored_run(tmp_path):
    run = tmp_path / "store" / "runs" / "e0-run1"
    (run / "cells" / "c0").mkdir(parents=True)
    (run / "manifest.json").write_text('{"run_id": "e0-run1"}')
    (run / "cells" / "c0" / "cell.json").write_text("{}")
    # What a traversal would land on: the store's runs folder seen from inside the run.
    (tmp_path / "store" / "runs" / "manifest.json").write_text('{"run_id": "runs"}')
    return run


@pytest.mark.parametrize(
    "src",
    ["file://{run}/cells/..", "file://{run}/..", "{run}/cells/..", "file://{run}/../e0-run1", "file://{run}/./"],
    ids=["uri-ends-dotdot", "uri-parent", "path-ends-dotdot", "uri-dotdot-inside", "uri-dot"],
)
def test_runs_pull_refuses_a_source_with_dot_segments(tmp_path, src):
    run = _stored_run(tmp_path)
    to = tmp_path / "here" / "runs"
    to.mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    _one_line_error(_cli("runs", "pull", src.format(run=run), "--to", str(to)), "runs pull:", "'..' segment")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_runs_pull_of_a_plain_run_folder_still_works(tmp_path):
    run = _stored_run(tmp_path)
    res = _cli("runs", "pull", f"file://{run}", "--to", str(tmp_path / "here"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "here" / "e0-run1" / "cells" / "c0" / "cell.json").is_file()


def test_runs_pull_to_a_file_is_one_line(tmp_path):
    run = _stored_run(tmp_path)
    (tmp_path / "f").write_text("x")
    _one_line_error(_cli("runs", "pull", str(run), "--to", str(tmp_path / "f")), "--to:", "is a file")


# --- 9. input pdbench would ignore is refused by name ----------------------------------------
@pytest.mark.parametrize(
    "engine,field",
    [
        ({"kind": "reference", "vllm": {"gpu_memory_utilization": 0.9}}, "engine.vllm"),
        ({"kind": "simulated", "vllm": {"enforce_eager": True}}, "engine.vllm"),
        ({"kind": "reference", "simulated": {"decode_fixed_s": 0.1}}, "engine.simulated"),
        ({"kind": "vllm", "simulated": {"prefill_fixed_s": 0.1}}, "engine.simulated"),
        ({"kind": "vllm", "cpu_threads": 4}, "engine.cpu_threads"),
        ({"kind": "simulated", "cpu_threads": 2}, "engine.cpu_threads"),
        ({"kind": "vllm", "device": "cpu"}, "engine.device"),
        ({"kind": "simulated", "device": "cuda"}, "engine.device"),
        ({"kind": "simulated", "weight_seed": 7}, "engine.weight_seed"),
    ],
    ids=[
        "vllm-args-on-reference",
        "vllm-args-on-simulated",
        "law-on-reference",
        "law-on-vllm",
        "threads-on-vllm",
        "threads-on-simulated",
        "device-on-vllm",
        "device-on-simulated",
        "weight-seed-on-simulated",
    ],
)
def test_engine_options_meaningless_to_the_engine_are_refused(engine, field):
    with pytest.raises(ConfigError, match=rf"  {field}: means nothing to engine.kind '{engine['kind']}'"):
        resolve("e0", {"engine": engine})


def test_engine_options_the_engine_reads_are_accepted():
    resolve("e0", {"engine": {"kind": "vllm", "vllm": {"gpu_memory_utilization": 0.9}, "weight_seed": 3}})
    resolve("e0", {"engine": {"kind": "reference", "cpu_threads": 2, "device": "cpu", "weight_seed": 1}})
    resolve("e0", {"engine": {"kind": "simulated", "simulated": {"decode_fixed_s": 0.1}, "device": "auto"}})


def test_simulate_over_a_config_with_reference_only_options_names_the_field(tmp_path):
    res = _cli("run", "e0", "--simulate", "-o", str(tmp_path), "-c", str(_cfg(tmp_path, {"engine": {"cpu_threads": 4}})))
    _one_line_error(res, "engine.cpu_threads", "'simulated'")


def test_out_with_resume_is_refused(tmp_path):
    _one_line_error(
        _cli("run", "e0", "--simulate", "--resume", str(tmp_path), "--out", str(tmp_path / "o")), "--out and --resume exclude each other"
    )


def test_serve_refuses_engine_options_of_another_engine():
    from cluster.serve import serve_spec

    with pytest.raises(ConfigError, match=r"engine.vllm: means nothing"):
        serve_spec({"engine": {"kind": "reference", "vllm": {"enforce_eager": True}}}, {})
