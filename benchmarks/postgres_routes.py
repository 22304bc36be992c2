"""PostgreSQL benchmark routes: Ferry against the bare drivers on the same throwaway server.

Each route's ``services`` starts its own PostgreSQL 15 cluster (initdb +
pg_ctl on 127.0.0.1 and a free port, as the tests do); the postmaster's pid
joins ``ctx.service_pids`` so its memory is reported as the services'.

The orders-like table (bigint key, text, numeric(12,2), double, timestamptz,
text[], jsonb, boolean...) is Ferry's generated orders data set; its
``shipping`` struct is a jsonb column.

* ``memory-to-postgres`` -- generated orders -> a new table (Ferry replace).
  Baseline ``adbc-ingest``: the same generator batches, made COPY-ready the
  same way (struct -> JSON text for the jsonb column), ingested by one bare
  ``adbc_ingest`` into a table with the same DDL.
* ``postgres-to-memory`` -- the prepared table -> Ferry's counting sink.
  Baseline ``adbc-fetch``: one bare ``fetch_record_batch`` stream with the
  same type conversions (numeric text -> decimal128(12, 2)), counting rows.
* ``postgres-to-parquet`` -- the prepared table -> local Parquet. Baseline
  ``adbc-fetch``: the same stream written by one ``ParquetWriter`` (snappy).
* ``postgres-to-postgres`` -- the prepared table -> another table (Ferry
  replace, which takes the binary COPY fast path: no decoding either).
  Baseline ``copy-pipe``: binary ``COPY ... TO STDOUT`` piped into
  ``COPY ... FROM STDIN`` between two asyncpg connections (no decoding).

Nothing here imports Ferry or Prefect at import time.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from .harness import HarnessError, log
from .routes import BaselineResult, FerryResult, Route, RunContext, _generated_orders, register

#: DDL of the prepared source and of the baselines' targets (what Ferry creates for the orders schema).
ORDERS_DDL = (
    "CREATE TABLE {name} (order_id bigint PRIMARY KEY, customer_id bigint, status text, country text, "
    "customer_name text, amount numeric(12,2), discount double precision, quantity integer, "
    "created_at timestamptz, is_gift boolean, tags text[], shipping jsonb, note text)"
)
SOURCE_TABLE = "orders_source"


@asynccontextmanager
async def postgres_service(ctx: RunContext) -> AsyncIterator[Any]:
    """Start a throwaway PostgreSQL 15 for this route (stopped by pg_ctl afterwards)."""
    from tests.integration.pg_server import start_postgres

    server = await asyncio.to_thread(start_postgres, str(ctx.workdir))
    if server.pid:
        ctx.service_pids.add(server.pid)
    ctx.state["postgres"] = server
    log(f"postgres: PostgreSQL 15 on {server.host}:{server.port} (pid {server.pid})")
    try:
        yield server
    finally:
        ctx.state.pop("postgres", None)
        if server.pid:
            ctx.service_pids.discard(server.pid)
        await asyncio.to_thread(server.stop)


def _server(ctx: RunContext) -> Any:
    try:
        return ctx.state["postgres"]
    except KeyError:
        raise HarnessError("the postgres service is not running") from None


def _endpoint(ctx: RunContext, dataset: str, **extra: Any) -> dict[str, Any]:
    server = _server(ctx)
    return {"backend": "postgres", "dataset": dataset, **server.settings(sslmode="disable"), **extra}


def _partition_rows(ctx: RunContext, rows: int) -> int:
    # One read partition per parallel slot (at least).
    return max(1, -(-rows // ctx.parallel))


async def _execute(ctx: RunContext, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_server(ctx).dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _ingest_ready(batch: Any) -> Any:
    """The generator batch as the driver can COPY it (the struct column as JSON text)."""
    from ferry.backends.postgres_copy import adapt_for_ingest

    return adapt_for_ingest(batch, {"shipping": "jsonb"})


# -- memory-to-postgres -------------------------------------------------------------------------

MEMORY_TO_POSTGRES = "memory-to-postgres"


async def ferry_memory_to_postgres(ctx: RunContext, rows: int) -> FerryResult:
    """Generated orders -> a new PostgreSQL table through Ferry (replace, key order_id)."""
    job = ctx.job(
        "bench-memory-to-postgres",
        source=_generated_orders(ctx, rows),
        target=_endpoint(ctx, "orders_ferry"),
        key=["order_id"],
    )
    return await ctx.run_job(job)


def adbc_ingest(ctx: RunContext, rows: int) -> BaselineResult:
    """The same generator batches through one bare ``adbc_ingest`` (binary COPY) in one transaction."""
    import adbc_driver_postgresql.dbapi as dbapi
    import pyarrow as pa

    from ferry.backends.generator import generate_batches

    started = time.perf_counter()
    conn = dbapi.connect(_server(ctx).dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS orders_baseline")
            cur.execute(ORDERS_DDL.format(name="orders_baseline"))
            written = 0

            def stream():
                nonlocal written
                for batch in generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size):
                    written += batch.num_rows
                    yield _ingest_ready(batch)

            source = stream()
            clock = time.perf_counter()
            first = next(source)
            reader = pa.RecordBatchReader.from_batches(first.schema, _chain(first, source))
            cur.execute("BEGIN")
            cur.adbc_ingest("orders_baseline", reader, mode="append")
            cur.execute("COMMIT")
            ended = time.perf_counter()
    finally:
        conn.close()
    return BaselineResult(rows=written, seconds=ended - clock, end_to_end_seconds=time.perf_counter() - started)


def _chain(first: Any, rest: Any):
    yield first
    yield from rest


register(
    Route(
        name=MEMORY_TO_POSTGRES,
        description="generated orders -> PostgreSQL 15 table (Ferry replace via ADBC binary COPY, verify off)",
        ferry=ferry_memory_to_postgres,
        baseline_name="adbc-ingest",
        baseline=adbc_ingest,
        services=postgres_service,
    )
)


# -- the prepared source table --------------------------------------------------------------------


async def prepare_postgres_source(ctx: RunContext, rows: int) -> None:
    """Load the orders-like source table once per row count (bare ADBC ingest, then ANALYZE)."""
    import adbc_driver_postgresql.dbapi as dbapi
    import pyarrow as pa

    from ferry.backends.generator import generate_batches

    def load() -> None:
        conn = dbapi.connect(_server(ctx).dsn, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {SOURCE_TABLE}")
                cur.execute(ORDERS_DDL.format(name=SOURCE_TABLE))
                batches = (_ingest_ready(b) for b in generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size))
                first = next(batches)
                cur.adbc_ingest(SOURCE_TABLE, pa.RecordBatchReader.from_batches(first.schema, _chain(first, batches)), mode="append")
                cur.execute(f"VACUUM ANALYZE {SOURCE_TABLE}")
        finally:
            conn.close()

    await asyncio.to_thread(load)
    log(f"postgres source: {rows:,} rows in {SOURCE_TABLE}")


def _source(ctx: RunContext, rows: int) -> dict[str, Any]:
    return _endpoint(ctx, SOURCE_TABLE, partition_rows=_partition_rows(ctx, rows))


def _fetch_converted(ctx: RunContext):
    """Yield the source table's batches from one bare ADBC stream, numeric text cast to decimal."""
    import adbc_driver_postgresql.dbapi as dbapi
    import pyarrow as pa

    conn = dbapi.connect(_server(ctx).dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {SOURCE_TABLE}")
            for batch in cur.fetch_record_batch():
                columns = []
                for field, column in zip(batch.schema, batch.columns):
                    if isinstance(column.type, pa.BaseExtensionType):
                        column = column.storage
                    if field.name == "amount":
                        column = column.cast(pa.decimal128(12, 2))
                    columns.append(column)
                yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names)
    finally:
        conn.close()


