"""Per-track analysis: verdicts and report sections. One module per track."""

from __future__ import annotations

from analysis.tracks.base import Headline, Section, TrackAnalysis, get_analysis

__all__ = ["Headline", "Section", "TrackAnalysis", "get_analysis"]
