"""The PostgreSQL backend against a real PostgreSQL 15: settings, types, reads, writes, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from typing import AsyncIterator

import asyncpg
import pyarrow as pa
import pytest
from pydantic import ValidationError

from ferry.backends import WriteContext, WriteMode
from ferry.backends.errors import ConfigurationError, DataError, TransientBackendError
from ferry.backends.filters import evaluate, parse_filter
from ferry.backends.pools import get_pool_info
from ferry.backends.postgres import PostgresBackend
from ferry.flows.spec import job_from_dict
from tests.integration.pg_server import postgres_server  # noqa: F401


def _backend(server, **extra) -> PostgresBackend:
    return PostgresBackend(**server.settings(sslmode="disable", **extra))


async def _sql(server, *statements: str):
    conn = await asyncpg.connect(server.dsn)
    try:
        result = None
        for statement in statements:
            result = await conn.fetch(statement)
        return result
    finally:
        await conn.close()


def sql(server, *statements: str):
    return asyncio.run(_sql(server, *statements))


async def _stream(table: pa.Table, rows: int = 3) -> AsyncIterator[pa.RecordBatch]:
    for batch in table.to_batches(max_chunksize=rows):
        yield batch


async def _read_all(backend: PostgresBackend, dataset: str, **kwargs) -> pa.Table:
    parts = await backend.partitions(dataset, hint=kwargs.pop("hint", 3))
    batches = []
    for part in parts:
        async for batch in backend.read(part, **kwargs):
            batches.append(batch)
    return pa.Table.from_batches(batches) if batches else None


# -- settings ------------------------------------------------------------------------------------


def test_pool_settings_take_the_guides_names_and_aliases():
    block = PostgresBackend(min_size=2, max_size=7, timeout=5, max_queries=10, max_inactive_connection_lifetime=0)
    assert (block.min_connections, block.max_connections, block.connection_timeout) == (2, 7, 5)
    assert PostgresBackend(schema="sales").schema_name == "sales"
    job = job_from_dict(
        {
            "source": {"backend": "memory", "dataset": "x", "generate": {"rows": 1}},
            "target": {"backend": "postgres", "dataset": "t", "min_size": 1, "max_size": 3, "timeout": 9, "schema": "s"},
        }
    )
    assert job.target.settings["max_size"] == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"min_connections": 5, "max_connections": 2}, "min_connections (5) is above max_connections (2)"),
        ({"min_size": -1}, "min_connections (min_size) cannot be negative"),
        ({"max_connections": 0}, "max_connections (max_size) must be at least 1"),
        ({"max_queries": 0}, "max_queries must be at least 1"),
        ({"max_inactive_connection_lifetime": -1}, "max_inactive_connection_lifetime cannot be negative"),
    ],
)
def test_impossible_pool_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PostgresBackend(**settings)
    with pytest.raises(ConfigurationError, match="target"):
        job_from_dict(
            {
                "source": {"backend": "memory", "dataset": "x", "generate": {"rows": 1}},
                "target": {"backend": "postgres", "dataset": "t", **settings},
            }
        )


def test_password_and_dsn_stay_secret():
    block = PostgresBackend(password="hunter2", dsn="postgresql://u:s3cret@db:5432/app")
    for text in (repr(block), str(block), block.describe(), block.location("t"), str(block.model_dump())):
        assert "hunter2" not in text and "s3cret" not in text
    assert "s3cret" in block.connection_uri()  # only where the client is built
    plain = PostgresBackend(password="p@ss/word", sslmode="verify-full", sslrootcert="/ca.pem")
    uri = plain.connection_uri()
    assert "p%40ss%2Fword" in uri and "sslmode=verify-full" in uri and "sslrootcert=%2Fca.pem" in uri


def test_unreachable_server_fails_fast_with_what_to_check():
    async def scenario():
        async with PostgresBackend(host="127.0.0.1", port=1, sslmode="disable", connection_timeout=2):
            pass

    with pytest.raises(TransientBackendError, match="check host, port and sslmode"):
        asyncio.run(scenario())


def test_pool_info_reports_both_pools(postgres_server):
    async def scenario():
        block = _backend(postgres_server, min_connections=2, max_connections=4)
        async with block, block.fresh() as second:
            info = get_pool_info()
            rows = [r for r in info.values() if r["config_hash"] == block.config_hash()]
            kinds = sorted(r["kind"] for r in rows)
            assert kinds == ["postgres", "postgres-adbc"]
            pool = next(r for r in rows if r["kind"] == "postgres")
            assert pool["users"] == 2 and pool["size"] == 2 and pool["idle"] == 2 and pool["in_use"] == 0
            assert pool["limits"]["min_size"] == 2 and pool["limits"]["max_size"] == 4
            assert pool["loop_id"] == id(asyncio.get_running_loop()) and pool["age_seconds"] >= 0
            assert second._live["pool"] is block._live["pool"]
        assert not [r for r in get_pool_info().values() if r["config_hash"] == block.config_hash()]

    asyncio.run(scenario())


def test_session_settings_reach_both_pools_and_a_role_without_the_right_is_told_what_to_grant(postgres_server):
    profiling = {"log_min_duration_statement": "250ms", "log_statement": "ddl"}

    async def applied(block: PostgresBackend) -> tuple[list[str], list[str]]:
        async with block:
            async with block._pool().acquire() as conn:
                on_asyncpg = [await conn.fetchval(f"SHOW {name}") for name in profiling]
            adbc = block._adbc()
            conn = adbc.acquire()
            try:
                with conn.cursor() as cur:
                    on_adbc = []
                    for name in profiling:
                        cur.execute(f"SELECT current_setting('{name}')")
                        on_adbc.append(cur.fetchone()[0])
            finally:
                adbc.release(conn)
            return on_asyncpg, on_adbc

    assert asyncio.run(applied(_backend(postgres_server, session_settings=profiling))) == (
        ["250ms", "ddl"], ["250ms", "ddl"]
    )

    sql(
        postgres_server,
        "DROP ROLE IF EXISTS profiler",
        "CREATE ROLE profiler LOGIN",
        "REVOKE SET ON PARAMETER log_min_duration_statement, log_statement FROM profiler",
    )
    unprivileged = _backend(postgres_server, user="profiler", session_settings=profiling)
    with pytest.raises(ConfigurationError, match="GRANT SET ON PARAMETER <name> TO profiler") as caught:
        asyncio.run(applied(unprivileged))
    assert caught.value.path == "session_settings" and "log_" in str(caught.value)
    sql(postgres_server, "GRANT SET ON PARAMETER log_min_duration_statement, log_statement TO profiler")
    assert asyncio.run(applied(unprivileged))[0] == ["250ms", "ddl"]

    with pytest.raises(ValidationError, match="set by Ferry"):
        _backend(postgres_server, session_settings={"TimeZone": "CET"})
    with pytest.raises(ValidationError, match="not a PostgreSQL setting name"):
        _backend(postgres_server, session_settings={"log_statement; DROP": "all"})


def test_replace_with_a_pool_of_one_is_refused_naming_the_setting(postgres_server):
    table = pa.table({"id": pa.array([1, 2], pa.int64())})

    async def scenario():
        async with _backend(postgres_server, min_connections=1, max_connections=1) as block:
            ctx = WriteContext(run_id="one", job_name="t", mode=WriteMode.REPLACE, schema=table.schema)
            with pytest.raises(ConfigurationError, match="needs max_connections of at least 2") as caught:
                await block.begin_write("pool_of_one", ctx)
            assert caught.value.path == "target.max_connections"

    asyncio.run(scenario())


# -- types -------------------------------------------------------------------------------------------

TYPES_DDL = """
DROP TABLE IF EXISTS public.every_type, public.every_type_copy, public.every_type_new, public.every_type_pq CASCADE;
DROP TYPE IF EXISTS mood CASCADE;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE public.every_type (
  id bigint PRIMARY KEY, s smallint, i integer, b bigint, n numeric(12,2), nbig numeric(30,10), nu numeric,
  r real, d double precision, flag boolean, t text, v varchar(10), c char(4), by bytea, u uuid,
  day date, tm time, ts timestamp, tz timestamptz, iv interval, j json, jb jsonb,
  arr text[], iarr integer[], m mood
);
INSERT INTO public.every_type VALUES
 (1, -32768, 2147483647, -9223372036854775808, 12.34, 12345678901234567890.0123456789, 'NaN', 1.5, -1e300, true,
  'Zoë 王芳 🚀', 'short', 'ab', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1999-12-31', '23:59:59.999999',
  '2024-02-29 12:00:00.000001', '2024-01-01 10:00:00+02', '1 year 2 mons 3 days 04:05:06.789', '{"a": [1, 2]}',
  '{"b": {"c": null}}', '{x,"y z",NULL}', '{1,NULL,3}', 'happy'),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL),
 (3, 0, 0, 0, -0.01, 0, '-1.5e-20', 'Infinity', 'NaN', false, '', '', '', '', '00000000-0000-0000-0000-000000000000',
  '0001-01-01', '00:00', '1970-01-01', '1970-01-01 00:00:00+00', '-1 days -00:00:00.000001', '[]', '"text"',
  '{}', '{}', 'sad');
