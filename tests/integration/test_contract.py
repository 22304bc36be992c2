"""The backend contract suite: every backend passes the same behaviour tests.

Later backends (Postgres, Elasticsearch, S3) join by adding a factory to
``BACKEND_FACTORIES`` that starts or reuses their real local server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from typing import AsyncIterator, Callable

import pyarrow as pa
import pytest

from ferry.backends import MemoryBackend, ObjectStoreBackend, WriteContext, WriteMode
from ferry.backends.base import Backend
from ferry.backends.checksum import Checksum
from tests.integration.es_server import contract_backend, es_server  # noqa: F401
from tests.integration.pg_server import contract_backend as postgres_contract_backend, postgres_server  # noqa: F401
from tests.integration.s3_server import contract_backend as s3_contract_backend, s3_server  # noqa: F401


def _memory(tmp_path) -> Backend:
    return MemoryBackend()


def _local(tmp_path) -> Backend:
    return ObjectStoreBackend(url=str(tmp_path / "store"))


BACKEND_FACTORIES: dict[str, Callable] = {"memory": _memory, "local": _local, "elasticsearch": contract_backend, "postgres": postgres_contract_backend, "s3": s3_contract_backend}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def backend(request, tmp_path) -> Backend:
    return BACKEND_FACTORIES[request.param](tmp_path)


def every_type_table() -> pa.Table:
    """One column per type of the contract, with nulls and unicode."""
    utc = dt.timezone.utc
    return pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "small": pa.array([1, None, -3, 32767], pa.int16()),
            "int": pa.array([1, 2, None, -2147483648], pa.int32()),
            "big": pa.array([2**62, None, -(2**62), 0], pa.int64()),
            "real": pa.array([1.5, None, -0.25, 3.0], pa.float32()),
            "double": pa.array([1.0e300, float("inf"), None, -0.0], pa.float64()),
            "flag": pa.array([True, False, None, True], pa.bool_()),
            "text": pa.array(["plain", "Zoë Łukasz 王芳 🚀", None, ""], pa.string()),
            "blob": pa.array([b"\x00\x01", None, b"", b"\xff" * 10], pa.binary()),
            "amount": pa.array([Decimal("12.34"), Decimal("-0.01"), None, Decimal("9999999999.99")], pa.decimal128(12, 2)),
            "day": pa.array([dt.date(2024, 1, 1), None, dt.date(1970, 1, 1), dt.date(2099, 12, 31)], pa.date32()),
            "at": pa.array(
                [dt.datetime(2024, 5, 1, 12, 30, tzinfo=utc), None, dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=utc), dt.datetime(2030, 1, 1, tzinfo=utc)],
                pa.timestamp("us", tz="UTC"),
            ),
            "tags": pa.array([["a", "b"], [], None, ["ü"]], pa.list_(pa.string())),
            "nested": pa.array(
                [{"city": "Oslo", "zip": "0150"}, None, {"city": None, "zip": "1"}, {"city": "東京", "zip": ""}],
                pa.struct([("city", pa.string()), ("zip", pa.string())]),
            ),
        }
    )


async def _stream(table: pa.Table, rows: int = 2) -> AsyncIterator[pa.RecordBatch]:
    for batch in table.to_batches(max_chunksize=rows):
        yield batch


async def _write(backend: Backend, dataset: str, table: pa.Table, mode=WriteMode.APPEND, run_id="run1", key=(), partitions=("p0",)):
    ctx = WriteContext(run_id=run_id, job_name="t", mode=mode, schema=table.schema, key=tuple(key))
    await backend.begin_write(dataset, ctx)
    share = -(-table.num_rows // len(partitions)) if table.num_rows else 0
    for index, pid in enumerate(partitions):
        await backend.write(dataset, pid, _stream(table.slice(index * share, share)), ctx)
    await backend.publish(dataset, ctx)
    return ctx


async def _read_all(backend: Backend, dataset: str, hint: int = 3) -> pa.Table:
    parts = await backend.partitions(dataset, hint=hint)
    batches = []
    for part in parts:
        async for batch in backend.read(part, batch_rows=3):
            batches.append(batch)
    schema = await backend.schema(dataset)
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def _sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: repr(r.get("id")))


def test_round_trip_every_type(backend):
    async def scenario():
        table = every_type_table()
        async with backend:
            await _write(backend, "types", table, partitions=("p0", "p1"))
            back = await _read_all(backend, "types")
        assert back.num_rows == table.num_rows
        assert _sorted_rows(back) == _sorted_rows(table)
        for name in table.column_names:
            assert back.schema.field(name).type.equals(table.schema.field(name).type, check_metadata=False) or (
                pa.types.is_list(table.schema.field(name).type)
                and back.schema.field(name).type.value_type == table.schema.field(name).type.value_type
            ), name
        assert Checksum().update(back).value == Checksum().update(table).value

    asyncio.run(scenario())


def test_empty_stream(backend):
    async def scenario():
        table = every_type_table().slice(0, 0)
        async with backend:
            await _write(backend, "empty", table)
            back = await _read_all(backend, "empty")
        assert back.num_rows == 0
        assert back.schema.names == table.schema.names

    asyncio.run(scenario())


def test_append_adds_and_replace_swaps(backend):
    async def scenario():
        table = every_type_table()
        async with backend:
            await _write(backend, "modes", table, run_id="a")
            await _write(backend, "modes", table, run_id="b")
            assert (await _read_all(backend, "modes")).num_rows == 2 * table.num_rows
            await _write(backend, "modes", table.slice(0, 1), mode=WriteMode.REPLACE, run_id="c")
            back = await _read_all(backend, "modes")
        assert back.to_pylist() == table.slice(0, 1).to_pylist()

    asyncio.run(scenario())


def test_upsert_where_supported(backend):
    async def scenario():
        table = every_type_table()
        async with backend:
            if WriteMode.UPSERT not in backend.capabilities.write_modes:
                with pytest.raises(Exception, match="upsert"):
                    backend.check_write(WriteMode.UPSERT, ("id",))
                return
            await _write(backend, "up", table, run_id="a")
            changed = table.set_column(table.schema.get_field_index("text"), "text", pa.array(["x", "y", "z", "w"]))
            await _write(backend, "up", changed.slice(1, 2), mode=WriteMode.UPSERT, key=("id",), run_id="b")
            back = await _read_all(backend, "up")
        texts = {row["id"]: row["text"] for row in back.to_pylist()}
        assert back.num_rows == 4
        assert texts == {1: "plain", 2: "y", 3: "z", 4: ""}

    asyncio.run(scenario())


def test_partitions_cover_every_row_exactly_once(backend):
    async def scenario():
        ids = pa.table({"id": pa.array(range(1000), pa.int64())})
        async with backend:
            await _write(backend, "cover", ids, partitions=("p0", "p1", "p2", "p3", "p4"))
            for hint in (1, 2, 7):
                parts = await backend.partitions("cover", hint=hint)
                seen = []
                for part in parts:
                    async for batch in backend.read(part, batch_rows=64):
                        seen.extend(batch.column("id").to_pylist())
                assert sorted(seen) == list(range(1000)), hint

    asyncio.run(scenario())


def test_retry_of_a_committed_partition_never_duplicates(backend):
    async def scenario():
        table = every_type_table()
        async with backend:
            ctx = WriteContext(run_id="r", job_name="t", mode=WriteMode.APPEND, schema=table.schema)
            await backend.begin_write("retry", ctx)
            first = await backend.write("retry", "p0", _stream(table), ctx)
            again = await backend.write("retry", "p0", _stream(table), ctx)
            await backend.publish("retry", ctx)
            back = await _read_all(backend, "retry")
        assert not first.skipped and again.skipped
        assert back.num_rows == table.num_rows

    asyncio.run(scenario())


def test_interrupted_write_leaves_no_partial_partition(backend):
    async def scenario():
        table = every_type_table()

        async def failing_stream():
            yield table.to_batches(max_chunksize=2)[0]
            raise RuntimeError("source died")

        async with backend:
            await _write(backend, "keep", table, run_id="old")
            ctx = WriteContext(run_id="new", job_name="t", mode=WriteMode.APPEND, schema=table.schema)
            await backend.begin_write("keep", ctx)
            with pytest.raises(RuntimeError):
                await backend.write("keep", "p0", failing_stream(), ctx)
            await backend.abort("keep", ctx)
            back = await _read_all(backend, "keep")
            # A failed replace leaves the old data whole too.
            rctx = WriteContext(run_id="new2", job_name="t", mode=WriteMode.REPLACE, schema=table.schema)
            await backend.begin_write("keep", rctx)
            with pytest.raises(RuntimeError):
                await backend.write("keep", "p0", failing_stream(), rctx)
            await backend.abort("keep", rctx)
            after_replace = await _read_all(backend, "keep")
        assert _sorted_rows(back) == _sorted_rows(table)
        assert _sorted_rows(after_replace) == _sorted_rows(table)

    asyncio.run(scenario())


def test_where_and_columns_give_reference_results(backend):
    from ferry.backends.filters import evaluate, parse_filter

    async def scenario():
        table = every_type_table()
        where = parse_filter({"or": [{"column": "big", "op": "gt", "value": 0}, {"column": "text", "op": "neq", "value": "plain"}]})
        async with backend:
            await _write(backend, "filt", table)
            parts = await backend.partitions("filt")
            rows = []
            for part in parts:
                async for batch in backend.read(part, columns=["id"], where=where):
                    assert batch.schema.names == ["id"]
                    rows.extend(batch.column("id").to_pylist())
        expected = table.filter(evaluate(where, table)).column("id").to_pylist()
        assert sorted(rows) == sorted(expected)

    asyncio.run(scenario())