# -- postgres-to-memory ---------------------------------------------------------------------------

POSTGRES_TO_MEMORY = "postgres-to-memory"


async def ferry_postgres_to_memory(ctx: RunContext, rows: int) -> FerryResult:
    """The prepared table -> Ferry's counting sink (key-range partitions, one snapshot)."""
    job = ctx.job(
        "bench-postgres-to-memory",
        source=_source(ctx, rows),
        target={"backend": "memory", "dataset": "sink", "discard": True},
    )
    return await ctx.run_job(job)


def adbc_fetch_count(ctx: RunContext, rows: int) -> BaselineResult:
    """One bare ADBC ``fetch_record_batch`` stream (numeric -> decimal as Ferry reads it), counting rows."""
    started = time.perf_counter()
    clock = time.perf_counter()
    seen = sum(batch.num_rows for batch in _fetch_converted(ctx))
    ended = time.perf_counter()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=POSTGRES_TO_MEMORY,
        description="PostgreSQL 15 orders table -> Ferry's counting sink (memory, discard)",
        ferry=ferry_postgres_to_memory,
        baseline_name="adbc-fetch",
        baseline=adbc_fetch_count,
        prepare=prepare_postgres_source,
        services=postgres_service,
    )
)


# -- postgres-to-parquet --------------------------------------------------------------------------

