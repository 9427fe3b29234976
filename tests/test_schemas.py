"""Packet files are versioned: version 1 packets (docs/evidence) load as version 2, `mode` split."""

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.packet import load_packet, write_json
from analysis.schemas import SCHEMA_VERSION, evidence_of, read_manifest, read_requests, read_summary

EVIDENCE = Path(__file__).resolve().parent.parent / "docs" / "evidence"
OLD_PACKETS = sorted(p.parent.name for p in EVIDENCE.glob("*/manifest.json"))


def test_old_packets_are_found():
    assert len(OLD_PACKETS) >= 5, OLD_PACKETS


@pytest.mark.parametrize("name", OLD_PACKETS)
def test_version_1_packet_loads_with_evidence_and_serving_mode(name):
    root = EVIDENCE / name
    raw = json.loads((root / "manifest.json").read_text())
    assert "mode" in raw and "evidence" not in raw, "these packets are version 1: the test must read the old field"
    p = load_packet(root)
    assert p.manifest["evidence"] == raw["mode"] == "real" and "mode" not in p.manifest
    assert p.manifest["schema_version"] == 1  # read as version 2's fields, still saying what it was
    assert not p.simulated
    assert p.summary["evidence"] == "real" and "mode" not in p.summary
    assert "serving_mode" in p.requests and "mode" not in p.requests
    assert set(p.requests["serving_mode"]) <= set(p.manifest["serving_modes"])
    assert p.manifest["run_id"] == raw["run_id"] and p.manifest["hardware"] == raw["hardware"]  # the rest kept as written


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
    assert list(read_requests(pd.DataFrame({"mode": ["aggregated"]})).columns) == ["serving_mode"]
    both = pd.DataFrame({"serving_mode": ["aggregated"], "mode": ["x"]})
    assert list(read_requests(both).columns) == ["serving_mode", "mode"]


def test_a_manifest_without_evidence_is_refused_naming_the_file(tmp_path):
    write_json(tmp_path / "manifest.json", {"run_id": "r", "track": "e0", "status": "complete"})
    with pytest.raises(ValueError, match=r"manifest\.json is not a pdbench packet file \(evidence: Field required\)"):
        load_packet(tmp_path)


def test_report_rebuilds_from_a_version_1_e3_packet(tmp_path):
    """The E3 analysis groups requests by serving mode: it must find them in an old packet too."""
    import shutil

    from analysis.report import write_reports

    root = tmp_path / "old"
    shutil.copytree(EVIDENCE / "e3c1-vllm-qwen3-8b-2xh200-async", root)
    write_reports(load_packet(root))
    md = (root / "report.md").read_text()
    assert "evidence: real" in (root / "report.html").read_text() and "| evidence | real |" in md
    assert "aggregated" in md and "disaggregated" in md
