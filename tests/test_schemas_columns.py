"""requests.parquet and transfers.parquet have typed columns: writers refuse what the schema does not
list, readers give every column of its type, and docs/metrics.md lists exactly the schema's columns."""

import itertools
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.packet import PacketError, load_packet, read_rows, write_json, write_rows
from analysis.records import to_frame
from analysis.schemas import REQUESTS, SCHEMA_VERSION, TRANSFERS, SchemaError, read_requests, read_transfers

METRICS_MD = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def _documented(heading: str) -> set[str]:
    """Backticked names in the first column of the first table under `heading`."""
    lines = METRICS_MD.read_text().split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))[2:]  # past the header and its rule
    return {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}


@pytest.mark.parametrize(
    ("schema", "heading"),
    [(REQUESTS, "## Per request (`requests.parquet`)"), (TRANSFERS, "## KV transfers (`transfers.parquet`, disaggregated cells)")],
)
def test_docs_list_exactly_the_schema_columns(schema, heading):
    documented = _documented(heading)
    assert set(schema.names) - documented == set(), "columns docs/metrics.md does not define"
    assert documented - set(schema.names) == set(), "documented columns the schema does not have"
    assert len(set(schema.names)) == len(schema.names) and all(c.meaning for c in schema.columns)


def _raw(i=0, **server):
    return {
        "request_id": f"r{i}",
        "warmup": False,
        "input_tokens": 3,
        "max_tokens": 2,
        "t_scheduled": 0.0,
        "t_sent": 0.01,
        "t_chunks": [0.1, 0.2],
        "chunk_tokens": [1, 1],
        "output_token_ids": [5, 6],
        "server_token_s": [0.05, 0.15],
        "ok": True,
        "error": None,
        "client_send_s": None,
        "server": {"server_queue_s": 0.001, "prefill_s": 0.04, "transfer_s": None, "first_decode_s": 0.0, **server},
    }


def _requests(**server):
    return to_frame([_raw(0, **server), _raw(1, **server)], run_id="run", cell_id="c", serving_mode="aggregated", engine="vllm")


def test_rows_are_written_with_every_column_of_its_type(tmp_path):
    write_rows(tmp_path / "requests.parquet", _requests(vllm_generation_tokens=2.0), REQUESTS)
    table = pq.read_table(tmp_path / "requests.parquet")
    assert table.schema.equals(REQUESTS.arrow()) and table.schema.metadata[b"pdbench.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.column("vllm_generation_tokens").to_pylist() == [2, 2]  # a whole float is a count again
    assert table.column("engine_node_id").null_count == 2  # a column the rows did not have is written as nulls
    back = read_rows(tmp_path / "requests.parquet", read_requests)
    assert list(back.columns) == list(REQUESTS.names) and list(back["ttft_s"]) == pytest.approx([0.09, 0.09])


def test_an_engine_stat_not_listed_yet_is_kept_after_the_schema_columns(tmp_path):
    """A newer vLLM's extra stat must not cost a cell whose requests already ran; it is kept as reported."""
    rows = _requests().assign(vllm_new_stat=[3, 4], decode_vllm_other=["a", 1])
    write_rows(tmp_path / "requests.parquet", rows, REQUESTS)
    back = read_rows(tmp_path / "requests.parquet", read_requests)
    assert list(back.columns) == [*REQUESTS.names, "vllm_new_stat", "decode_vllm_other"]
    assert list(back["vllm_new_stat"]) == [3, 4] and list(back["decode_vllm_other"]) == ["a", "1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.assign(surprise=1), r"requests\.parquet: column 'surprise' is not in its schema; add it to analysis/schemas\.py"),
        (lambda df: df.assign(ttft_s=["fast", "slow"]), r"column 'ttft_s' holds text where its schema says double"),
        (lambda df: df.assign(output_tokens=[1.5, 2.0]), r"column 'output_tokens' has values that do not fit int64"),
        (lambda df: df.assign(ok=[1, 0]), r"column 'ok' holds number where its schema says bool"),
        (lambda df: df.assign(engine=["vllm", 3]), r"column 'engine' mixes kinds of values"),
        (lambda df: df.assign(ok=[True, None]), r"column 'ok' has 1 null value\(s\); its schema says it is never null"),
        (lambda df: df.drop(columns="request_id"), r"column 'request_id' is missing; every row needs it"),
        (lambda df: df.assign(itl_s=[["a"], []]), r"column 'itl_s' holds list of text"),
    ],
)
def test_a_row_that_does_not_fit_is_refused_naming_the_column(tmp_path, change, message):
    with pytest.raises(SchemaError, match=message):
        write_rows(tmp_path / "requests.parquet", change(_requests()), REQUESTS)
    assert not (tmp_path / "requests.parquet").exists()


