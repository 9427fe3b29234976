"""The experiment tracks E0–E6: each turns a validated config into a list of cells."""

from workloads.tracks.base import CellOutcome, CellPlan, Track, get_track, list_tracks

__all__ = ["CellOutcome", "CellPlan", "Track", "get_track", "list_tracks"]
