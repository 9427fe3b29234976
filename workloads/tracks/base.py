"""Track registry: a track is a question plus a rule for expanding a config into cells.

Tracks live in workloads/ because a cell is a description of what to ask (workload, serving mode,
engine overrides), not of how to run it; cluster/ turns plans into actors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from workloads.registry import Registry
from workloads.requests import RequestSpec, WorkloadSpec, synthetic_requests


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
    `requests`, when set, are the cell's prompts made by the track (dataset items, passkey
    prompts) instead of synthetic ones; `workload` then describes them (counts, length bounds,
    arrival). `tokenizer` names what turned their text into ids, so outputs can be decoded back
    for scoring. `provenance` is what the manifest records about where the prompts came from
    (a dataset subset's ids and their hash).
    `kv_backend`, when set, is the KV transfer backend of this disaggregated cell in place of the
    config's `kv_transfer.backend` (E3 compares backends as cells of one run).
    `measured_slice` = (start, stop) sends only measured requests start..stop-1 (after the same
    warm-up), under their own ids and prompts: repeats interleaved in rounds (E0) each send one
    stretch of the same request list, so request ids stay comparable across cells.
    """

    cell_id: str
    serving_mode: str
    workload: WorkloadSpec
    labels: dict[str, Any] = field(default_factory=dict)
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    seed_offset: int = 0
    replicas: int = 1
    requests: tuple[RequestSpec, ...] | None = None
    tokenizer: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    measured_slice: tuple[int, int] | None = None
    kv_backend: str | None = None

    def build_requests(self, vocab_size: int, seed: int) -> list[RequestSpec]:
        """The requests to send, once the engine has said how large its vocabulary is."""
        return self._sliced(self._all_requests(vocab_size, seed))

    def _sliced(self, reqs: list[RequestSpec]) -> list[RequestSpec]:
        """Warm-up plus this cell's stretch of measured requests; open-loop send times start at
        the stretch's first request, so a later stretch does not wait for the earlier ones."""
        if self.measured_slice is None:
            return reqs
        start, stop = self.measured_slice
        part = [r for r in reqs if not r.warmup][start:stop]
        t0 = next((r.t_scheduled for r in part if r.t_scheduled is not None), 0.0)
        part = [r if r.t_scheduled is None else dataclasses.replace(r, t_scheduled=r.t_scheduled - t0) for r in part]
        return [r for r in reqs if r.warmup] + part

    def _all_requests(self, vocab_size: int, seed: int) -> list[RequestSpec]:
        if self.requests is None:
            return synthetic_requests(self.workload, vocab_size, seed)
        top = max((max(r.prompt_token_ids) for r in self.requests if r.prompt_token_ids), default=-1)
        if top >= vocab_size:
            raise ValueError(
                f"cell {self.cell_id}: prompt token id {top} is outside the model's vocabulary "
                f"({vocab_size}); tokenizer {self.tokenizer!r} does not belong to this model"
            )
        return list(self.requests)

    @property
    def num_requests(self) -> int:
        """Requests the cell sends, warm-up included (for progress displays)."""
        if self.requests is not None:
            warm, meas = sum(r.warmup for r in self.requests), sum(not r.warmup for r in self.requests)
        else:
            warm, meas = self.workload.warmup_requests, self.workload.num_requests
        if self.measured_slice is not None:
            start, stop = self.measured_slice
            meas = len(range(meas)[start:stop])
        return warm + meas


@dataclass(frozen=True)
class CellOutcome:
    """What an adaptive track learns from a finished cell: its status and its metrics
    (summary.json's per-cell names: `slo_attainment`, `request_throughput_rps`, `slo`, ...)."""

    cell_id: str
    labels: dict[str, Any]
    ok: bool
    error: str | None
    metrics: dict[str, Any] | None


P = TypeVar("P", bound=TrackParams)


class Track(Generic[P]):
    """A track, typed by its params model `P` (E2's cells take E2Params, not any TrackParams)."""

    name: ClassVar[str]
    question: ClassVar[str]
    params_model: ClassVar[type[TrackParams]] = TrackParams
    # The quick profile: config defaults sized for a 2-core CPU box with the tiny model.
    quick_defaults: ClassVar[dict[str, Any]] = {}
    # Whether the track's answer is a latency: then CPU-only cells never share cores
    # (max_concurrent_cells: auto); tracks that measure tokens or memory fill the CPUs.
    measures_latency: ClassVar[bool] = True

    def cells(self, workload: WorkloadSpec, params: P) -> list[CellPlan]:
        raise NotImplementedError

    def next_cells(self, workload: WorkloadSpec, params: P, done: Mapping[str, CellOutcome]) -> list[CellPlan]:
        """Adaptive tracks: the cells that should exist given the finished ones (`done`).

        The driver runs, as the next round, every returned cell whose id has not run yet, and
        stops when none is new. Rounds are deterministic functions of finished results, so a
        resumed run proposes the same cells again. Default: a fixed grid, nothing adaptive.
        """
        return []


TRACKS: Registry[Track[Any]] = Registry("track")
T = TypeVar("T", bound=type[Track[Any]])


def register(cls: T) -> T:
    TRACKS.add(cls.name, cls())
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


def get_track(name: str) -> Track[Any]:
    _load_all()
    return TRACKS.get(name.lower())


def list_tracks() -> list[Track[Any]]:
    _load_all()
    return [TRACKS.get(k) for k in TRACKS]