POSTGRES_TO_PARQUET = "postgres-to-parquet"


async def ferry_postgres_to_parquet(ctx: RunContext, rows: int) -> FerryResult:
    """The prepared table -> local Parquet through Ferry."""
    folder = ctx.scratch(POSTGRES_TO_PARQUET, rows, "ferry")
    job = ctx.job(
        "bench-postgres-to-parquet",
        source=_source(ctx, rows),
        target={"backend": "local", "url": str(folder), "dataset": "orders"},
    )
    return await ctx.run_job(job)


def adbc_fetch_parquet(ctx: RunContext, rows: int) -> BaselineResult:
    """One bare ADBC stream written by one ``pyarrow.parquet.ParquetWriter`` (snappy)."""
    import pyarrow.parquet as pq

    path = ctx.scratch(POSTGRES_TO_PARQUET, rows, "baseline") / "orders.parquet"
    started = time.perf_counter()
    clock = time.perf_counter()
    seen = 0
    writer = None
    for batch in _fetch_converted(ctx):
        if writer is None:
            writer = pq.ParquetWriter(str(path), batch.schema)
        writer.write_batch(batch)
        seen += batch.num_rows
    if writer is not None:
        writer.close()
    ended = time.perf_counter()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=POSTGRES_TO_PARQUET,
        description="PostgreSQL 15 orders table -> local Parquet (Ferry replace, verify off)",
        ferry=ferry_postgres_to_parquet,
        baseline_name="adbc-fetch",
        baseline=adbc_fetch_parquet,
        prepare=prepare_postgres_source,
        services=postgres_service,
    )
)


# -- postgres-to-postgres -------------------------------------------------------------------------

POSTGRES_TO_POSTGRES = "postgres-to-postgres"


async def ferry_postgres_to_postgres(ctx: RunContext, rows: int) -> FerryResult:
    """The prepared table -> another table on the same server through Ferry (replace)."""
    job = ctx.job(
        "bench-postgres-to-postgres",
        source=_source(ctx, rows),
        target=_endpoint(ctx, "orders_copy_ferry"),
        key=["order_id"],
    )
    result = await ctx.run_job(job)
    if not result.summary.get("copy_fast_path"):
        raise HarnessError("the postgres-to-postgres job did not take the binary COPY fast path; see `ferry plan`")
    return result


