"""Track registry: a track is a question plus a rule for expanding a config into cells.

Tracks live in workloads/ because a cell is a description of what to ask (workload, serving mode,
engine overrides), not of how to run it; cluster/ turns plans into actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from workloads.requests import WorkloadSpec


class TrackParams(BaseModel):
    """Per-track parameters (`params:` in a config); each track subclasses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class CellPlan:
    """One unit of work: a serving mode and a workload, on its own placement group.

    `labels` are the grid coordinates the reports group by (e.g. repeat=1, concurrency=8);
    `engine_overrides` patch the config's engine section for this cell only (e.g. max_model_len);
    `replicas` is the number of engines of an aggregated cell, requests spread over them (E3 gives
    the aggregated side as many engines as a disaggregated pair has); a disaggregated cell is
    always one prefill and one decode engine and ignores it.
    """

    cell_id: str
    mode: str
    workload: WorkloadSpec
    labels: dict[str, Any] = field(default_factory=dict)
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    seed_offset: int = 0
    replicas: int = 1


class Track:
    name: ClassVar[str]
    question: ClassVar[str]
    params_model: ClassVar[type[TrackParams]] = TrackParams
    # The quick profile: config defaults sized for a 2-core CPU box with the tiny model.
    quick_defaults: ClassVar[dict[str, Any]] = {}

    def cells(self, workload: WorkloadSpec, params: TrackParams) -> list[CellPlan]:
        raise NotImplementedError


_REGISTRY: dict[str, Track] = {}


def register(cls: type[Track]) -> type[Track]:
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    """Import every module of this package: each track registers itself, so adding a track is
    adding a file."""
    import importlib
    import pkgutil

    import workloads.tracks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"workloads.tracks.{mod.name}")


def get_track(name: str) -> Track:
    _load_all()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown track {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def list_tracks() -> list[Track]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
