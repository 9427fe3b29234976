"""Packet files are versioned: every packet in docs/evidence (version 1 ones too) loads as the current version, `mode` split."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.packet import load_packet, write_json
from analysis.schemas import REQUESTS, SCHEMA_VERSION, TRANSFERS, evidence_of, read_manifest, read_requests, read_summary

EVIDENCE = Path(__file__).resolve().parent.parent / "docs" / "evidence"
PACKETS = sorted(p.parent.name for p in EVIDENCE.glob("*/manifest.json"))


def _version(name):
    return json.loads((EVIDENCE / name / "manifest.json").read_text()).get("schema_version", 1)


def test_old_packets_are_found():
    assert sum(_version(n) == 1 for n in PACKETS) >= 5, PACKETS
    assert any((EVIDENCE / n / "transfers.parquet").is_file() for n in PACKETS if _version(n) == 1)


@pytest.mark.parametrize("name", PACKETS)
def test_every_evidence_packet_loads_as_the_current_version(name):
    root = EVIDENCE / name
    raw = json.loads((root / "manifest.json").read_text())
    if _version(name) == 1:
        assert "mode" in raw and "evidence" not in raw, "a version 1 packet: the test must read the old field"
    p = load_packet(root)
    assert p.manifest["evidence"] == raw.get("evidence", raw.get("mode")) == "real" and "mode" not in p.manifest
    assert p.manifest["schema_version"] == _version(name)  # read as the current fields, still saying what it was
    assert not p.simulated
    assert p.summary["evidence"] == "real" and "mode" not in p.summary
    assert list(p.requests.columns) == list(REQUESTS.names)  # every column, those added since as nulls; `mode` renamed
    assert set(p.requests["serving_mode"]) <= set(p.manifest["serving_modes"])
    assert p.manifest["run_id"] == raw["run_id"] and p.manifest["hardware"] == raw["hardware"]  # the rest kept as written
    REQUESTS.table(p.requests)  # a resumed old run writes its rows again: they fit the schema
    if (root / "transfers.parquet").is_file():
        assert p.transfers is not None and list(p.transfers.columns) == list(TRANSFERS.names)
        assert set(p.transfers["status"]) <= {"ok", "failed", "cancelled", "none"}
        assert (p.transfers["status"] == "ok").sum() == p.transfers["ok"].sum()  # old rows: status from `ok`
        TRANSFERS.table(p.transfers)


@pytest.mark.parametrize("name", PACKETS)
def test_every_evidence_packet_reports(name, tmp_path):
    from analysis.report import write_reports

    root = tmp_path / name
    shutil.copytree(EVIDENCE / name, root, ignore=shutil.ignore_patterns("report.*"))
    write_reports(load_packet(root))
    assert "| evidence | real |" in (root / "report.md").read_text()


def test_version_1_e3_packet_keeps_both_serving_modes_apart():
    p = load_packet(EVIDENCE / "e3-vllm-qwen3-8b-2xh200-async")
    assert set(p.requests["serving_mode"]) == {"aggregated", "disaggregated"}


def test_version_2_fields_pass_through_and_simulated_stays_simulated():
    m = read_manifest({"schema_version": 2, "run_id": "r", "track": "e0", "status": "complete", "evidence": "simulated"})
    assert m["evidence"] == "simulated" and m["schema_version"] == SCHEMA_VERSION
    old = {"run_id": "r", "track": "e0", "status": "complete", "mode": "simulated"}
    assert read_manifest(old)["evidence"] == "simulated" and evidence_of(old) == "simulated"
    s = read_summary({"run_id": "r", "track": "e0", "mode": "real", "cells": {"c": {"serving_mode": "aggregated"}}})
    assert s["evidence"] == "real" and s["cells"]["c"]["serving_mode"] == "aggregated"


def test_requests_rename_only_the_old_column():
    renamed = read_requests(pd.DataFrame({"mode": ["aggregated"]}))
    assert "mode" not in renamed and list(renamed["serving_mode"]) == ["aggregated"]
    both = read_requests(pd.DataFrame({"serving_mode": ["aggregated"], "mode": ["x"]}))
    assert list(both["serving_mode"]) == ["aggregated"] and list(both["mode"]) == ["x"]


def test_a_manifest_without_evidence_is_refused_naming_the_file(tmp_path):
    write_json(tmp_path / "manifest.json", {"run_id": "r", "track": "e0", "status": "complete"})
    with pytest.raises(ValueError, match=r"manifest\.json is not a pdbench packet file \(evidence: Field required\)"):
        load_packet(tmp_path)


def test_report_rebuilds_from_a_version_1_e3_packet(tmp_path):
    """The E3 analysis groups requests by serving mode: it must find them in an old packet too."""
    from analysis.report import write_reports

    root = tmp_path / "old"
    shutil.copytree(EVIDENCE / "e3c1-vllm-qwen3-8b-2xh200-async", root)
    write_reports(load_packet(root))
    md = (root / "report.md").read_text()
    assert "evidence: real" in (root / "report.html").read_text() and "| evidence | real |" in md
    assert "aggregated" in md and "disaggregated" in md
