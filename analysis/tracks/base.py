"""What a track adds to the generic report: verdicts (into summary.json) and sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from analysis.packet import Packet


@dataclass
class Section:
    """A titled block both renderers (Markdown, HTML) can draw: text, a table, figures."""

    title: str
    text: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figures: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Headline:
    """One of a track's headline numbers, already written for a reader (units included)."""

    label: str
    value: str


class TrackAnalysis:
    """Default: no verdicts, no extra sections.

    Tracks that need the KV transfer rows (E3) override the `*_with_transfers` / `packet_sections`
    forms; the others keep the short ones, which those forms call by default.
    """

    # True where every cell runs the same workload and the verdict compares cells with each other
    # (E0's repetitions, E3's modes and backends): there a difference in how the cells' users moved
    # (analysis.metrics.lockstep_share) is worth a note; a sweep's cells differ on purpose.
    compares_like_cells = False

    def verdicts(self, requests: pd.DataFrame, cells: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sections(self, requests: pd.DataFrame, summary: dict[str, Any]) -> list[Section]:
        return []

    def headline(self, summary: dict[str, Any]) -> list[Headline]:
        """The few numbers a reader looks for first (terminal summary, top of the report)."""
        return []

    def verdicts_with_transfers(
        self, requests: pd.DataFrame, transfers: pd.DataFrame | None, cells: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        return self.verdicts(requests, cells, params)

    def packet_sections(self, packet: Packet) -> list[Section]:
        return self.sections(packet.requests, packet.summary)


def get_analysis(track: str) -> TrackAnalysis:
    """`analysis.tracks.<track>.ANALYSIS` where that module exists, else the plain report."""
    import importlib

    try:
        mod = importlib.import_module(f"analysis.tracks.{track}")
    except ModuleNotFoundError:
        return TrackAnalysis()
    return mod.ANALYSIS
