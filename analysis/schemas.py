"""The packet's JSON files and row tables, versioned, and how files of older versions are read.

Version 2 split the old `mode`, which meant two things: `evidence` (real or simulated) in the
manifest and the summary, `serving_mode` (aggregated, disaggregated, external) on request rows and
cell plans. Version 1 packets (docs/evidence holds some) are read as version 2: the readers map the
old field, so analysis code only ever sees the current names.

The models type the fields every reader relies on and keep the rest as they are (`extra="allow"`):
a packet written by a newer pdbench still loads, and nothing a writer added is lost on the way.

The row tables (requests.parquet, transfers.parquet) have one typed column list each: writers go
through it strictly (a column it does not list, a value of the wrong kind, a null where none may
be are refused, naming the column: a new column is added here and in docs/metrics.md first);
readers go through it leniently (columns added since an old packet was written come back as
nulls, and columns a newer pdbench added are kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, TypeAlias

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, model_validator

from analysis.errortext import one_line

SCHEMA_VERSION = 2

Evidence = Literal["real", "simulated"]
ServingMode = Literal["aggregated", "disaggregated", "external"]


def _evidence_from_v1(data: Any) -> Any:
    """Version 1 said `mode: real|simulated` where version 2 says `evidence`."""
    if isinstance(data, dict) and "evidence" not in data and data.get("mode") in ("real", "simulated"):
        data = {k: v for k, v in data.items() if k != "mode"} | {"evidence": data["mode"]}
    return data


class ManifestCell(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str | None = None
    error: str | None = None
    config_hash: str | None = None


class Manifest(BaseModel):
    """manifest.json: what ran, where, with which code, and how far it got."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1  # absent: written before the field existed
    run_id: str
    track: str
    status: str
    evidence: Evidence
    engine: str | None = None
    config_hash: str | None = None
    serving_modes: list[ServingMode] = []
    cells: dict[str, ManifestCell] = {}

    _v1 = model_validator(mode="before")(_evidence_from_v1)


class CellSummary(BaseModel):
    """One cell of summary.json: its status, labels, serving mode and metrics."""

    model_config = ConfigDict(extra="allow")
    status: str | None = None
    error: str | None = None
    labels: dict[str, Any] = {}
    serving_mode: ServingMode | None = None
    metrics: dict[str, Any] | None = None


class Summary(BaseModel):
    """summary.json: per-cell metrics and the track's verdicts."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1  # absent: written before the field existed
    run_id: str
    track: str
    evidence: Evidence
    cells: dict[str, CellSummary] = {}
    verdicts: dict[str, Any] = {}

    _v1 = model_validator(mode="before")(_evidence_from_v1)


def evidence_of(manifest: dict[str, Any]) -> str | None:
    """A raw manifest's `evidence` (any version), for listings that read manifests without validating them."""
    return _evidence_from_v1(manifest).get("evidence")


def read_manifest(data: Any) -> dict[str, Any]:
    """A manifest of any version, as the current version's fields."""
    return Manifest.model_validate(data).model_dump(mode="json")


def read_summary(data: Any) -> dict[str, Any]:
    return Summary.model_validate(data).model_dump(mode="json")


# --- Row tables ------------------------------------------------------------------------------


class SchemaError(ValueError):
    """Rows that do not fit their file's columns; the message names the file and the column."""


@dataclass(frozen=True)
class Column:
    """One column of a row table: its arrow type, whether it may hold nulls, what it means (docs/metrics.md says more)."""

    name: str
    type: pa.DataType
    meaning: str
    nullable: bool = True


def _kind(t: pa.DataType) -> str:
    """What a value is, whatever its width: a number may widen or narrow (safely), never turn into text."""
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list of {_kind(t.value_type)}"
    return str(t)


