"""JSON Lines, CSV (optionally gzip) and Hive layouts, on S3 (moto server) and local folders."""

from __future__ import annotations

import asyncio
import gzip
import math

import pyarrow as pa
import pytest

from ferry.backends import ObjectStoreBackend, WriteMode
from ferry.backends.errors import ConfigurationError, DataError, PermanentBackendError
from tests.integration.s3_server import S3Server, s3_server  # noqa: F401
from tests.integration.test_contract import _read_all, _sorted_rows, _write, every_type_table

pytestmark = pytest.mark.integration


def run(coro):
    return asyncio.run(coro)


def _store(where: str, s3_server: S3Server, tmp_path, **extra) -> tuple[ObjectStoreBackend, str | None]:
    if where == "s3":
        bucket = s3_server.new_bucket()
        return ObjectStoreBackend(**s3_server.settings(bucket, "lake", **extra)), bucket
    return ObjectStoreBackend(url=str(tmp_path / "lake"), **extra), None


def _text_table(fmt: str) -> pa.Table:
    """The contract's types minus what the format cannot hold (see docs/object-stores.md)."""
    table = every_type_table()
    if fmt == "csv":
        table = table.drop_columns(["tags", "nested"])
    if fmt == "jsonl":
        double = table.column("double").to_pylist()
        table = table.set_column(
            table.schema.get_field_index("double"),
            pa.field("double", pa.float64()),
            pa.array([v if v is None or math.isfinite(v) else 2.5 for v in double], pa.float64()),
        )
    return table


def _declared(table: pa.Table) -> dict[str, str]:
    from ferry.backends.types import format_arrow_type

    return {f.name: format_arrow_type(f.type) for f in table.schema}


@pytest.mark.parametrize("where", ["s3", "local"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_text_round_trip_with_a_declared_schema_is_exact(s3_server, tmp_path, where, fmt, compression):
    table = _text_table(fmt)
    store, _ = _store(where, s3_server, tmp_path, format=fmt, compression=compression, read_schema=_declared(table))

    async def scenario():
        async with store:
            await _write(store, "t", table, partitions=("p0", "p1"))
            files = store.data_files("t")
            return files, await _read_all(store, "t"), await store.schema("t")

    files, back, schema = run(scenario())
    suffix = f".{fmt}" + (".gz" if compression == "gzip" else "")
    assert len(files) == 2 and all(f.endswith(suffix) for f in files)
    assert schema.equals(table.schema)
    assert _sorted_rows(back) == _sorted_rows(table)


def test_inferred_schema_is_fixed_for_the_run(s3_server, tmp_path):
    store, bucket = _store("s3", s3_server, tmp_path, format="csv", infer_sample_files=1, partition_min_bytes=0)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="lake/csv/a.csv", Body=b"id,name,day\n1,x,2024-01-01\n2,,2024-01-02\n")
    client.put_object(Bucket=bucket, Key="lake/csv/b.csv.gz", Body=gzip.compress(b"id,name,day\n3,z,2024-02-01\n"))

    async def scenario():
        async with store:
            schema = await store.schema("csv")
            parts = await store.partitions("csv")
            return schema, parts, await _read_all(store, "csv")

    schema, parts, back = run(scenario())
    assert schema == pa.schema([("id", pa.int64()), ("name", pa.string()), ("day", pa.date32())])
    assert len(parts) == 2  # one partition per file; the gzip file is one
    assert sorted(back.column("id").to_pylist()) == [1, 2, 3]
    assert back.schema == schema


def test_a_value_that_does_not_fit_the_fixed_schema_names_the_file(s3_server, tmp_path):
    store, bucket = _store("s3", s3_server, tmp_path, format="jsonl", infer_sample_files=1)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="lake/j/a.jsonl", Body=b'{"id": 1}\n{"id": 2}\n')
    client.put_object(Bucket=bucket, Key="lake/j/b.jsonl", Body=b'{"id": "oops"}\n')

    async def scenario():
        async with store:
            await _read_all(store, "j")

    with pytest.raises((PermanentBackendError, DataError), match=r"lake/j/b.jsonl"):
        run(scenario())


def test_json_lines_refuse_infinity_and_csv_refuses_lists(tmp_path, s3_server):
    jsonl, _ = _store("local", s3_server, tmp_path / "j", format="jsonl")
    csv, _ = _store("local", s3_server, tmp_path / "c", format="csv")

    async def scenario(store, table):
        async with store:
            await _write(store, "t", table)

    with pytest.raises(DataError, match="Infinity or NaN.*column 'x'"):
        run(scenario(jsonl, pa.table({"x": [1.0, float("inf")]})))
    with pytest.raises(ConfigurationError, match="CSV cannot hold list"):
        run(scenario(csv, pa.table({"x": [[1], [2]]})))


