"""Experiment config: YAML → validated pydantic models → canonical form → sha256.

Layering: the track's quick profile, then the config file, then CLI flags. Only the resolved
result is validated and hashed, so two machines with the same inputs get the same hash. Where the
run's files go and which cluster runs it are not part of the config (they change no result).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from actors.engines.spec import EngineConfig
from actors.handoffs.spec import DEFAULT_BACKEND, KVHandoffConfig
from actors.target import TargetSpec
from analysis.metrics import SLO
from workloads.requests import WorkloadSpec
from workloads.tracks import get_track, list_tracks


class ConfigError(ValueError):
    """A config that will not run; the message names every bad field."""


class PlacementSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    strategy: Literal["PACK", "SPREAD"] = Field(
        default="PACK", description="disaggregated cells: prefill and decode on one node (PACK) or two (SPREAD)"
    )
    cpus_per_engine: float = Field(default=1.0, gt=0)
    gpus_per_engine: int | None = Field(default=None, ge=0, description="None: 1 for vllm or device cuda, else 0")
    wait_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="longest a cell waits for its resources (CPUs, GPUs held by other jobs or cells) before it fails "
        "naming them; not part of the config hash (it changes no result)",
    )


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    track: str
    seed: int = Field(default=0, description="seed of prompts, lengths and arrivals")
    engine: EngineConfig = EngineConfig()
    workload: WorkloadSpec = WorkloadSpec()
    slo: SLO = SLO()
    placement: PlacementSpec = PlacementSpec()
    kv_transfer: KVHandoffConfig = Field(
        default_factory=KVHandoffConfig, description="disaggregated cells: how KV moves from prefill to decode"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="track-specific parameters")
    max_concurrent_cells: PositiveInt | Literal["auto"] = Field(
        default="auto",
        description="cells run at once on disjoint placement groups; auto: as many GPU cells as the "
        "cluster's GPUs hold, CPU-only cells one at a time (shared cores would skew latency)",
    )
    request_timeout_s: float | None = Field(default=600.0, gt=0)
    fresh_engines: bool = Field(
        default=False,
        description="start a fresh engine for every cell instead of reusing a warm one of the same engine configuration "
        "(aggregated cells); not part of the config hash (a reused engine is reset between cells)",
    )
    target: TargetSpec | None = Field(default=None, description="benchmark this OpenAI-compatible server instead of starting engines")

    @field_validator("track")
    @classmethod
    def _known_track(cls, v: str) -> str:
        names = [t.name for t in list_tracks()]
        if v.lower() not in names:
            raise ValueError(f"unknown track {v!r}; allowed: {', '.join(names)}")
        return v.lower()

    @model_validator(mode="after")
    def _decode_submit_fits_the_engine(self) -> ExperimentConfig:
        if self.kv_transfer.decode_submit == "with_prefill" and self.engine.kind != "vllm":
            raise ValueError(
                f"kv_transfer.decode_submit: 'with_prefill' needs engine.kind vllm (the {self.engine.kind} pair moves "
                "its KV after the prefill); use 'after_prefill'"
            )
        if self.kv_transfer.save == "layerwise" and self.engine.kind != "vllm":
            raise ValueError(
                f"kv_transfer.save: 'layerwise' needs engine.kind vllm (the {self.engine.kind} pair moves its KV "
                "after the prefill); use 'after_forward'"
            )
        return self

    @property
    def simulated(self) -> bool:
        return self.engine.kind == "simulated"

    def gpus_per_engine(self) -> int:
        if self.placement.gpus_per_engine is not None:
            return self.placement.gpus_per_engine
        return 1 if self.engine.kind == "vllm" or self.engine.device == "cuda" else 0


# Sections whose `kind` picks a different model (a length distribution, an arrival process): a
# new kind replaces the whole mapping. `engine.kind` is not one: its other fields apply to any kind.
_KIND_IS_VARIANT_EXCEPT = ("engine",)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a variant mapping with a different `kind` replaces the base instead of mixing fields."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same_kind = k in _KIND_IS_VARIANT_EXCEPT or (
            isinstance(b, dict) and isinstance(v, dict) and b.get("kind", v.get("kind")) == v.get("kind", b.get("kind"))
        )
        if isinstance(b, dict) and isinstance(v, dict) and same_kind:
            out[k] = _merge(b, v)
        else:
            out[k] = v
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    cur: Any = model
    for part in loc:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cur = field.annotation
    return sorted(getattr(cur, "model_fields", {}))


def _format(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("fixed", "uniform", "normal", "closed", "poisson", "gamma")))
        name = (prefix + ".".join(str(p) for p in loc)).rstrip(".")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1])
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "value_error" and (sub := re.match(r"^Value error, ([a-z_][a-z0-9_.]*): (.*)$", msg, re.S)):
            # A check across fields names the field it is about: `workload` + `arrival.rate`.
            name, msg = f"{name}.{sub.group(1)}" if name else sub.group(1), sub.group(2)
        elif not name:  # a rule across fields: its message names them
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        elif "input" in e and e["type"] not in ("missing",):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {name}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path} is a folder; give the experiment YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a text file; give the experiment YAML file") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def resolve(track: str, file_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Quick-profile defaults ← config file ← CLI overrides, validated as a whole."""
    file_data = dict(file_data or {})
    if "track" in file_data and str(file_data["track"]).lower() != track.lower():
        raise ConfigError(f"invalid config:\n  track: the file says {file_data['track']!r} but the command asks for {track!r}")
    try:
        t = get_track(track)
    except KeyError as e:
        raise ConfigError(f"invalid config:\n  track: {e.args[0]}") from None
    data = _merge(_merge(dict(t.quick_defaults), file_data), overrides or {})
    data["track"] = track
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, ExperimentConfig)) from None
    try:
        params = t.params_model.model_validate(cfg.params)
    except ValidationError as e:
        raise ConfigError(_format(e, t.params_model, prefix="params.")) from None
    return cfg.model_copy(update={"params": params.model_dump(mode="json")})


# Fields that say how long to wait, not what to measure: a resume may change them.
UNHASHED: dict[str, Any] = {"placement": {"wait_timeout_s"}, "fresh_engines": True}


def kv_transfer_hashed(cfg: ExperimentConfig) -> dict[str, Any]:
    """The KV section as hashes see it: the default backend left out, so the hashes of runs made
    before backends had names stand (resume finds their cells)."""
    out = cfg.kv_transfer.model_dump(mode="json")
    if out["backend"] == DEFAULT_BACKEND:
        del out["backend"]
    return out


def config_hash(cfg: ExperimentConfig) -> str:
    return sha256_of({**cfg.model_dump(mode="json", exclude=UNHASHED), "kv_transfer": kv_transfer_hashed(cfg)})


def to_yaml(cfg: ExperimentConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
