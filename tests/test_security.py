"""Safe defaults: no secret in any packet file, and model/dataset text cannot script a report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from analysis.packet import load_packet, write_json, write_parquet
from analysis.redact import REDACTED, redact_obj, redact_text, secret_env_values
from analysis.report import sections, write_reports
from cluster.config import resolve

ENV_SECRETS = {
    "HF_TOKEN": "hf_" + "q" * 34,
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "OPENAI_API_KEY": "sk-proj-" + "Z9" * 20,
    "MY_SERVICE_KEY": "plain-value-with-no-known-shape",
}
CONFIG_SECRETS = {"hf_token": "hf_config" + "w" * 30, "api_key": "also-no-known-shape-1234"}


def _strings_in(path: Path) -> str:
    if path.suffix == ".parquet":  # compressed on disk: look at what a reader gets back
        df = pd.read_parquet(path)
        return " ".join(map(str, df.columns)) + " " + df.astype(str).to_string()
    return path.read_bytes().decode("utf-8", errors="replace")


def test_no_secret_in_any_file_of_a_packet(ray_local, tmp_path, monkeypatch):
    from cluster.driver import Driver, RunOptions

    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)
    cfg = resolve(
        "e0",
        {
            "workload": {"num_requests": 3, "warmup_requests": 0, "output_len": {"kind": "fixed", "value": 4}},
            "params": {"rounds": 1},  # one cell per repeat: fewer engine starts, same files
            # A user pastes secrets where they do not belong: into engine arguments (the reference
            # engine reads hf_overrides; engine.vllm would be refused as meaningless to it).
            "engine": {"hf_overrides": {**CONFIG_SECRETS, "note": f"token is {ENV_SECRETS['MY_SERVICE_KEY']}"}},
        },
    )
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path)).run()
    write_reports(load_packet(run_dir))  # `pdbench report` rebuilds: still clean
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"manifest.json", "config.yaml", "summary.json", "report.md", "report.html", "requests.parquet"} <= {p.name for p in files}
    for p in files:
        text = _strings_in(p)
        for secret in [*ENV_SECRETS.values(), *CONFIG_SECRETS.values()]:
            assert secret not in text, f"{secret[:6]}… in {p.relative_to(run_dir)}"
    config = (run_dir / "config.yaml").read_text()
    assert config.count(REDACTED) == 3 and "num_requests: 3" in config  # and the rest is intact
    assert load_packet(run_dir).manifest["status"] == "complete"


def test_redaction_rules_leave_ordinary_fields_alone():
    env = {"HF_TOKEN": "hf_" + "a" * 30, "TOKENIZERS_PARALLELISM": "false", "SOME_KEY": "short"}
    secrets = secret_env_values(env)
    assert secrets == ["hf_" + "a" * 30]  # short values (flags) are not secrets
    obj = {
        "max_tokens": 32,
        "kv_bytes_per_token": 4096,
        "output_tokens": 7,
        "api_key_env": "OPENAI_API_KEY",
        "password": "hunter2",
        "aws_secret_access_key": "x" * 40,
        "client_secret": None,
        "nested": [{"auth_token": "abc"}, "Authorization: Bearer abc.def-ghi_123", f"id {env['HF_TOKEN']} end"],
    }
    out = redact_obj(obj, secrets)
    assert out["max_tokens"] == 32 and out["kv_bytes_per_token"] == 4096 and out["output_tokens"] == 7
    assert out["api_key_env"] == "OPENAI_API_KEY"  # the name of a variable is not the secret
    assert out["password"] == out["aws_secret_access_key"] == REDACTED and out["client_secret"] is None
    assert out["nested"] == [{"auth_token": REDACTED}, f"Authorization: Bearer {REDACTED}", f"id {REDACTED} end"]
    assert redact_text("AKIAIOSFODNN7EXAMPLE and ghp_" + "b" * 36, []) == f"{REDACTED} and {REDACTED}"


def test_lists_of_numbers_come_back_untouched_and_lists_with_text_are_still_redacted():
    secret = "hf_" + "c" * 30
    tokens, gaps = list(range(1000)), [0.01, None, 2, True]
    assert redact_obj(tokens, [secret]) is tokens and redact_obj(gaps, [secret]) is gaps  # one pass, the same object
    assert redact_obj([1, 2.5, f"key {secret}", None], [secret]) == [1, 2.5, f"key {REDACTED}", None]
    assert redact_obj((3, [f"a {secret}"]), [secret]) == (3, [f"a {REDACTED}"])


def test_a_table_is_redacted_column_by_column_in_its_own_types(monkeypatch):
    import pyarrow as pa

    from analysis.packet import redact_table

    secret = "plain-value-with-no-known-shape"
    monkeypatch.setenv("MY_SERVICE_KEY", secret)
    df = pd.DataFrame(
        {
            "error": pd.Series([None, f"401 for key {secret}"], dtype=object),
            "request_id": pd.Series(["r0", "r1"], dtype="string"),
            "text": pd.Series([f"said {secret} twice", None], dtype="string"),
            "output_token_ids": [[1, 2], [3]],
            "nested": [{"api_key": "x"}, {"ok": 1}],
            "ttft_s": [0.1, 0.2],
            "backend": pd.Categorical([f"via {secret}", "plain"]),  # a dictionary column: its categories are text
            "same": pd.Series([f"a {secret}", f"a {secret}"], dtype=object),  # one distinct value, two rows
        }
    )
    table = pa.Table.from_pandas(df, preserve_index=False)
    out = redact_table(table).to_pandas()
    assert out["backend"].tolist() == [f"via {REDACTED}", "plain"] and isinstance(out["backend"].dtype, pd.CategoricalDtype)
    assert not any(secret in c for c in out["backend"].cat.categories)  # the categories themselves, not only the values
    assert pd.isna(out["error"].iloc[0]) and out["error"].iloc[1] == f"401 for key {REDACTED}"
    assert out["text"].tolist()[0] == f"said {REDACTED} twice"
    assert out["same"].tolist() == [f"a {REDACTED}"] * 2
    assert out["nested"].tolist() == [{"api_key": REDACTED, "ok": None}, {"api_key": None, "ok": 1}]
    assert [list(x) for x in out["output_token_ids"]] == [[1, 2], [3]] and out["ttft_s"].tolist() == [0.1, 0.2]
    kept = [c for c in df.columns if c not in ("backend", "nested", "output_token_ids")]
    assert out[kept].dtypes.to_dict() == table.to_pandas()[kept].dtypes.to_dict() and pd.isna(out["text"].iloc[1])
    clean = table.drop_columns(["error", "text", "nested", "backend", "same"])
    assert redact_table(clean) is clean  # nothing to remove: the table itself, no copy


PAYLOAD = "</script><script>alert('x')</script><img src=x onerror=alert(1)>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_html_report_escapes_model_and_dataset_text(tmp_path):
    """Text from a model, a dataset or a config lands in facts, tables, errors and figure labels."""
    cells = [f"c{PAYLOAD}", "ok"]
    rows = []
    for c in cells:
        for i in range(3):
            rows.append(
                {
                    "run_id": "r",
                    "cell_id": c,
                    "request_id": f"{PAYLOAD}{i}",
                    "serving_mode": "aggregated",
                    "engine": "reference",
                    "warmup": False,
                    "ok": True,
                    "error": None,
                    "input_tokens": 4,
                    "output_tokens": 3,
                    "t_scheduled": 0.0,
                    "t_sent": 0.01 * i,
                    "t_first_token": 0.1 + i,
                    "t_last_token": 0.3 + i,
                    "ttft_s": 0.1,
                    "tpot_s": 0.1,
                    "e2e_s": 0.3,
                    "queue_delay_s": 0.0,
                    "itl_s": [0.1, 0.1],
                    "server_queue_s": 0.0,
                    "prefill_s": 0.05,
                    "transfer_s": None,
                    "first_decode_s": 0.0,
                    "output_token_ids": [1, 2, 3],
                }
            )
    write_parquet(tmp_path / "requests.parquet", pd.DataFrame(rows))
    write_json(
        tmp_path / "manifest.json",
        {
            "run_id": "r",
            "track": "e0",
            "evidence": "real",
            "engine": "reference",
            "serving_modes": ["aggregated"],
            "model": {"name": f"model{PAYLOAD}", "architecture_hash": PAYLOAD},
            "status": "partial",
        },
    )
    write_json(
        tmp_path / "summary.json",
        {
            "run_id": "r",
            "track": "e0",
            "evidence": "real",
            "cells": {c: {"status": "ok", "serving_mode": "aggregated", "metrics": None} for c in cells}
            | {"bad": {"status": "failed", "error": f"engine said {PAYLOAD}"}},
            "verdicts": {},
        },
    )
    packet = load_packet(tmp_path)
    write_reports(packet)
    page = (tmp_path / "report.html").read_text()
    parser = _Tags()
    parser.feed(page)
    figures = sum(len(s.figures) for s in sections(packet))
    assert figures >= 2
    # One <script> for plotly.js and one per figure: the payload opened none, and no <img>.
    assert parser.tags.count("script") == 1 + figures
    assert "img" not in parser.tags
    assert "<script>alert" not in page and "</script><script>" not in page
    assert html_escaped(PAYLOAD) in page  # shown as text, not dropped
    assert json.loads((tmp_path / "summary.json").read_text())["cells"]["bad"]["error"].endswith(PAYLOAD)


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("10.1.2.3", False)]
)
def test_loopback_detection(host, loopback):
    from cluster.serve import is_loopback

    assert is_loopback(host) is loopback


def test_the_env_var_a_target_names_is_secret_whatever_its_name(monkeypatch):
    from analysis.redact import secret_env_values
    from cluster.config import resolve
    from cluster.planning import for_target, plan_cells

    monkeypatch.setenv("VLLM_AUTH", "s3cr3t-value-0123456789")
    assert "s3cr3t-value-0123456789" not in secret_env_values()
    cfg = resolve("e0", {"target": {"base_url": "http://127.0.0.1:9", "model": "m", "vocab_size": 100, "api_key_env": "VLLM_AUTH"}})
    for_target(cfg, plan_cells(cfg))
    assert "s3cr3t-value-0123456789" in secret_env_values()
