"""The run-level files come out the same whether a cell's rows come from the tables the run kept as it
wrote them or from the cell's files read back (a resumed run's earlier cells)."""

import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.packet import CELL_REQUESTS, CELL_TRANSFERS, PacketError, read_rows, write_rows
from analysis.records import to_frame
from analysis.schemas import REQUESTS, TRANSFERS, read_requests
from cluster.cell_record import CellTables
from cluster.config import resolve
from cluster.run_files import assemble


def _raw(i, **server):
    return {
        "request_id": f"r{i}",
        "warmup": i == 0,
        "input_tokens": 3,
        "max_tokens": 2,
        "t_scheduled": 0.0,
        "t_sent": 0.01 * i,
        "t_chunks": [0.1 + i, 0.2 + i],
        "chunk_tokens": [1, 1],
        "output_token_ids": [5, 6],
        "server_token_s": [0.05, 0.15],
        "ok": i != 2,
        "error": "boom" if i == 2 else None,
        "server": {"server_queue_s": 0.001 * i, "prefill_s": 0.04, "transfer_s": None, "first_decode_s": 0.0, **server},
    }


def _cell(root, cell, **server):
    """A finished cell's files; the tables as the run keeps them."""
    rows = to_frame([_raw(i, **server) for i in range(4)], run_id="run", cell_id=cell, serving_mode="aggregated", engine="vllm")
    moved = pd.DataFrame([{"run_id": "run", "cell_id": cell, "request_id": "r1", "key": "k1", "groups": 1, "bytes": 4096}])
    moved = moved.assign(ok=True, status="ok", warmup=False)
    d = root / "cells" / cell
    meta = {"cell_id": cell, "status": "ok", "labels": {"cell": cell}, "serving_mode": "aggregated", "arrival": {"rate": None}}
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps(meta))
    return meta, CellTables(write_rows(d / CELL_REQUESTS, rows, REQUESTS), write_rows(d / CELL_TRANSFERS, moved, TRANSFERS))


def test_kept_tables_give_the_files_reading_back_gives(tmp_path):
    cfg = resolve("e1", {"params": {"input_lens": [8], "output_lens": [4]}})
    read, kept = tmp_path / "read", tmp_path / "kept"
    # Engine extras of different kinds per cell (a newer vLLM's stat) cannot share one Arrow column.
    cells = [_cell(read, "a", vllm_generation_tokens=2.0), _cell(read, "b")]
    cells += [_cell(read, "c", vllm_new_stat="x"), _cell(read, "d", vllm_new_stat=1.5)]
    shutil.copytree(read, kept)
    metas = [m for m, _ in cells]
    assert assemble(read, cfg, "run", metas) == "complete"
    # Cell "b" stands for an earlier attempt's cell: only its file is there.
    written = {m["cell_id"]: t for m, t in cells if m["cell_id"] != "b"}
    assert assemble(kept, cfg, "run", metas, written) == "complete"
    for name in ("requests.parquet", "transfers.parquet"):
        assert pq.read_table(kept / name).equals(pq.read_table(read / name)), name
    assert pq.read_table(kept / "requests.parquet").column("cell_id").to_pylist() == [c for c in "abcd" for _ in range(4)]
    summary = json.loads((read / "summary.json").read_text())
    assert summary["cells"]["a"]["metrics"]["requests"] == 3 and summary == json.loads((kept / "summary.json").read_text())


def test_a_cells_records_are_an_arrow_ipc_file_that_reads_back_as_written(tmp_path):
    _, tables = _cell(tmp_path, "a", vllm_generation_tokens=2.0)
    path = tmp_path / "cells" / "a" / CELL_REQUESTS
    with pa.OSFile(str(path)) as f:
        on_disk = pa.ipc.open_file(f).read_all()  # an IPC file, not parquet
    assert on_disk.equals(tables.requests) and on_disk.schema.metadata == tables.requests.schema.metadata
    back = read_rows(path, read_requests)
    assert back["request_id"].tolist() == ["r0", "r1", "r2", "r3"] and back["vllm_generation_tokens"].tolist() == [2.0] * 4
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PacketError, match=r"requests.arrow is not a readable Arrow IPC file"):
        read_rows(path, read_requests)
