"""The evidence packet on disk: atomic writers, and a loader that needs nothing but the files.

Every file is written to a temporary name in the same folder, flushed, then renamed, so a
killed run leaves either the old file or the new one, never half of one. Everything written goes
through analysis/redact.py first: no secret reaches a packet.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from analysis import schemas
from analysis.errortext import one_line, strip_ansi
from analysis.redact import redact_obj, redact_shapes, redact_text, redact_value, secret_env_values


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a packet is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """A document built from the packet's own (already redacted) files: a report."""
    clean = redact_shapes(text)
    _atomic_write(Path(path), lambda f: f.write(clean.encode()))


def write_log(path: Path, text: str) -> None:
    """Free text from outside pdbench (a remote traceback): every net applies."""
    clean = redact_text(strip_ansi(text))
    _atomic_write(Path(path), lambda f: f.write(clean.encode()))


def write_json(path: Path, obj: Any) -> None:
    clean = redact_obj(json.loads(json.dumps(obj, default=str)))
    _atomic_write(Path(path), lambda f: f.write((json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()))


def write_yaml(path: Path, obj: Any) -> None:
    clean = redact_obj(obj)
    _atomic_write(Path(path), lambda f: f.write(yaml.safe_dump(clean, sort_keys=True).encode()))


def _holds_text(t: pa.DataType) -> bool:
    """Strings, or a list, struct, map or dictionary with strings somewhere inside: numbers,
    booleans and times are never looked at (most of a request table's columns)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    if pa.types.is_dictionary(t):
        return _holds_text(t.value_type)
    return any(_holds_text(t.field(i).type) for i in range(t.num_fields))


def _redact_array(col: pa.ChunkedArray, secrets: list[str]) -> pa.ChunkedArray | None:
    """The column with its secrets removed, in its own type; None where nothing changed."""
    t = col.type
    if pa.types.is_dictionary(t):  # a pandas categorical: its categories decoded, redacted, encoded again
        plain = _redact_array(col.cast(t.value_type), secrets)
        return None if plain is None else pc.dictionary_encode(plain)
    if t.num_fields:  # nested (lists or structs of text, a dict per row): value by value
        before = col.to_pylist()
        after = redact_value(before, secrets)
        return None if after is before else pa.chunked_array([pa.array(after, type=t)], type=t)
    # Text: each distinct value once (a cell's rows share their ids, engine, node, error).
    distinct = pc.unique(col)
    before = distinct.to_pylist()
    after = redact_value(before, secrets)
    if after is before:
        return None
    return pc.take(pa.array(after, type=t), pc.index_in(col, value_set=distinct))


def redact_table(table: pa.Table) -> pa.Table:
    """The table with every secret removed from its text (values and column names), each column in
    its own type; the same table where nothing changed."""
    secrets = secret_env_values()
    out = table
    for i, field in enumerate(table.schema):
        if _holds_text(field.type):
            new = _redact_array(table.column(i), secrets)
            if new is not None:
                out = out.set_column(i, field.with_type(new.type), new)
    names = [redact_value(n, secrets) for n in out.column_names]
    return out if names == out.column_names else out.rename_columns(names)


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    """A table with no schema of its own (telemetry.parquet); requests and transfers go through write_rows."""
    clean = redact_table(pa.Table.from_pandas(df, preserve_index=False))
    _atomic_write(Path(path), lambda f: pq.write_table(clean, f))


# A cell's own records are an Arrow IPC file: the run-level parquet is built from them once, at the
# end, and a cell's file is written while the sweep goes on. Encoding a cell's few rows (55 columns)
# cost ~1 ms of the driver's CPU as parquet on a quiet 2-core box (2.3 ms at 8 virtual nodes, the
# largest part of the file writer's work per cell), ~0.07 ms as IPC.
ARROW_SUFFIX = ".arrow"
CELL_REQUESTS, CELL_TRANSFERS = "requests.arrow", "transfers.arrow"  # under cells/<cell_id>/


def _write_table(table: pa.Table, path: Path, f: Any) -> None:
    if path.suffix == ARROW_SUFFIX:
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, f)


def write_rows(path: Path, rows: pd.DataFrame | pa.Table, schema: schemas.RowSchema) -> pa.Table:
    """requests or transfers rows, through their schema (analysis/schemas.py): a column it does not
    list or a value of the wrong kind is refused (SchemaError naming the column). Rows come as a
    frame, or as a table a load generator already typed (schemas.RowSchema.table). Written as
    parquet, or as an Arrow IPC file where the path ends in `.arrow` (a cell's own). Returns the
    table as written (redacted, typed), for a caller that would otherwise read the file back."""
    table = redact_table(schema.table(rows))
    _atomic_write(Path(path), lambda f: _write_table(table, Path(path), f))
    return table


class PacketError(ValueError):
    """A packet file that cannot be read (truncated, not JSON, not parquet or Arrow); the message names it."""


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_packet_json(path: Path) -> Any:
    try:
        return read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PacketError(f"{path} is truncated or not JSON ({e}); rebuild the run with `pdbench run --resume` on its folder") from None


def _unreadable(path: Path, e: Exception) -> PacketError:
    kind = "Arrow IPC" if Path(path).suffix == ARROW_SUFFIX else "parquet"
    return PacketError(f"{path} is not a readable {kind} file ({one_line(e)}); run the cell again (`--resume`)")


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise _unreadable(path, e) from None


def read_rows(path: Path, read: Callable[[pa.Table], pd.DataFrame]) -> pd.DataFrame:
    """Request or transfer rows of any version (schemas.read_requests, read_transfers): a run's
    parquet, or a cell's Arrow IPC file."""
    try:
        if Path(path).suffix == ARROW_SUFFIX:
            with pa.OSFile(str(path)) as f:
                table = pa.ipc.open_file(f).read_all()
        else:
            table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    try:
        return read(table)
    except schemas.SchemaError as e:
        raise PacketError(f"{Path(path).parent}/{e}; was it written by pdbench?") from None


@dataclass
class Packet:
    """A run folder as analysis sees it."""

    root: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    requests: pd.DataFrame
    transfers: pd.DataFrame | None
    telemetry: pd.DataFrame | None = None

    @property
    def simulated(self) -> bool:
        return self.manifest.get("evidence") == "simulated"


def read_validated(path: Path, read: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A manifest or summary of any schema version (analysis/schemas.py), as the current one."""
    data = read_packet_json(path)
    try:
        return read(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise PacketError(f"{path} is not a pdbench packet file ({where}: {first['msg']}); was it written by pdbench?") from None


def load_packet(root: Path) -> Packet:
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} is not a pdbench run folder (no manifest.json)")
    transfers = root / "transfers.parquet"
    req = root / "requests.parquet"
    tel = root / "telemetry.parquet"
    manifest = read_packet_json(root / "manifest.json")
    if not isinstance(manifest, dict):
        raise PacketError(f"{root / 'manifest.json'} is not a pdbench manifest (a JSON object)")
    return Packet(
        root=root,
        manifest=read_validated(root / "manifest.json", schemas.read_manifest),
        summary=read_validated(root / "summary.json", schemas.read_summary) if (root / "summary.json").is_file() else {},
        requests=read_rows(req, schemas.read_requests) if req.is_file() else pd.DataFrame(),
        transfers=read_rows(transfers, schemas.read_transfers) if transfers.is_file() else None,
        telemetry=read_parquet(tel) if tel.is_file() else None,
    )