async def copy_pipe(ctx: RunContext, rows: int) -> BaselineResult:
    """Binary ``COPY TO STDOUT`` piped into ``COPY FROM STDIN`` between two asyncpg connections."""
    import asyncpg

    started = time.perf_counter()
    server = _server(ctx)
    source = await asyncpg.connect(server.dsn)
    target = await asyncpg.connect(server.dsn)
    try:
        await target.execute("DROP TABLE IF EXISTS orders_copy_pipe")
        await target.execute(ORDERS_DDL.format(name="orders_copy_pipe"))
        queue: asyncio.Queue = asyncio.Queue(maxsize=16)
        end = object()

        async def produce() -> None:
            async def push(chunk: bytes) -> None:
                await queue.put(chunk)

            await source.copy_from_query(f"SELECT * FROM {SOURCE_TABLE}", output=push, format="binary")
            await queue.put(end)

        async def chunks():
            while True:
                chunk = await queue.get()
                if chunk is end:
                    return
                yield chunk

        clock = time.perf_counter()
        async with target.transaction():
            await asyncio.gather(produce(), target.copy_to_table("orders_copy_pipe", source=chunks(), format="binary"))
        ended = time.perf_counter()
        seen = await target.fetchval("SELECT count(*) FROM orders_copy_pipe")
    finally:
        await source.close()
        await target.close()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=time.perf_counter() - started)


register(
    Route(
        name=POSTGRES_TO_POSTGRES,
        description="PostgreSQL 15 orders table -> another table on the same server (Ferry replace, verify off)",
        ferry=ferry_postgres_to_postgres,
        baseline_name="copy-pipe",
        baseline=copy_pipe,
        prepare=prepare_postgres_source,
        services=postgres_service,
    )
)


# -- postgres-drivers: the bare driver paths, each as a rate -----------------------------------------

POSTGRES_DRIVERS = "postgres-drivers"
#: Rows of the slow per-row paths (as in the issue: they are reported as rates).
INSERT_ROWS = 10_000
EXECUTEMANY_ROWS = 100_000


def _tuples(batches: list[Any]) -> list[tuple]:
    """Rows of the generator batches as asyncpg-ready tuples (struct -> JSON text for jsonb)."""
    import json

    out: list[tuple] = []
    for batch in batches:
        columns = batch.to_pydict()
        shipping = [None if v is None else json.dumps(v) for v in columns["shipping"]]
        columns["shipping"] = shipping
        out.extend(zip(*columns.values()))
    return out


