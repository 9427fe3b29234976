"""The packet's JSON files and row tables, versioned, and how files of older versions are read.

Version 2 split the old `mode`, which meant two things: `evidence` (real or simulated) in the
manifest and the summary, `serving_mode` (aggregated, disaggregated, external) on request rows and
cell plans. Version 1 packets (docs/evidence holds some) are read as version 2: the readers map the
old field, so analysis code only ever sees the current names.

The models type the fields every reader relies on and keep the rest as they are (`extra="allow"`):
a packet written by a newer pdbench still loads, and nothing a writer added is lost on the way.
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

SCHEMA_VERSION = 2

Evidence = Literal["real", "simulated"]
ServingMode = Literal["aggregated", "disaggregated", "external"]


def _evidence_from_v1(data: Any) -> Any:
    """Version 1 said `mode: real|simulated` where version 2 says `evidence`."""
    if isinstance(data, dict) and "evidence" not in data and data.get("mode") in ("real", "simulated"):
        data = {k: v for k, v in data.items() if k != "mode"} | {"evidence": data["mode"]}
    return data


class ManifestCell(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str | None = None
    error: str | None = None
    config_hash: str | None = None


class Manifest(BaseModel):
    """manifest.json: what ran, where, with which code, and how far it got."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1  # absent: written before the field existed
    run_id: str
    track: str
    status: str
    evidence: Evidence
    engine: str | None = None
    config_hash: str | None = None
    serving_modes: list[ServingMode] = []
    cells: dict[str, ManifestCell] = {}

    _v1 = model_validator(mode="before")(_evidence_from_v1)


class CellSummary(BaseModel):
    """One cell of summary.json: its status, labels, serving mode and metrics."""

    model_config = ConfigDict(extra="allow")
    status: str | None = None
    error: str | None = None
    labels: dict[str, Any] = {}
    serving_mode: ServingMode | None = None
    metrics: dict[str, Any] | None = None


class Summary(BaseModel):
    """summary.json: per-cell metrics and the track's verdicts."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1  # absent: written before the field existed
    run_id: str
    track: str
    evidence: Evidence
    cells: dict[str, CellSummary] = {}
    verdicts: dict[str, Any] = {}

    _v1 = model_validator(mode="before")(_evidence_from_v1)


def evidence_of(manifest: dict[str, Any]) -> str | None:
    """A raw manifest's `evidence` (any version), for listings that read manifests without validating them."""
    return _evidence_from_v1(manifest).get("evidence")


def read_manifest(data: Any) -> dict[str, Any]:
    """A manifest of any version, as the current version's fields."""
    return Manifest.model_validate(data).model_dump(mode="json")


def read_summary(data: Any) -> dict[str, Any]:
    return Summary.model_validate(data).model_dump(mode="json")


def read_requests(df: pd.DataFrame) -> pd.DataFrame:
    """requests.parquet of any version: version 1 named the serving mode column `mode`."""
    if "mode" in df.columns and "serving_mode" not in df.columns:
        return df.rename(columns={"mode": "serving_mode"})
    return df
