"""Per-track analysis: verdicts and report sections. One module per track."""

from __future__ import annotations

from analysis.tracks.base import Section, TrackAnalysis, get_analysis

__all__ = ["Section", "TrackAnalysis", "get_analysis"]