async def run_postgres_drivers(ctx: RunContext, rows: int, repeat: int) -> list[dict[str, Any]]:
    """Bare-driver loads and unloads of the same orders rows: what each Python path costs, as rows/s.

    Loads: ``adbc_ingest`` (Arrow, binary COPY), asyncpg ``copy_records_to_table``
    with tuples built from the batches (tuple building included), ``executemany``
    (first 100,000 rows) and one ``INSERT`` per row (first 10,000 rows).
    Unloads: ADBC ``fetch_record_batch`` and an asyncpg cursor turned into Arrow.
    """
    import asyncpg
    import pyarrow as pa

    from ferry.backends.generator import ORDERS_SCHEMA, generate_batches

    from .harness import environment_info, median

    server = _server(ctx)
    batches = list(generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size))
    columns = ORDERS_SCHEMA.names
    insert = f"INSERT INTO orders_driver ({', '.join(columns)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})"
    seconds: dict[str, list[float]] = {}
    counted: dict[str, int] = {}

    async def fresh(conn) -> None:
        await conn.execute("DROP TABLE IF EXISTS orders_driver")
        await conn.execute(ORDERS_DDL.format(name="orders_driver"))

    conn = await asyncpg.connect(server.dsn)
    try:
        # COPY of records uses binary: jsonb's binary form is a version byte then the text.
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda v: b"\x01" + v.encode(),
            decoder=lambda v: v[1:].decode(),
            schema="pg_catalog",
            format="binary",
        )
        for _ in range(repeat):
            await fresh(conn)
            started = time.perf_counter()
            await asyncio.to_thread(_adbc_ingest_into, server.dsn, "orders_driver", batches)
            seconds.setdefault("adbc-ingest", []).append(time.perf_counter() - started)
            counted["adbc-ingest"] = rows

            await fresh(conn)
            started = time.perf_counter()
            records = await asyncio.to_thread(_tuples, batches)
            await conn.copy_records_to_table("orders_driver", records=records, columns=columns)
            seconds.setdefault("copy_records_to_table", []).append(time.perf_counter() - started)
            counted["copy_records_to_table"] = rows

            await fresh(conn)
            few = records[:EXECUTEMANY_ROWS]
            started = time.perf_counter()
            await conn.executemany(insert, few)
            seconds.setdefault("executemany", []).append(time.perf_counter() - started)
            counted["executemany"] = len(few)

            await fresh(conn)
            few = records[:INSERT_ROWS]
            started = time.perf_counter()
            for record in few:
                await conn.execute(insert, *record)
            seconds.setdefault("insert-per-row", []).append(time.perf_counter() - started)
            counted["insert-per-row"] = len(few)
            del records

            await fresh(conn)
            await asyncio.to_thread(_adbc_ingest_into, server.dsn, "orders_driver", batches)
            started = time.perf_counter()
            seen = await asyncio.to_thread(lambda: sum(b.num_rows for b in _fetch_table(server.dsn, "orders_driver")))
            seconds.setdefault("adbc-fetch", []).append(time.perf_counter() - started)
            counted["adbc-fetch"] = seen

            started = time.perf_counter()
            seen = 0
            async with conn.transaction():
                cursor = await conn.cursor("SELECT * FROM orders_driver")
                while True:
                    chunk = await cursor.fetch(ctx.batch_size)
                    if not chunk:
                        break
                    table = pa.Table.from_pylist([dict(r) for r in chunk])
                    seen += table.num_rows
            seconds.setdefault("asyncpg-cursor", []).append(time.perf_counter() - started)
            counted["asyncpg-cursor"] = seen
            log(f"{POSTGRES_DRIVERS} {rows:,} rows: " + ", ".join(f"{m} {counted[m] / s[-1]:,.0f}/s" for m, s in seconds.items()))
        await conn.execute("DROP TABLE IF EXISTS orders_driver")
    finally:
        await conn.close()
    lines = []
    for method, values in seconds.items():
        value = median(values)
        lines.append(
            {
                "route": POSTGRES_DRIVERS,
                "method": method,
                "direction": "unload" if method in ("adbc-fetch", "asyncpg-cursor") else "load",
                "rows": counted[method],
                "table_rows": rows,
                "seconds": value,
                "rows_per_s": round(counted[method] / value) if value > 0 else None,
                "repeat": repeat,
                "runs": values,
                **environment_info(),
            }
        )
    return lines


def _adbc_ingest_into(dsn: str, table: str, batches: list[Any]) -> None:
    import adbc_driver_postgresql.dbapi as dbapi
    import pyarrow as pa

    ready = [_ingest_ready(b) for b in batches]
    conn = dbapi.connect(dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.adbc_ingest(table, pa.RecordBatchReader.from_batches(ready[0].schema, iter(ready)), mode="append")
    finally:
        conn.close()


def _fetch_table(dsn: str, table: str):
    import adbc_driver_postgresql.dbapi as dbapi

    conn = dbapi.connect(dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table}")
            yield from cur.fetch_record_batch()
    finally:
        conn.close()


register(
    Route(
        name=POSTGRES_DRIVERS,
        description="bare driver paths into and out of PostgreSQL 15, each as rows/s (ADBC, COPY of tuples, executemany, INSERT per row, asyncpg cursor)",
        baseline_name="(each line is a bare driver path)",
        run=run_postgres_drivers,
        services=postgres_service,
    )
)