"""

COLUMNS = ["s", "i", "b", "n", "nbig", "nu", "r", "d", "flag", "t", "v", "c", "by", "u", "day", "tm", "ts", "tz", "iv", "j", "jb", "arr", "iarr", "m"]


def _as_text(server, table: str):
    select = ", ".join(f"{c}::text" for c in COLUMNS)
    return [tuple(r) for r in sql(server, f"SELECT id, {select} FROM {table} ORDER BY id")]


def test_every_mapped_type_round_trips_postgres_arrow_postgres(postgres_server):
    sql(postgres_server, *[s for s in TYPES_DDL.split(";") if s.strip()])

    async def scenario():
        async with _backend(postgres_server) as source:
            schema = await source.schema("every_type")
            expected = {
                "s": pa.int16(), "i": pa.int32(), "b": pa.int64(), "n": pa.decimal128(12, 2), "nbig": pa.decimal128(30, 10),
                "nu": pa.string(), "r": pa.float32(), "d": pa.float64(), "flag": pa.bool_(), "t": pa.string(),
                "v": pa.string(), "c": pa.string(), "by": pa.binary(), "u": pa.string(), "day": pa.date32(),
                "tm": pa.time64("us"), "ts": pa.timestamp("us"), "tz": pa.timestamp("us", tz="UTC"),
                "iv": pa.month_day_nano_interval(), "j": pa.string(), "jb": pa.string(),
                "arr": pa.list_(pa.string()), "iarr": pa.list_(pa.int32()), "m": pa.string(),
            }  # fmt: skip
            assert {f.name: f.type for f in schema if f.name != "id"} == expected
            table = await _read_all(source, "every_type")
            row = {r["id"]: r for r in table.to_pylist()}
            assert row[1]["tz"] == dt.datetime(2024, 1, 1, 8, 0, tzinfo=dt.timezone.utc)
            assert row[1]["n"] == Decimal("12.34") and row[1]["nu"] == "NaN" and row[1]["m"] == "happy"
            assert row[1]["arr"] == ["x", "y z", None] and row[2]["arr"] is None
            assert row[1]["iv"] == pa.MonthDayNano([14, 3, 14706789000000])
            # Into a copy with the same column types (the job declares them by creating the table).
            await _sql(postgres_server, "DROP TABLE IF EXISTS public.every_type_copy",
                       "CREATE TABLE public.every_type_copy (LIKE public.every_type INCLUDING ALL)")  # fmt: skip
            ctx = WriteContext(run_id="r1", job_name="types", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
            await source.begin_write("every_type_copy", ctx)
            await source.write("every_type_copy", "p0", _stream(table), ctx)
            await source.publish("every_type_copy", ctx)
            # Into a table Ferry creates from the Arrow schema.
            ctx = WriteContext(run_id="r2", job_name="types", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
            await source.begin_write("every_type_new", ctx)
            await source.write("every_type_new", "p0", _stream(table), ctx)
            await source.publish("every_type_new", ctx)
            again = await _read_all(source, "every_type_new")
            # repr: NaN equals itself there.
            assert repr(sorted(again.to_pylist(), key=lambda r: r["id"])) == repr(sorted(table.to_pylist(), key=lambda r: r["id"]))

    asyncio.run(scenario())
    original = _as_text(postgres_server, "public.every_type")
    assert _as_text(postgres_server, "public.every_type_copy") == original
    created = _as_text(postgres_server, "public.every_type_new")
    char_column = 1 + COLUMNS.index("c")
    for before, after in zip(original, created, strict=True):
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            if index == char_column and a is not None:
                assert b.rstrip() == a  # char(n) is read with its padding and kept in text
            else:
                assert a == b, (COLUMNS[index - 1], a, b)


def test_types_round_trip_through_parquet(postgres_server, tmp_path):
    from ferry.backends import ObjectStoreBackend

    sql(postgres_server, *[s for s in TYPES_DDL.split(";") if s.strip()])
    parquet_columns = [c for c in COLUMNS if c != "iv"]  # Parquet cannot hold Arrow intervals

    async def scenario():
        async with _backend(postgres_server) as pg, ObjectStoreBackend(url=str(tmp_path)) as files:
            table = await _read_all(pg, "every_type", columns=["id", *parquet_columns])
            ctx = WriteContext(run_id="p", job_name="t", mode=WriteMode.REPLACE, schema=table.schema)
            await files.begin_write("types", ctx)
            await files.write("types", "p0", _stream(table), ctx)
            await files.publish("types", ctx)
            parts = await files.partitions("types")
            batches = [b for p in parts async for b in files.read(p)]
            back = pa.Table.from_batches(batches)
            await _sql(postgres_server, "DROP TABLE IF EXISTS public.every_type_pq",
                       "CREATE TABLE public.every_type_pq (LIKE public.every_type INCLUDING ALL)")  # fmt: skip
            ctx = WriteContext(run_id="q", job_name="t", mode=WriteMode.APPEND, schema=back.schema, key=("id",))
            await pg.begin_write("every_type_pq", ctx)
            await pg.write("every_type_pq", "p0", _stream(back), ctx)

    asyncio.run(scenario())
    select = ", ".join(f"{c}::text" for c in parquet_columns)
    before = sql(postgres_server, f"SELECT id, {select} FROM public.every_type ORDER BY id")
    after = sql(postgres_server, f"SELECT id, {select} FROM public.every_type_pq ORDER BY id")
    assert [tuple(r) for r in after] == [tuple(r) for r in before]


# -- reads -------------------------------------------------------------------------------------------


def _make_table(server, name: str, rows: int, *, key: bool = True) -> None:
    pk = "PRIMARY KEY" if key else ""
    sql(
        server,
        f"DROP TABLE IF EXISTS public.{name}",
        f"CREATE TABLE public.{name} (id bigint {pk}, label text, amount numeric(10,2), at timestamptz)",
        f"INSERT INTO public.{name} SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'item ' || g END, "
        f"(g % 100) - 50.25, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute' FROM generate_series(1, {rows}) g",
    )


@pytest.mark.parametrize("key", [True, False], ids=["key-ranges", "ctid-ranges"])
def test_parallel_partitions_read_one_snapshot_while_the_table_changes(postgres_server, key):
    name = f"live_{'key' if key else 'ctid'}"
    _make_table(postgres_server, name, 20_000, key=key)

    async def scenario():
        async with _backend(postgres_server, partition_rows=5_000) as source:
            parts = await source.partitions(name, hint=4)
            assert len(parts) >= 4
            assert len({p.spec["snapshot"] for p in parts}) == 1 and parts[0].spec["snapshot"]
            assert parts[0].spec["kind"] == ("int" if key else "ctid")
            # The source changes after planning and while partitions are read.
            await _sql(
                postgres_server,
                f"DELETE FROM public.{name} WHERE id % 2 = 0",
                f"UPDATE public.{name} SET id = id + 1000000 WHERE id % 3 = 0",
                f"INSERT INTO public.{name} SELECT g, 'new', 0, now() FROM generate_series(30001, 35000) g",
            )

            async def read(part):
                return [v for b in [b async for b in source.read(part, batch_rows=1000)] for v in b.column("id").to_pylist()]

            results = await asyncio.gather(*(read(p) for p in parts))
        ids = sorted(i for r in results for i in r)
        assert ids == list(range(1, 20_001))

    asyncio.run(scenario())


def test_where_and_columns_pushdown_match_the_reference_evaluator(postgres_server):
    _make_table(postgres_server, "filtered", 500)
    filters = [
        {"column": "label", "op": "gt", "value": "item 3"},
        {"not": {"column": "label", "op": "lt", "value": "item 2"}},
        {"column": "label", "op": "neq", "value": "item 5"},
        {"not": {"column": "label", "op": "in", "value": ["item 1", "item 2"]}},
        {"column": "label", "op": "not_in", "value": ["item 1"]},
        {"column": "label", "op": "like", "value": "item 1_"},
        {"column": "label", "op": "regex", "value": "item [0-9]"},
        {"column": "label", "op": "exists", "value": False},
        {"or": [{"column": "amount", "op": "between", "value": ["-10", "10.5"]}, {"column": "id", "op": "in", "value": [1, 2, 3]}]},
        {"and": [{"column": "at", "op": "gte", "value": "2024-01-01T03:00:00Z"}, {"column": "amount", "op": "lt", "value": 0}]},
        {"not": {"and": [{"column": "id", "op": "gt", "value": 100}, {"column": "label", "op": "exists"}]}},
    ]

    async def scenario():
        async with _backend(postgres_server) as source:
            everything = await _read_all(source, "filtered")
            for data in filters:
                where = parse_filter(data)
                got = await _read_all(source, "filtered", columns=["id"], where=where)
                expected = everything.filter(evaluate(where, everything)).column("id").to_pylist()
                ids = sorted(got.column("id").to_pylist()) if got is not None else []
                assert ids == sorted(expected), data
                if got is not None:
                    assert got.schema.names == ["id"]

    asyncio.run(scenario())


def test_custom_query_source(postgres_server):
    _make_table(postgres_server, "queried", 100)

    async def scenario():
        block = _backend(postgres_server, query="SELECT id, amount * 2 AS doubled, label FROM public.queried WHERE id <= 10")
        async with block:
            schema = await block.schema("q")
            assert schema.names == ["id", "doubled", "label"]
            table = await _read_all(block, "q", where=parse_filter({"column": "id", "op": "lte", "value": 5}))
        assert sorted(table.column("id").to_pylist()) == [1, 2, 3, 4, 5]

    asyncio.run(scenario())


# -- writes ------------------------------------------------------------------------------------------


def _orders(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "label": pa.array([f"row {i}" for i in range(start, start + n)]),
            "amount": pa.array([Decimal(i) / 100 for i in range(start, start + n)], pa.decimal128(10, 2)),
        }
    )


def test_long_and_case_clashing_names_are_refused(postgres_server):
    async def scenario():
        async with _backend(postgres_server) as target:
            long = pa.schema([pa.field("x" * 64, pa.int64())])
            ctx = WriteContext(run_id="r", job_name="t", mode=WriteMode.APPEND, schema=long)
            with pytest.raises(ConfigurationError, match="64 bytes long"):
                await target.begin_write("names", ctx)
            clash = pa.schema([pa.field("Amount", pa.int64()), pa.field("amount", pa.int64())])
            ctx = WriteContext(run_id="r", job_name="t", mode=WriteMode.APPEND, schema=clash)
            with pytest.raises(ConfigurationError, match="differ only in case"):
                await target.begin_write("names", ctx)

    asyncio.run(scenario())


def test_a_value_the_column_cannot_take_names_table_column_key_and_value(postgres_server):
    sql(
        postgres_server,
        "DROP TABLE IF EXISTS public.strict_target",
        "CREATE TABLE public.strict_target (id bigint PRIMARY KEY, label varchar(6), amount numeric(10,2) CHECK (amount >= 0))",
    )

    async def scenario():
        async with _backend(postgres_server) as target:
            table = _orders(10)
            ctx = WriteContext(run_id="r", job_name="t", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
            await target.begin_write("strict_target", ctx)
            too_long = table.set_column(1, "label", pa.array(["ok"] * 7 + ["much too long"] + ["ok"] * 2))
            with pytest.raises(DataError) as info:
                await target.write("strict_target", "p0", _stream(too_long), ctx)
            text = str(info.value)
            assert "strict_target" in text and "'label'" in text and "much too long" in text and "[7]" in text
            negative = table.set_column(2, "amount", pa.array([Decimal(1)] * 4 + [Decimal(-5)] + [Decimal(1)] * 5, pa.decimal128(10, 2)))
            with pytest.raises(DataError, match=r"check constraint.*row key \[4\]"):
                await target.write("strict_target", "p1", _stream(negative), ctx)
            # Nothing of the failed partitions was committed; a good partition still loads.
            await target.write("strict_target", "p2", _stream(table), ctx)
        assert (await _sql(postgres_server, "SELECT count(*) FROM public.strict_target"))[0][0] == 10

    asyncio.run(scenario())


def test_retry_after_a_committed_partition_is_skipped_by_the_ledger(postgres_server):
    async def scenario():
        table = _orders(50)
        ctx = WriteContext(run_id="run-7", job_name="ledger", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
        async with _backend(postgres_server) as target:
            await target.begin_write("ledgered", ctx)
            first = await target.write("ledgered", "p0", _stream(table), ctx)
        # A new process retries the partition after losing the commit acknowledgement.
        async with _backend(postgres_server) as again:
            second = await again.write("ledgered", "p0", _stream(table), ctx)
            await again.publish("ledgered", ctx)
        assert not first.skipped and first.rows_written == 50 and second.skipped
        rows = await _sql(postgres_server, "SELECT rows FROM public._ferry_ledger WHERE run_id = 'run-7'")
        assert [tuple(r) for r in rows] == [(50,)]
        assert (await _sql(postgres_server, "SELECT count(*) FROM public.ledgered"))[0][0] == 50

    asyncio.run(scenario())


def test_server_terminating_the_connection_mid_load_is_transient_and_the_retry_is_exact(postgres_server):
    async def scenario():
        table = _orders(3_000)
        ctx = WriteContext(run_id="kill", job_name="t", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
        started = asyncio.Event()

        async def slow_stream():
            for index, batch in enumerate(table.to_batches(max_chunksize=300)):
                yield batch
                if index == 2:
                    started.set()
                    await asyncio.sleep(1.0)

        async def terminate():
            await started.wait()
            await asyncio.sleep(0.2)
            await _sql(
                postgres_server,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'ferry-kill-test' "
                "AND query ILIKE 'COPY%'",
            )

        async with _backend(postgres_server, application_name="ferry-kill-test") as target:
            await target.begin_write("terminated", ctx)
            with pytest.raises(TransientBackendError, match="retried per partition"):
                await asyncio.gather(target.write("terminated", "p0", slow_stream(), ctx), terminate())
            assert (await _sql(postgres_server, "SELECT count(*) FROM public.terminated"))[0][0] == 0
            result = await target.write("terminated", "p0", _stream(table, 500), ctx)
        assert result.rows_written == 3_000
        assert tuple((await _sql(postgres_server, "SELECT count(*), count(DISTINCT id) FROM public.terminated"))[0]) == (3_000, 3_000)

    asyncio.run(scenario())


def test_replace_swaps_in_one_transaction_and_keeps_grants_and_comments(postgres_server):
    sql(
        postgres_server,
        "DROP TABLE IF EXISTS public.swapped",
        "CREATE TABLE public.swapped (id bigint PRIMARY KEY, label text, amount numeric(10,2))",
        "INSERT INTO public.swapped VALUES (1, 'old', 1)",
        "DROP ROLE IF EXISTS reader", "CREATE ROLE reader",
        "GRANT SELECT ON public.swapped TO reader",
        "COMMENT ON TABLE public.swapped IS 'the orders'",
        "COMMENT ON COLUMN public.swapped.label IS 'what it is'",
    )  # fmt: skip

    async def scenario():
        table = _orders(100)
        async with _backend(postgres_server) as target:
            ctx = WriteContext(run_id="swap", job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
            await target.begin_write("swapped", ctx)
            await target.write("swapped", "p0", _stream(table.slice(0, 50)), ctx)
            await target.write("swapped", "p1", _stream(table.slice(50)), ctx)
            # Not published yet: readers still see the old table.
            assert (await _sql(postgres_server, "SELECT count(*) FROM public.swapped"))[0][0] == 1
            await target.publish("swapped", ctx)

    asyncio.run(scenario())
    assert sql(postgres_server, "SELECT count(*) FROM public.swapped")[0][0] == 100
    grants = sql(postgres_server, "SELECT privilege_type FROM information_schema.role_table_grants WHERE table_name = 'swapped' AND grantee = 'reader'")
    assert [r[0] for r in grants] == ["SELECT"]
    assert sql(postgres_server, "SELECT obj_description('public.swapped'::regclass, 'pg_class')")[0][0] == "the orders"
    assert sql(postgres_server, "SELECT col_description('public.swapped'::regclass, 2)")[0][0] == "what it is"
    leftovers = sql(postgres_server, "SELECT relname FROM pg_class WHERE relname LIKE 'swapped__ferry%'")
    assert leftovers == []


def test_replace_with_a_dependent_view_uses_truncate(postgres_server):
    sql(
        postgres_server,
        "DROP VIEW IF EXISTS public.viewed_v", "DROP TABLE IF EXISTS public.viewed",
        "CREATE TABLE public.viewed (id bigint PRIMARY KEY, label text, amount numeric(10,2))",
        "INSERT INTO public.viewed VALUES (1, 'old', 1)",
        "CREATE VIEW public.viewed_v AS SELECT id FROM public.viewed",
    )  # fmt: skip

    async def scenario():
        table = _orders(10)
        async with _backend(postgres_server) as target:
            ctx = WriteContext(run_id="v", job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
            await target.begin_write("viewed", ctx)
            assert ctx.state["postgres"]["strategy"] == "truncate"
            (note,) = await target.plan_notes("viewed", WriteMode.REPLACE)
            assert "view viewed_v" in note and "TRUNCATE + INSERT" in note
            await target.write("viewed", "p0", _stream(table), ctx)
            await target.publish("viewed", ctx)
            swap_only = _backend(postgres_server, replace_strategy="swap")
            async with swap_only:
                ctx = WriteContext(run_id="w", job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
                with pytest.raises(ConfigurationError, match="view viewed_v"):
                    await swap_only.begin_write("viewed", ctx)

    asyncio.run(scenario())
    assert sql(postgres_server, "SELECT count(*) FROM public.viewed_v")[0][0] == 10


KILLED_REPLACE = """
import asyncio, sys
import pyarrow as pa
from ferry.backends import WriteContext, WriteMode
from ferry.backends.postgres import PostgresBackend

