"""What a track adds to the generic report: verdicts (into summary.json) and sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass
class Section:
    """A titled block both renderers (Markdown, HTML) can draw: text, a table, figures."""

    title: str
    text: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figures: list[Any] = field(default_factory=list)


class TrackAnalysis:
    """Default: no verdicts, no extra sections."""

    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        return []


def get_analysis(track: str) -> TrackAnalysis:
    """`analysis.tracks.<track>.ANALYSIS` where that module exists, else the plain report."""
    import importlib

    try:
        mod = importlib.import_module(f"analysis.tracks.{track}")
    except ModuleNotFoundError:
        return TrackAnalysis()
    return mod.ANALYSIS
