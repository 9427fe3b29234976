"""The experiment tracks E0–E6: each turns a validated config into a list of cells."""

from workloads.tracks.base import CellPlan, Track, get_track, list_tracks

__all__ = ["CellPlan", "Track", "get_track", "list_tracks"]