@pytest.mark.parametrize("where", ["s3", "local"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_hive_partitioned_write_and_read(s3_server, tmp_path, where, fmt):
    table = pa.table(
        {
            "id": pa.array(range(12), pa.int64()),
            "year": pa.array([2023, 2024, 2024] * 4, pa.int16()),
            "region": ["eu", "us", None, "eu/west"] * 3,
        }
    )
    store, bucket = _store(where, s3_server, tmp_path, format=fmt, partition_by=["year", "region"])

    async def scenario():
        async with store:
            await _write(store, "h", table, mode=WriteMode.REPLACE, run_id="r1", partitions=("p0", "p1"))
            files = store.data_files("h")
            return files, await _read_all(store, "h"), await store.schema("h")

    files, back, schema = run(scenario())
    relative = sorted({"/".join(f.split("/")[-3:-1]) for f in files})
    assert "year=2024/region=__HIVE_DEFAULT_PARTITION__" in relative
    assert "year=2023/region=eu%2Fwest" in relative or "year=2024/region=eu%2Fwest" in relative
    assert schema.field("year").type == pa.int16()
    assert _sorted_rows(back.select(["id", "year", "region"])) == _sorted_rows(table)


def test_foreign_hive_layout_is_read_with_inferred_partition_columns(s3_server, tmp_path):
    import pyarrow.parquet as pq

    store, bucket = _store("s3", s3_server, tmp_path)
    client = s3_server.client()
    for year, month in ((2024, 1), (2024, 2), (2025, 1)):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"v": [year * 100 + month]}), sink)
        client.put_object(Bucket=bucket, Key=f"lake/ext/year={year}/month={month}/part-0.parquet", Body=sink.getvalue().to_pybytes())

    async def scenario():
        async with store:
            return await _read_all(store, "ext")

    back = run(scenario())
    assert back.schema.names == ["v", "year", "month"]
    assert sorted(back.to_pylist(), key=lambda r: r["v"]) == [
        {"v": 202401, "year": 2024, "month": 1},
        {"v": 202402, "year": 2024, "month": 2},
        {"v": 202501, "year": 2025, "month": 1},
    ]


def test_max_concurrency_bounds_the_files_open_in_a_partitioned_write(tmp_path, s3_server):
    # Rows alternate between two folders; with one file open at a time every
    # switch finishes the open file, so each folder gets several files.
    table = pa.table({"id": pa.array(range(8), pa.int64()), "k": ["a", "b"] * 4})
    narrow, _ = _store("local", s3_server, tmp_path / "narrow", partition_by=["k"], transfer={"max_concurrency": 1})
    wide, _ = _store("local", s3_server, tmp_path / "wide", partition_by=["k"])

    async def scenario(store):
        async with store:
            ctx = __import__("ferry.backends", fromlist=["WriteContext"]).WriteContext(
                run_id="r", job_name="t", mode=WriteMode.APPEND, schema=table.schema
            )
            await store.begin_write("d", ctx)

            async def one_row_batches():
                for batch in table.to_batches(max_chunksize=1):
                    yield batch

            await store.write("d", "p0", one_row_batches(), ctx)
            await store.publish("d", ctx)
            return store.data_files("d"), await _read_all(store, "d")

    narrow_files, narrow_back = run(scenario(narrow))
    wide_files, wide_back = run(scenario(wide))
    assert len(wide_files) == 2 and len(narrow_files) == 8
    assert sorted(narrow_back.column("id").to_pylist()) == sorted(wide_back.column("id").to_pylist()) == list(range(8))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_read_applies_columns_and_where_exactly(s3_server, tmp_path, fmt):
    from ferry.backends.filters import evaluate, parse_filter

    table = _text_table(fmt)
    store, _ = _store("s3", s3_server, tmp_path, format=fmt, read_schema=_declared(table))
    where = parse_filter({"or": [{"column": "big", "op": "gt", "value": 0}, {"column": "text", "op": "neq", "value": "plain"}]})

    async def scenario():
        async with store:
            await _write(store, "f", table)
            ids = []
            for part in await store.partitions("f"):
                async for batch in store.read(part, columns=["id"], where=where):
                    assert batch.schema.names == ["id"]
                    ids.extend(batch.column("id").to_pylist())
            return ids

    expected = table.filter(evaluate(where, table)).column("id").to_pylist()
    assert sorted(run(scenario())) == sorted(expected)
