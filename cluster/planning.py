"""Planning: which cells a config asks for, what decides each one's result, whether they can run,
and how many run at once. Nothing here starts an engine or writes a file."""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from actors.engines import EngineConfig
from actors.engines.models import model_path_problem
from actors.handoffs import KV_BACKENDS
from analysis.redact import treat_env_as_secret
from cluster.cells import MODES
from cluster.config import UNHASHED, ConfigError, ExperimentConfig, kv_transfer_hashed, sha256_of
from workloads.arrivals import schedule_problem
from workloads.tracks import CellPlan, get_track


def plan_cells(cfg: ExperimentConfig) -> list[CellPlan]:
    """The track's first round of cells. Workload errors (a missing dataset file, a prompt that
    cannot be built) are config errors naming the field."""
    track = get_track(cfg.track)
    try:
        plans = track.cells(cfg.workload, track.params_model.model_validate(cfg.params))
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  {e}") from None
    return for_target(cfg, plans)


def for_target(cfg: ExperimentConfig, plans: list[CellPlan]) -> list[CellPlan]:
    """With a `target:`, every cell (of every round) drives that server over HTTP."""
    if cfg.target is not None and cfg.target.api_key_env:
        treat_env_as_secret(cfg.target.api_key_env)  # its value never reaches a packet file
    if cfg.target is None:
        return plans
    if cfg.simulated:
        raise ConfigError("invalid config:\n  target: an external server is real; it cannot run with --simulate")
    tuned = sorted({k for p in plans for k in p.engine_overrides})
    if tuned:
        raise ConfigError(
            f"invalid config:\n  target: track {cfg.track} sets the engine per cell ({', '.join(tuned)}); "
            "an external server's engine is not pdbench's to set"
        )
    modes = sorted({p.serving_mode for p in plans})
    if len(modes) > 1:
        raise ConfigError(
            f"invalid config:\n  target: track {cfg.track} compares serving modes {', '.join(modes)}; "
            "an external server is one deployment (run this track on pdbench's engines)"
        )
    return [dataclasses.replace(p, serving_mode="external") for p in plans]


def cell_engine(cfg: ExperimentConfig, plan: CellPlan) -> EngineConfig:
    if not plan.engine_overrides:  # the run's engine, validated with the config (frozen): the driver asks ~9 times a cell
        return cfg.engine
    return EngineConfig.model_validate({**cfg.engine.model_dump(), **plan.engine_overrides})


def cell_config(cfg: ExperimentConfig, plan: CellPlan) -> ExperimentConfig:
    """The config as one cell runs it: its own KV backend where the track gives one."""
    if plan.kv_backend is None or plan.kv_backend == cfg.kv_transfer.backend:
        return cfg
    return cfg.model_copy(update={"kv_transfer": cfg.kv_transfer.model_copy(update={"backend": plan.kv_backend})})


def cell_hash(cfg: ExperimentConfig, plan: CellPlan) -> str:
    """What decides a cell's result: engine, workload (and the prompts a track built), seed,
    mode and engine count, KV transfer, SLO, placement; not its name."""
    what: dict[str, Any] = {
        "engine": cell_engine(cfg, plan).model_dump(mode="json"),
        # The steady-state window only changes the analysis; old cells' hashes stand without it.
        "workload": plan.workload.model_dump(mode="json", exclude={"steady_state"}),
        "seed": cfg.seed + plan.seed_offset,
        "mode": plan.serving_mode,  # the serving mode, under its old key: renaming it would change every cell's hash
        "replicas": plan.replicas,
        "kv_transfer": kv_transfer_hashed(cell_config(cfg, plan)),
        "placement": cfg.placement.model_dump(mode="json", exclude=UNHASHED["placement"]),
        "slo": cfg.slo.model_dump(mode="json"),
    }
    if plan.requests is not None:
        what["requests"] = sha256_of([[r.request_id, list(r.prompt_token_ids), r.max_tokens, r.warmup, r.meta] for r in plan.requests])
        what["tokenizer"] = plan.tokenizer
    if plan.measured_slice is not None:  # one stretch of the requests (E0's rounds); unsliced cells' hashes stand
        what["measured_slice"] = list(plan.measured_slice)
    if cfg.target is not None:  # another server is another result (only then: old hashes stand)
        what["target"] = cfg.target.model_dump(mode="json")
    return sha256_of(what)


def cell_concurrency(cfg: ExperimentConfig, bundles: list[list[dict[str, float]]], measures_latency: bool = True) -> int:
    """`max_concurrent_cells`, with `auto` resolved against the cluster.

    auto: as many cells at once as the cluster's resources hold (GPUs, CPUs), so the same command
    spreads over more nodes on a bigger cluster; except CPU-only cells of a track that measures
    latency, which run one at a time, because cells sharing cores would measure each other's load.
    """
    if cfg.max_concurrent_cells != "auto":
        return int(cfg.max_concurrent_cells)
    need: dict[str, float] = {}
    for cell in bundles:
        per: dict[str, float] = {}
        for b in cell:
            for k, v in b.items():
                per[k] = per.get(k, 0.0) + v
        for k, v in per.items():
            need[k] = max(need.get(k, 0.0), v)
    if not need or (measures_latency and not need.get("GPU")):
        return 1
    total = ray.cluster_resources()
    return max(1, min(int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0))


def preflight(cfg: ExperimentConfig, plans: list[CellPlan]) -> None:
    """Refuse what can never run before any engine starts."""
    errors = []
    for p in plans:
        if p.serving_mode not in MODES:
            errors.append(f"  serving_mode: cell {p.cell_id} asks for serving mode {p.serving_mode!r}; allowed: {', '.join(MODES)}")
            continue
        eng = cell_engine(cfg, p)
        if p.kv_backend is not None and p.kv_backend not in KV_BACKENDS:
            known = ", ".join(KV_BACKENDS.names())
            errors.append(f"  params.backends: cell {p.cell_id} asks for KV backend {p.kv_backend!r}; choose from: {known}")
        problem = schedule_problem(p.workload.arrival, p.workload.num_requests)
        if problem:  # a track's own rates (params.rates, a rate search) skip WorkloadSpec's check
            errors.append(f"  workload.arrival.rate (or the track's params rates): cell {p.cell_id}: {problem}")
        need = p.workload.input_len.upper + p.workload.output_len.upper
        if need > eng.max_model_len and cfg.target is None:
            errors.append(
                f"  workload.input_len/output_len (or the track's params lengths): cell {p.cell_id} can ask for {need} tokens "
                f"but engine.max_model_len is {eng.max_model_len}"
            )
    for model in sorted({cell_engine(cfg, p).model for p in plans if p.serving_mode in MODES}) if cfg.target is None else []:
        problem = model_path_problem(model)
        if problem:
            errors.append(f"  engine.model: {problem}")
    if cfg.engine.kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            errors.append("  engine.kind: 'vllm' needs vllm installed (pip install -e '.[vllm]' on a GPU node)")
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(dict.fromkeys(errors)))