async def main():
    table = pa.table({"id": pa.array(range(100000), pa.int64()), "label": pa.array(["new"] * 100000)})
    async def endless():
        for batch in table.to_batches(max_chunksize=1000):
            yield batch
            await asyncio.sleep(0.05)
    async with PostgresBackend(host="127.0.0.1", port=int(sys.argv[1]), sslmode="disable", application_name="ferry-killed") as pg:
        ctx = WriteContext(run_id="killed", job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
        await pg.begin_write("survivor", ctx)
        await pg.write("survivor", "p0", endless(), ctx)
        await pg.publish("survivor", ctx)

asyncio.run(main())
"""


def test_a_replace_killed_mid_load_leaves_the_old_table_and_a_rerun_completes(postgres_server, tmp_path):
    sql(
        postgres_server,
        "DROP TABLE IF EXISTS public.survivor",
        "CREATE TABLE public.survivor (id bigint PRIMARY KEY, label text)",
        "INSERT INTO public.survivor SELECT g, 'old' FROM generate_series(1, 1000) g",
    )
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_REPLACE))
    process = subprocess.Popen([sys.executable, str(script), str(postgres_server.port)], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            active = sql(postgres_server, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ferry-killed' AND query ILIKE 'COPY%'")
            if active[0][0]:
                break
            assert process.poll() is None, "the loading process ended before it was killed"
            time.sleep(0.1)
        else:
            pytest.fail("the load never started")
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert [tuple(r) for r in sql(postgres_server, "SELECT count(*), min(label), max(label) FROM public.survivor")] == [(1000, "old", "old")]

    async def rerun():
        table = _orders(20)
        async with _backend(postgres_server) as target:
            ctx = WriteContext(run_id="rerun", job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
            await target.begin_write("survivor", ctx)
            await target.write("survivor", "p0", _stream(table), ctx)
            await target.publish("survivor", ctx)

    asyncio.run(rerun())
    assert sql(postgres_server, "SELECT count(*) FROM public.survivor")[0][0] == 20


def test_interrupted_append_leaves_only_whole_committed_partitions(postgres_server):
    async def scenario():
        table = _orders(100)
        ctx = WriteContext(run_id="half", job_name="t", mode=WriteMode.APPEND, schema=table.schema, key=("id",))

        async def dies():
            yield table.to_batches(max_chunksize=10)[0]
            raise RuntimeError("source died")

        async with _backend(postgres_server) as target:
            await target.begin_write("halfway", ctx)
            await target.write("halfway", "p0", _stream(table.slice(0, 50)), ctx)
            with pytest.raises(RuntimeError, match="source died"):
                await target.write("halfway", "p1", dies(), ctx)
            await target.abort("halfway", ctx)
            assert (await _sql(postgres_server, "SELECT count(*) FROM public.halfway"))[0][0] == 50
            # The rerun of the run skips p0 and completes p1: no duplicates.
            assert (await target.write("halfway", "p0", _stream(table.slice(0, 50)), ctx)).skipped
            await target.write("halfway", "p1", _stream(table.slice(50)), ctx)
        assert [tuple(r) for r in (await _sql(postgres_server, "SELECT count(*), count(DISTINCT id) FROM public.halfway"))] == [(100, 100)]

    asyncio.run(scenario())


def test_infinite_timestamps_fail_clearly_unless_read_as_null(postgres_server):
    sql(
        postgres_server,
        "DROP TABLE IF EXISTS public.infinite",
        "CREATE TABLE public.infinite (id int PRIMARY KEY, ts timestamptz, day date)",
        "INSERT INTO public.infinite VALUES (1, 'infinity', '-infinity'), (2, '2024-01-01 00:00:00+00', '2024-01-02')",
    )

    async def scenario():
        async with _backend(postgres_server) as strict:
            with pytest.raises(DataError, match=r"infinite_values: null.*column 'ts'"):
                await _read_all(strict, "infinite")
        async with _backend(postgres_server, infinite_values="null") as lenient:
            table = await _read_all(lenient, "infinite")
        rows = sorted(table.to_pylist(), key=lambda r: r["id"])
        assert rows[0]["ts"] is None and rows[0]["day"] is None
        assert rows[1]["ts"] == dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) and rows[1]["day"] == dt.date(2024, 1, 2)

    asyncio.run(scenario())


def test_declared_indexes_btree_gin_and_partial(postgres_server):
    sql(postgres_server, "DROP TABLE IF EXISTS public.indexed")
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "status": pa.array(["new", "cancelled", "paid"]),
            "doc": pa.array([{"a": "x"}, {"a": "y"}, None], pa.struct([("a", pa.string())])),
        }
    )
    indexes = [
        {"columns": ["doc"], "method": "gin"},
        {"columns": ["status"], "where": "status <> 'cancelled'"},
    ]

    async def scenario():
        async with _backend(postgres_server, indexes=indexes) as target:
            for run in ("one", "two"):  # the second replace recreates them on the new table
                ctx = WriteContext(run_id=run, job_name="t", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
                await target.begin_write("indexed", ctx)
                await target.write("indexed", "p0", _stream(table), ctx)
                await target.publish("indexed", ctx)
            back = await _read_all(target, "indexed")
        assert back.schema.field("doc").type == table.schema.field("doc").type
        assert sorted(back.to_pylist(), key=lambda r: r["id"]) == table.to_pylist()

    asyncio.run(scenario())
    found = {r[0]: r[1] for r in sql(postgres_server, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'indexed'")}
    assert "indexed_pkey" in found
    assert "USING gin (doc)" in found["indexed_doc_gin"]
    assert "WHERE (status <> 'cancelled'::text)" in found["indexed_status_btree"]
    with pytest.raises(ValidationError, match="method"):
        PostgresBackend(indexes=[{"columns": ["x"], "method": "nonsense"}])


def test_ferry_plan_says_how_replace_will_run(postgres_server):
    from ferry.flows.planning import plan_job
    from ferry.flows.spec import build_backend

    _make_table(postgres_server, "planned", 10)
    job = job_from_dict(
        {
            "source": {"backend": "postgres", "dataset": "planned", **postgres_server.settings(sslmode="disable")},
            "target": {"backend": "postgres", "dataset": "planned_copy", **postgres_server.settings(sslmode="disable")},
            "mode": "replace",
        }
    )

    async def scenario():
        source, target = await build_backend(job.source), await build_backend(job.target)
        async with source, target:
            plan = await plan_job(job, source, target)
        return plan.render()

    text = asyncio.run(scenario())
    assert "swapped in by rename" in text
    assert 'CREATE TABLE "public"."<target>"' in text
