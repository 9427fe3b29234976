"""Fault injection, secrets: a secret planted anywhere a string can travel reaches no packet file
(parquet read back with pandas included), and redaction changes nothing that is not a secret."""

from __future__ import annotations

import json

import pandas as pd
import plotly.offline
import pyarrow as pa
import pytest
import yaml

from analysis.packet import load_packet, write_json, write_log, write_parquet, write_text, write_yaml
from analysis.redact import REDACTED, redact_obj, redact_text

KEY = "plain-value-with-no-known-shape"  # no credential shape: only the env net can catch it
ERROR = f'HTTP 401: {{"error": "invalid api key {KEY}"}}'


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_KEY", KEY)


def _column(kind: str) -> pd.Series:
    values = [ERROR, "all fine here", None]
    if kind == "object":
        return pd.Series(values, dtype=object)
    if kind == "str":  # pandas 3's default string dtype
        return pd.Series(values, dtype="str")
    if kind in ("string[pyarrow]", "string[python]"):
        return pd.Series(values, dtype=kind)
    if kind == "category":
        return pd.Series(values, dtype="category")
    if kind == "list":
        return pd.Series([[ERROR, "x y"], ["a b"], None], dtype=object)
    if kind == "struct":
        return pd.Series([{"body": ERROR, "n": 1}, {"body": "b c", "n": 2}, None], dtype=object)
    if kind == "arrow-large-string":
        return pd.Series(values, dtype=pd.ArrowDtype(pa.large_string()))
    raise AssertionError(kind)


STRING_KINDS = ["object", "str", "string[pyarrow]", "string[python]", "category", "list", "struct", "arrow-large-string"]


@pytest.mark.parametrize("kind", STRING_KINDS)
def test_parquet_strings_of_every_dtype_are_redacted(secret_env, tmp_path, kind):
    df = pd.DataFrame({"error": _column(kind), "n": [1, 2, 3]})
    write_parquet(tmp_path / "r.parquet", df)
    back = pd.read_parquet(tmp_path / "r.parquet")
    text = back.astype(str).to_string()
    assert KEY not in text, kind
    assert REDACTED in text and ("all fine here" in text or "a b" in text or "b c" in text)
    assert back["n"].tolist() == [1, 2, 3]


def test_parquet_column_names_are_redacted(secret_env, tmp_path):
    write_parquet(tmp_path / "r.parquet", pd.DataFrame({f"note {KEY}": [1]}))
    assert KEY not in " ".join(pd.read_parquet(tmp_path / "r.parquet").columns)


def test_parquet_keeps_dtypes_and_untouched_columns(secret_env, tmp_path):
    df = pd.DataFrame(
        {
            "error": pd.Series([ERROR, None], dtype="str"),
            "engine": pd.Series(["reference", "reference"], dtype="category"),
            "ids": [[1, 2, 3], [4]],
            "itl_s": [[0.1, 0.2], []],
        }
    )
    write_parquet(tmp_path / "r.parquet", df)
    back = pd.read_parquet(tmp_path / "r.parquet")
    assert isinstance(back["engine"].dtype, pd.CategoricalDtype) and back["engine"].tolist() == ["reference"] * 2
    assert [list(x) for x in back["ids"]] == [[1, 2, 3], [4]]
    assert back["error"].iloc[0] == ERROR.replace(KEY, REDACTED)


@pytest.mark.parametrize(
    "writer,read",
    [
        (write_json, lambda p: p.read_text()),
        (write_yaml, lambda p: p.read_text()),
    ],
    ids=["json", "yaml"],
)
def test_structured_files_redact_free_text_and_secret_keys(secret_env, tmp_path, writer, read):
    p = tmp_path / "f"
    writer(p, {"cells": {"c": {"error": ERROR}}, "engine": {"vllm": {"hf_token": "anything-at-all"}}})
    text = read(p)
    assert KEY not in text and "anything-at-all" not in text and "invalid api key" in text


def test_errors_log_is_redacted_and_has_no_colour_codes(secret_env, tmp_path):
    write_log(tmp_path / "errors.log", f"\x1b[31mTraceback\x1b[0m\n  File x\nRuntimeError: {ERROR}\n")
    text = (tmp_path / "errors.log").read_text()
    assert KEY not in text and "\x1b" not in text and "RuntimeError" in text


@pytest.mark.parametrize(
    "shape",
    ["hf_" + "q" * 34, "sk-proj-" + "Z9" * 20, "AKIAIOSFODNN7EXAMPLE", "ghp_" + "b" * 36, "xoxb-1234567890-abc"],
    ids=["huggingface", "openai", "aws", "github", "slack"],
)
def test_credential_shapes_are_redacted_even_as_one_word(tmp_path, shape):
    write_json(tmp_path / "m.json", {"model": shape, "error": f"bad {shape}"})
    assert shape not in (tmp_path / "m.json").read_text()


# --- redaction changes nothing that is not a secret ------------------------------------------
@pytest.mark.parametrize(
    "name,value",
    [("SOME_TOKEN", "reference"), ("SOME_KEY", "aggregated"), ("MY_SECRET", "simulated"), ("X_PASSWORD", "function")],
)
def test_an_env_value_that_is_an_ordinary_word_changes_no_identifier(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    obj = {"engine": {"kind": value}, "serving_modes": [value], "model": {"name": value}}
    assert redact_obj(obj) == obj
    # In free text it is removed only as a whole word: a longer word that contains it stays.
    assert redact_text(f"engine {value}s failed: {value}") == f"engine {value}s failed: {REDACTED}"


def test_reports_keep_inlined_plotly_js_and_prose_verbatim(monkeypatch, tmp_path):
    monkeypatch.setenv("SOME_TOKEN", "function")  # a word plotly.js holds thousands of times
    page = f"<script>{plotly.offline.get_plotlyjs()}</script> engine function"
    write_text(tmp_path / "report.html", page)
    assert (tmp_path / "report.html").read_text() == page


def test_some_token_reference_leaves_config_manifest_and_resume_true(ray_local, tmp_path, monkeypatch):
    """The red-team case: SOME_TOKEN=reference blanked engine.kind in config.yaml and the manifest,
    altered plotly.js and blocked --resume."""
    from typer.testing import CliRunner

    from cluster.cli import app
    from cluster.config import config_hash, resolve, to_yaml
    from cluster.driver import Driver, RunOptions

    monkeypatch.setenv("SOME_TOKEN", "simulated")
    monkeypatch.setenv("OTHER_KEY", "aggregated")
    cfg = resolve("e0", {"engine": {"kind": "simulated"}, "workload": {"num_requests": 2, "warmup_requests": 0}})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == to_yaml(cfg)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["engine"] == "simulated" and m["evidence"] == "simulated" and m["serving_modes"] == ["aggregated"]
    assert m["config_hash"] == config_hash(cfg)
    assert plotly.offline.get_plotlyjs() in (run_dir / "report.html").read_text()
    df = load_packet(run_dir).requests
    assert set(df["engine"]) == {"simulated"} and set(df["serving_mode"]) == {"aggregated"}
    res = CliRunner().invoke(app, ["run", "e0", "--simulate", "--no-progress", "--resume", str(run_dir)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