def test_rows_typed_where_they_were_made_are_written_as_a_frame_would_be(tmp_path):
    """The load generator types its records (to_table); the driver's write checks them and gives the same file."""
    from analysis.records import to_table

    raws = [_raw(0, vllm_generation_tokens=2.0), _raw(1, vllm_generation_tokens=2.0)]
    identity = {"run_id": "run", "cell_id": "c", "serving_mode": "aggregated", "engine": "vllm"}
    typed = to_table(raws, **identity)
    assert typed.schema.equals(REQUESTS.arrow())
    a = write_rows(tmp_path / "a.parquet", to_frame(raws, **identity), REQUESTS)
    b = write_rows(tmp_path / "b.parquet", typed, REQUESTS)
    assert a.equals(b) and pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    with pytest.raises(SchemaError, match=r"column 'ttft_s' holds text where its schema says double"):
        write_rows(
            tmp_path / "c.parquet", typed.set_column(typed.schema.get_field_index("ttft_s"), "ttft_s", pa.array(["x", "y"])), REQUESTS
        )
    with pytest.raises(SchemaError, match=r"column 'surprise' is not in its schema"):
        write_rows(tmp_path / "c.parquet", typed.append_column("surprise", pa.array([1, 2])), REQUESTS)
    with pytest.raises(SchemaError, match=r"column 'request_id' is missing; every row needs it"):
        to_table([{k: v for k, v in r.items() if k != "request_id"} for r in raws], **identity)


def _failed(i):
    nothing: dict = {"t_chunks": [], "chunk_tokens": [], "output_token_ids": [], "server_token_s": []}
    return {**_raw(i), "ok": False, "error": "engine died", **nothing}


@pytest.mark.parametrize(
    "raws",
    [
        [_raw(0), _failed(1)],  # a failed request beside an ok one: no chunks, an error text
        [_raw(0, prefill_s="n/a", vllm_new_stat=3), _raw(1, vllm_new_stat=4)],  # a server's text where a number goes; an unlisted stat
        [_raw(0, decode_vllm_other="a"), _raw(1, decode_vllm_other=1), _raw(2)],  # an unlisted stat of mixed kinds, missing in one row
        [{**_raw(0), "server": None, "server_token_s": None}, _failed(1)],  # an external server: no engine numbers at all
        [],
    ],
    ids=["failed", "server-text", "mixed-extra", "external", "empty"],
)
def test_records_typed_without_a_frame_equal_the_frames_rows(raws):
    """to_table types the rows straight from the records (the load generator's CPU per cell): the
    same table, column for column, as the schema makes of to_frame's frame."""
    from analysis.records import to_table

    identity = {"run_id": "run", "cell_id": "c", "serving_mode": "aggregated", "engine": "vllm"}
    direct, framed = to_table(raws, **identity), REQUESTS.table(to_frame(raws, **identity))
    assert direct.schema.equals(framed.schema) and direct.equals(framed), [
        n for n in direct.column_names if not direct.column(n).equals(framed.column(n))
    ]


def test_a_transfer_record_of_the_wrong_type_is_refused(tmp_path):
    row = {
        "run_id": "r",
        "cell_id": "c",
        "request_id": "x",
        "key": "k",
        "groups": 1,
        "bytes": "4096",
        "ok": True,
        "status": "ok",
        "warmup": False,
    }
    with pytest.raises(SchemaError, match=r"transfers\.parquet: column 'bytes' holds text where its schema says int64"):
        write_rows(tmp_path / "transfers.parquet", pd.DataFrame([row]), TRANSFERS)
    write_rows(tmp_path / "transfers.parquet", pd.DataFrame([{**row, "bytes": 4096}]), TRANSFERS)
    assert read_rows(tmp_path / "transfers.parquet", read_transfers)["bytes"].tolist() == [4096]


def test_old_transfers_get_status_from_ok_and_new_columns_as_nulls_and_newer_columns_kept():
    old = pd.DataFrame({"request_id": ["a", "b"], "ok": [True, False], "bytes": [10, 0], "from_the_future": [1, 2]})
    df = read_transfers(old)
    assert list(df["status"]) == ["ok", "failed"] and df["direct_groups"].isna().all()
    assert list(df.columns) == [*TRANSFERS.names, "from_the_future"]


def test_a_packet_whose_column_has_the_wrong_type_is_refused_naming_the_file(tmp_path):
    write_json(tmp_path / "manifest.json", {"run_id": "r", "track": "e0", "status": "complete", "evidence": "real"})
    pq.write_table(pa.table({"request_id": ["a"], "ttft_s": ["soon"]}), tmp_path / "requests.parquet")
    with pytest.raises(PacketError, match=r"requests\.parquet: column 'ttft_s' holds text where its schema says double; was it"):
        load_packet(tmp_path)


def test_an_empty_cell_writes_the_columns_and_no_rows(tmp_path):
    write_rows(tmp_path / "requests.parquet", pd.DataFrame(), REQUESTS)
    assert pq.read_table(tmp_path / "requests.parquet").schema.names == list(REQUESTS.names)


def test_every_writer_of_row_files_goes_through_a_schema():
    """requests.parquet and transfers.parquet are never written by a bare to_parquet or write_parquet."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("cluster/**/*.py"), *root.glob("actors/**/*.py"), *root.glob("analysis/**/*.py")]:
        for line in path.read_text().splitlines():
            if re.search(r"(requests|transfers)\.parquet", line) and re.search(r"write_parquet\(|to_parquet\(", line):
                pytest.fail(f"{path.relative_to(root)} writes a row file without its schema: {line.strip()}")