def _fits(have: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_null(have) or _kind(have) == _kind(want):
        return True
    lists = (pa.types.is_list(have) or pa.types.is_large_list(have)) and pa.types.is_list(want)
    return lists and _fits(have.value_type, want.value_type)


ENGINE_EXTRA_PREFIXES = ("vllm_", "decode_vllm_")


Rows: TypeAlias = pd.DataFrame | pa.Table | list[dict[str, Any]]


def _column_names(rows: Rows) -> list[Any]:
    if isinstance(rows, pa.Table):
        return rows.column_names
    if isinstance(rows, pd.DataFrame):
        return list(rows.columns)
    return list(dict.fromkeys(k for r in rows for k in r))


@dataclass(frozen=True)
class RowSchema:
    """The columns of one row table, in the order they are written."""

    file: str
    columns: tuple[Column, ...]

    # Computed once: `table` asks for both per column and per cell, in the driver's file writer.
    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @cached_property
    def _names(self) -> frozenset[str]:
        return frozenset(self.names)

    @cached_property
    def _arrow(self) -> pa.Schema:
        fields = [pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns]
        return pa.schema(fields, metadata={"pdbench.schema_version": str(SCHEMA_VERSION)})

    def arrow(self) -> pa.Schema:
        return self._arrow

    def _fit(self, col: Column, values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        if values.null_count == len(values):  # no value to be of a wrong kind (pandas makes empty and all-NaN columns float)
            return pa.nulls(len(values), col.type)
        if values.type == col.type:  # typed already (a load generator's table)
            return values
        if not _fits(values.type, col.type):
            raise SchemaError(f"{self.file}: column {col.name!r} holds {_kind(values.type)} where its schema says {col.type}")
        try:
            return values.cast(col.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(f"{self.file}: column {col.name!r} has values that do not fit {col.type} ({one_line(e)})") from None

    def _values(self, rows: Rows, name: str, col: Column | None) -> pa.Array | pa.ChunkedArray:
        """Column `name` as Arrow; `col` is its schema entry, None for an engine extra (whose mixed
        kinds are kept as text rather than refused)."""
        if isinstance(rows, pa.Table):
            return rows.column(name)
        values = rows[name] if isinstance(rows, pd.DataFrame) else [r.get(name) for r in rows]
        try:
            return pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            if col is None:  # a mixed engine stat, kept as text
                return pa.array([None if v is None or v != v else str(v) for v in values])  # v != v: NaN
            raise SchemaError(
                f"{self.file}: column {name!r} mixes kinds of values where its schema says {col.type} ({one_line(e)})"
            ) from None

    def _written(self, col: Column, rows: Rows, names: frozenset[str]) -> pa.Array | pa.ChunkedArray:
        if col.name not in names:
            if not col.nullable and len(rows):
                raise SchemaError(f"{self.file}: column {col.name!r} is missing; every row needs it")
            return pa.nulls(len(rows), col.type)
        out = self._fit(col, self._values(rows, col.name, col))
        if not col.nullable and out.null_count:
            raise SchemaError(f"{self.file}: column {col.name!r} has {out.null_count} null value(s); its schema says it is never null")
        return out

    def table(self, rows: Rows) -> pa.Table:
        """The rows as the file is written: the schema's columns, each of its type, missing ones null;
        then engine extras. An engine's own stat pdbench does not list yet (a `vllm_*` or `decode_*`
        name: a newer vLLM reports more) is kept as reported, after the schema's columns, rather than
        failing a cell whose requests already ran; any other unknown column is refused. A table typed
        by this schema already passes through column by column. Rows come as a frame, a table, or a
        list of row dicts (a load generator's records, typed without a frame: a third of the CPU)."""
        names = [str(c) for c in _column_names(rows)]
        unknown = [c for c in names if c not in self._names]
        refused = [c for c in unknown if not c.startswith(ENGINE_EXTRA_PREFIXES)]
        if refused:
            raise SchemaError(f"{self.file}: column {refused[0]!r} is not in its schema; add it to analysis/schemas.py and docs/metrics.md")
        present = frozenset(names)
        arrays = [self._written(c, rows, present) for c in self.columns]
        if not unknown:
            return pa.Table.from_arrays(arrays, schema=self.arrow())
        extras = [self._values(rows, name, None) for name in unknown]
        fields = [*self.arrow(), *(pa.field(n, a.type) for n, a in zip(unknown, extras, strict=True))]
        return pa.Table.from_arrays([*arrays, *extras], schema=pa.schema(fields, metadata=self.arrow().metadata))

    def frame(self, data: pa.Table) -> pd.DataFrame:
        """A file of any version as the current columns, each of its type: columns added since come
        back null, columns a newer pdbench added are kept after them. Nulls are the writer's to refuse."""
        n = data.num_rows
        arrays = [self._fit(c, data.column(c.name)) if c.name in data.column_names else pa.nulls(n, c.type) for c in self.columns]
        extra = [name for name in data.column_names if name not in self._names]
        return pa.Table.from_arrays([*arrays, *(data.column(e) for e in extra)], names=[*self.names, *extra]).to_pandas()


def _cols(kind: pa.DataType, *named: tuple[str, str], nullable: bool = True) -> tuple[Column, ...]:
    return tuple(Column(n, kind, meaning, nullable) for n, meaning in named)


TEXT, FLOAT, INT, BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
# The engine's own numbers for one request (its process's clock); a vLLM disaggregated decode
# engine's own copies carry the prefix `decode_` beside the pair's numbers.
ENGINE_COLUMNS = (
    *_cols(
        FLOAT,
        ("server_queue_s", "engine: prefill start − request received"),
        ("prefill_s", "engine: prefill end − prefill start"),
        ("transfer_s", "disaggregated: KV hand-over on the decode side; null when aggregated"),
        ("first_decode_s", "engine: KV ready → first token"),
        ("server_e2e_s", "engine: request received → last token"),
        ("vllm_first_token_latency_s", "vLLM's own first-token latency"),
        ("vllm_decode_s", "vLLM: last token − first token"),
    ),
    *_cols(
        INT,
        ("vllm_generation_tokens", "vLLM: tokens it generated"),
        ("vllm_num_cached_tokens", "vLLM: prompt tokens found in its prefix cache"),
    ),
)
DECODE_PREFIX = "decode_"

REQUEST_COLUMNS: tuple[Column, ...] = (
    *_cols(
        TEXT,
        ("run_id", "the run"),
        ("cell_id", "the cell"),
        ("request_id", "the request, unique in its cell"),
        ("engine", "engine kind (external: a server driven through `target:`)"),
        ("serving_mode", "aggregated, disaggregated or external (version 1: `mode`)"),
        nullable=False,
    ),
    *_cols(BOOL, ("warmup", "a warm-up request: kept, out of every metric"), ("ok", "the request completed"), nullable=False),
    *_cols(
        INT,
        ("input_tokens", "prompt tokens"),
        ("max_tokens", "tokens asked for"),
        ("output_tokens", "tokens received"),
        nullable=False,
    ),
    Column("output_token_ids", pa.list_(INT), "the tokens received", nullable=False),
    Column("error", TEXT, "why the request failed (one line); null when ok"),
    *_cols(FLOAT, ("t_scheduled", "when the request was due"), ("t_sent", "when it left for the engine"), nullable=False),
    *_cols(
        FLOAT,
        ("t_first_token", "arrival of the first message with tokens"),
        ("t_last_token", "arrival of the last message with tokens"),
        ("ttft_s", "t_first_token − t_sent"),
        ("tpot_s", "(t_last_token − t_first_token) / (output_tokens − 1)"),
        ("e2e_s", "t_last_token − t_sent"),
    ),
    Column("queue_delay_s", FLOAT, "send lag: t_sent − t_scheduled", nullable=False),
    Column("itl_s", pa.list_(FLOAT), "one gap per message that carried tokens", nullable=False),
    *_cols(
        FLOAT,
        ("harness_ttft_s", "the harness's share of ttft_s"),
        ("harness_tpot_s", "the harness's share of tpot_s"),
        ("harness_e2e_s", "the harness's share of e2e_s"),
        ("harness_hop_s", "the cell's bare actor hop (median of 5 no-op calls)"),
        ("client_send_s", "HTTP client: asked to send → handed to the socket"),
    ),
    Column("server_token_s", pa.list_(FLOAT), "the engine's own per-token times since it received the request"),
    *ENGINE_COLUMNS,
    *_cols(
        TEXT,
        ("loadgen_node_id", "Ray node of the load generator"),
        ("engine_node_id", "Ray node of the engine that served the request"),
        ("prefill_node_id", "disaggregated: Ray node of the prefill side"),
        ("decode_node_id", "disaggregated: Ray node of the decode side"),
    ),
    Column("loadgen_priority_raised", BOOL, "open loop: the load generator sent real-time and read replies at raised priority"),
    Column("kv_transfer_ok", BOOL, "disaggregated: the KV arrived (false: the decode side recomputed the prefill)"),
    Column("kv_wait_s", FLOAT, "vLLM disaggregated: the request's wait for its KV inside the decode engine"),
    Column("decode_retry_reason", TEXT, "vLLM disaggregated: why the decode engine ran the request again without a transfer"),
    *(Column(f"{DECODE_PREFIX}{c.name}", c.type, f"the decode engine's own {c.name}") for c in ENGINE_COLUMNS),
    Column("meta", TEXT, "track-built prompts: the request's meta (answer, depth) as JSON"),
    Column("output_text", TEXT, "track-built prompts: the decoded output"),
)

TRANSFER_COLUMNS: tuple[Column, ...] = (
    *_cols(
        TEXT,
        ("run_id", "the run"),
        ("cell_id", "the cell"),
        ("request_id", "the request whose KV moved"),
        ("key", "the transfer's key in the KV directory"),
        nullable=False,
    ),
    Column("backend", TEXT, "the KV backend that moved it (kv_transfer.backend)"),
    Column("tokens", INT, "prompt tokens whose KV was moved"),
    Column("groups", INT, "objects the KV travelled in", nullable=False),
    Column("bytes", INT, "bytes through the object store; null where the backend moves them unseen (nixl-vllm)"),
    Column("analytic_bytes", INT, "tokens × KV bytes per token"),
    *_cols(
        FLOAT,
        ("extract_s", "prefill side: packing groups into host buffers (what the put did not hide)"),
        ("put_s", "prefill side: ray.put of the groups, summed"),
        ("wait_ref_s", "decode side: waiting for group references"),
        ("fetch_s", "decode side: making the bytes local"),
        ("get_s", "decode side: ray.get"),
        ("inject_s", "decode side: copying into the decode engine's memory"),
        ("total_s", "decode side: first group asked for → last one injected"),
        ("stall_s", "wait_ref_s + fetch_s"),
        ("send_s", "prefill side: start of the publish → end of its last put"),
    ),
    *_cols(TEXT, ("src_node", "Ray node of the prefill side"), ("dst_node", "Ray node of the decode side")),
    Column("ok", BOOL, "the KV arrived", nullable=False),
    Column("error", TEXT, "why it did not; null when ok"),
    Column("status", TEXT, "ok, failed, cancelled or none (nothing to move)", nullable=False),
    *_cols(
        FLOAT,
        ("queued_s", "vLLM: load started → a connector thread took it up"),
        ("kv_wait_s", "vLLM: load started → KV injected"),
        ("ready_to_injected_s", "vLLM, one host: sender's KV complete → receiver's KV injected"),
        ("injected_mono", "receiver's CLOCK_MONOTONIC when the KV was injected"),
    ),
    Column("direct_groups", INT, "groups copied to the GPU straight from registered object-store memory"),
    Column("warmup", BOOL, "the request was a warm-up request", nullable=False),
)

REQUESTS = RowSchema("requests.parquet", REQUEST_COLUMNS)
TRANSFERS = RowSchema("transfers.parquet", TRANSFER_COLUMNS)


def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    return data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)


def read_requests(data: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """requests.parquet of any version: version 1 named the serving mode column `mode`."""
    table = _as_table(data)
    if "mode" in table.column_names and "serving_mode" not in table.column_names:
        table = table.rename_columns(["serving_mode" if n == "mode" else n for n in table.column_names])
    return REQUESTS.frame(table)


def read_transfers(data: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """transfers.parquet of any version: rows from before `status` existed were transfers, ok or failed."""
    table = _as_table(data)
    if "status" not in table.column_names and "ok" in table.column_names:
        ok = table.column("ok").to_pylist()
        table = table.append_column("status", pa.array(["ok" if v else "failed" for v in ok], TEXT))
    return TRANSFERS.frame(table)
