"""The ``records`` route: the performance guide's benchmark of the record API, per store.

``python -m benchmarks records --rows N`` prints, per record store and method,
one JSON line::

    {"route": "records", "backend": "memory", "method": "create_batch", "rows": N,
     "rows_per_s": ..., "baseline": null, "baseline_rows_per_s": null, "ratio": null,
     "search_ms": null, ...}

Methods (the guide's "Simple Benchmark Script" and "Bulk Insert Performance"
table; every figure is the median of ``--repeat`` runs, each on an emptied
store, records built outside the clock as the guide builds them,
``Record({"id": i, "data": f"test_{i}"})``):

* ``create`` -- individual ``db.create(record)`` calls for 1,000 records
  (or N if smaller), as a rate;
* ``create_batch`` -- one ``create_batch`` of N records (the guide's "Write");
* ``batch_100`` / ``batch_500`` -- ``create_batch`` in batches of 100 / 500;
* ``stream_write`` -- ``stream_write`` of N records with the guide's
  ``StreamConfig(batch_size=500, parallel=True)``;
* ``read_batch`` -- ``read_batch`` of the N ids (the guide's "Read");
* ``search`` -- ``search(Query().limit(100))`` on N records: ``search_ms``
  (rows 100, rows_per_s = 100 / time).

A store with a bare-driver baseline (Postgres: asyncpg ``copy_records_to_table``
of the same records) reports it on its write lines as ``baseline_rows_per_s``
and ``ratio``; memory has none (there is no driver below it), which its lines
say with ``baseline`` null and a ``note``. ``s3-listing-5s`` is the S3 store
again with ``listing_max_age_seconds: 5``, on the same moto server. A store
joins by adding a :class:`RecordBench` to ``RECORD_BACKENDS``. No Prefect
flow runs here.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator, Awaitable, Callable

from .harness import environment_info, log, median
from .routes import Route, RunContext, register

ROUTE = "records"
INDIVIDUAL_RECORDS = 1_000
#: ctx.state key: names of the record stores whose services are running.
SERVICES_STATE = "records-services"


@dataclass(frozen=True)
class RecordBench:
    """How to benchmark one record store."""

    #: Opens an empty store (an async context manager yielding an AsyncDatabase).
    open: Callable[[RunContext], AsyncContextManager[Any]]
    #: Bare-driver write of the same records: returns its data-path seconds; None: no baseline.
    baseline: Callable[[RunContext, list[Any]], Awaitable[float]] | None = None
    baseline_name: str | None = None
    #: Why there is no baseline (printed in the lines' ``note``).
    note: str | None = None
    #: Servers the store needs, started once per invocation.
    services: Callable[[RunContext], AsyncContextManager[Any]] | None = None
    #: Another entry whose servers this store uses instead of starting its own.
    uses_services_of: str | None = None


@contextlib.asynccontextmanager
async def _memory_store(ctx: RunContext) -> AsyncIterator[Any]:
    from ferry.backends.records import AsyncDatabase

    db = await AsyncDatabase.create("memory", {})
    try:
        yield db
    finally:
        await db.close()


POSTGRES_SCHEMA = "records_bench"


@contextlib.asynccontextmanager
async def _postgres_store(ctx: RunContext) -> AsyncIterator[Any]:
    from ferry.backends.records import AsyncDatabase

    server = ctx.state["postgres"]
    db = await AsyncDatabase.create("postgres", server.settings(schema=POSTGRES_SCHEMA, sslmode="disable"))
    try:
        yield db
    finally:
        await db.close()


async def _asyncpg_copy_baseline(ctx: RunContext, records: list[Any]) -> float:
    """Bare asyncpg: the same records as (id, JSON) rows, ``copy_records_to_table`` into the same layout.

    The clock covers what a bare-driver user has to do with these records:
    turning each into its id and JSON text, and the COPY (into a table with
    the store's layout and indexes: primary key, GIN on data, btree on created_at).
    """
    import json

    import asyncpg

    from ferry.backends.records_postgres_sql import layout_sql

    server = ctx.state["postgres"]
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {POSTGRES_SCHEMA}.baseline")
        for statement in layout_sql(POSTGRES_SCHEMA, "baseline"):
            await conn.execute(statement)
        started = time.perf_counter()
        rows = [(record.storage_id(), json.dumps(record.fields)) for record in records]
        await conn.copy_records_to_table("baseline", schema_name=POSTGRES_SCHEMA, records=rows, columns=["id", "data"])
        elapsed = time.perf_counter() - started
        await conn.execute(f"DROP TABLE {POSTGRES_SCHEMA}.baseline")
        return elapsed
    finally:
        await conn.close()


def _postgres_service(ctx: RunContext) -> AsyncContextManager[Any]:
    from .postgres_routes import postgres_service

    return postgres_service(ctx)


ELASTICSEARCH_INDEX = "records-bench"


@contextlib.asynccontextmanager
async def _elasticsearch_store(ctx: RunContext) -> AsyncIterator[Any]:
    from ferry.backends.records import AsyncDatabase

    from .es_routes import _url

    settings = {"hosts": [_url(ctx)], "index": ELASTICSEARCH_INDEX, "number_of_replicas": 0}
    db = await AsyncDatabase.create("elasticsearch", settings)
    try:
        yield db
    finally:
        await db.close()


async def _elasticsearch_bulk_baseline(ctx: RunContext, records: list[Any]) -> float:
    """Bare elasticsearch-py: the same records as plain documents, ``async_bulk`` into a fresh index.

    The clock covers turning each record into an action (its id and fields)
    and the bulk requests; the index has the server's dynamic mapping. The
    client only gets the node class that sends plain JSON (osmem-server
    refuses the vendor media type otherwise).
    """
    from elasticsearch import AsyncElasticsearch
    from elasticsearch.helpers import async_bulk

    from ferry.backends.elasticsearch_client import PlainJsonNode

    from .es_routes import _url

    index = f"{ELASTICSEARCH_INDEX}-baseline"
    client = AsyncElasticsearch(_url(ctx), node_class=PlainJsonNode)
    try:
        await client.options(ignore_status=404).indices.delete(index=index)
        await client.indices.create(index=index, settings={"number_of_replicas": 0})
        started = time.perf_counter()
        actions = [{"_index": index, "_id": record.storage_id(), "_source": record.fields} for record in records]
        await async_bulk(client, actions, chunk_size=len(actions), max_chunk_bytes=10 * 2**20, refresh=False)
        elapsed = time.perf_counter() - started
        await client.indices.delete(index=index)
        return elapsed
    finally:
        await client.close()


def _elasticsearch_service(ctx: RunContext) -> AsyncContextManager[Any]:
    from .es_routes import osmem_service

    return osmem_service(ctx)


S3_PREFIX = "records-bench"


#: ``listing_max_age_seconds`` of the ``s3-listing-5s`` store: single-record calls skip most LISTs.
REUSED_LISTING_SECONDS = 5.0


@contextlib.asynccontextmanager
async def _s3_store(ctx: RunContext, **record_settings: Any) -> AsyncIterator[Any]:
    from ferry.backends.records import AsyncDatabase

    from .s3_routes import BUCKET, KEY, SECRET, _endpoint

    settings = {
        "url": f"s3://{BUCKET}/{S3_PREFIX}", "endpoint_url": _endpoint(ctx), "path_style": True, "key": KEY, "secret": SECRET,
        **record_settings,
    }
    db = await AsyncDatabase.create("s3", settings)
    try:
        yield db
    finally:
        await db.close()


async def _pyarrow_s3_baseline(ctx: RunContext, records: list[Any]) -> float:
    """Bare pyarrow + s3fs: the same records as (id, JSON) rows, one Parquet object, one PUT.

    The clock covers what a bare-driver user has to do with these records:
    turning each into its id and JSON text, encoding the Parquet file and
    uploading it (the store writes the same file plus typed columns).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .s3_routes import BUCKET, _endpoint, _s3fs

    fs = _s3fs(_endpoint(ctx))
    path = f"{BUCKET}/{S3_PREFIX}-baseline/records.parquet"
    started = time.perf_counter()
    table = pa.table({"id": [r.storage_id() for r in records], "fields": [json.dumps(r.fields) for r in records]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs.pipe_file(path, sink.getvalue().to_pybytes())
    elapsed = time.perf_counter() - started
    fs.rm_file(path)
    return elapsed


def _s3_service(ctx: RunContext) -> AsyncContextManager[Any]:
    from .s3_routes import moto_service

    return moto_service(ctx)


#: Backend name -> how to benchmark it, in output order.
RECORD_BACKENDS: dict[str, RecordBench] = {
    "memory": RecordBench(
        open=_memory_store,
        note="memory has no baseline driver: there is no store below it to compare with",
    ),
    "postgres": RecordBench(
        open=_postgres_store,
        baseline=_asyncpg_copy_baseline,
        baseline_name="asyncpg copy_records_to_table",
        services=_postgres_service,
    ),
    "elasticsearch": RecordBench(
        open=_elasticsearch_store,
        baseline=_elasticsearch_bulk_baseline,
        baseline_name="elasticsearch-py async_bulk (plain documents)",
        services=_elasticsearch_service,
    ),
    "s3": RecordBench(
        open=_s3_store,
        baseline=_pyarrow_s3_baseline,
        baseline_name="pyarrow write_table + s3fs pipe_file (id, JSON)",
        services=_s3_service,
    ),
    # The same S3 store reusing a listing for 5 s (on the moto server the "s3" entry starts).
    "s3-listing-5s": RecordBench(
        open=functools.partial(_s3_store, listing_max_age_seconds=REUSED_LISTING_SECONDS),
        baseline=_pyarrow_s3_baseline,
        baseline_name="pyarrow write_table + s3fs pipe_file (id, JSON)",
        uses_services_of="s3",
    ),
}


def _records(count: int, start: int = 0) -> list[Any]:
    from ferry.backends.records import Record

    return [Record({"id": i, "data": f"test_{i}"}) for i in range(start, start + count)]


async def _timed(db: Any, call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    await db.clear()
    started = time.perf_counter()
    value = await call()
    return time.perf_counter() - started, value


async def _measure_backend(ctx: RunContext, name: str, bench: RecordBench, rows: int, repeat: int) -> list[dict[str, Any]]:
    from ferry.backends.records import Query, StreamConfig

    records = _records(rows)
    few = records[: min(rows, INDIVIDUAL_RECORDS)]
    seconds: dict[str, list[float]] = {}
    baseline_seconds: list[float] = []

    def note(method: str, value: float) -> None:
        seconds.setdefault(method, []).append(value)

    async with bench.open(ctx) as db:
        for attempt in range(1, repeat + 1):

            async def individual() -> None:
                for record in few:
                    await db.create(record)

            note("create", (await _timed(db, individual))[0])

            async def batched(size: int) -> None:
                for start in range(0, rows, size):
                    (await db.create_batch(records[start : start + size])).raise_for_errors()

            note("batch_100", (await _timed(db, lambda: batched(100)))[0])
            note("batch_500", (await _timed(db, lambda: batched(500)))[0])

            async def stream() -> Any:
                async def record_generator():
                    for record in records:
                        yield record

                return await db.stream_write(record_generator(), config=StreamConfig(batch_size=500, parallel=True))

            elapsed, result = await _timed(db, stream)
            if result.successful != rows:
                raise RuntimeError(f"{name}: stream_write wrote {result.successful} of {rows} records")
            note("stream_write", elapsed)

            elapsed, ids = await _timed(db, lambda: db.create_batch(records))
            ids.raise_for_errors()
            note("create_batch", elapsed)

            started = time.perf_counter()
            retrieved = await db.read_batch(ids)
            note("read_batch", time.perf_counter() - started)
            if sum(r is not None for r in retrieved) != rows:
                raise RuntimeError(f"{name}: read_batch found {sum(r is not None for r in retrieved)} of {rows}")
            del retrieved

            started = time.perf_counter()
            found = await db.search(Query().limit(100))
            note("search", time.perf_counter() - started)
            if len(found) != min(100, rows):
                raise RuntimeError(f"{name}: search returned {len(found)} records, expected {min(100, rows)}")

            if bench.baseline is not None:
                await db.clear()
                baseline_seconds.append(await bench.baseline(ctx, records))
            log(
                f"{ROUTE} {name} {rows:,} records, run {attempt}/{repeat}: create_batch "
                f"{rows / seconds['create_batch'][-1]:,.0f}/s, read_batch {rows / seconds['read_batch'][-1]:,.0f}/s, "
                f"search {seconds['search'][-1] * 1000:.2f} ms"
            )
        await db.clear()

    baseline_rate = rows / median(baseline_seconds) if baseline_seconds else None
    common = {"route": ROUTE, "backend": name, "baseline": bench.baseline_name, "repeat": repeat}
    if bench.note and bench.baseline is None:
        common["note"] = bench.note
    lines = []
    for method, counted in (
        ("create", len(few)),
        ("batch_100", rows),
        ("batch_500", rows),
        ("stream_write", rows),
        ("create_batch", rows),
        ("read_batch", rows),
        ("search", min(100, rows)),
    ):
        value = median(seconds[method])
        rate = counted / value if value > 0 else None
        writes = method in ("create", "batch_100", "batch_500", "stream_write", "create_batch")
        base = baseline_rate if writes else None
        lines.append(
            {
                **common,
                "method": method,
                "rows": counted,
                "table_rows": rows,
                "seconds": value,
                "rows_per_s": rate,
                "baseline_rows_per_s": base,
                "ratio": rate / base if (rate and base) else None,
                "search_ms": value * 1000 if method == "search" else None,
                "runs": seconds[method],
                **environment_info(),
            }
        )
    return lines


async def run_records(ctx: RunContext, rows: int, repeat: int) -> list[dict[str, Any]]:
    """Every record store's lines for ``rows`` records."""
    lines = []
    running = ctx.state.get(SERVICES_STATE, set())
    for name, bench in RECORD_BACKENDS.items():
        server = bench.uses_services_of or (name if bench.services is not None else None)
        if server is not None and server not in running:
            # Called without the route's services (e.g. a unit test of the line format): say so, measure the rest.
            log(f"{ROUTE}: {name} skipped, its server is not running (the records route's services start it)")
            continue
        lines.extend(await _measure_backend(ctx, name, bench, rows, repeat))
    return lines


@contextlib.asynccontextmanager
async def record_services(ctx: RunContext) -> AsyncIterator[None]:
    """Start the services of every record store that needs one."""
    running: set[str] = set()
    async with contextlib.AsyncExitStack() as stack:
        for name, bench in RECORD_BACKENDS.items():
            if bench.services is not None:
                await stack.enter_async_context(bench.services(ctx))
                running.add(name)
        ctx.state[SERVICES_STATE] = running
        try:
            yield
        finally:
            ctx.state.pop(SERVICES_STATE, None)


register(
    Route(
        name=ROUTE,
        description="the performance guide's record API benchmark (create/batches/stream_write/read_batch/search) per store",
        baseline_name="per store (none for memory)",
        run=run_records,
        services=record_services,
    )
)


# -- records-pooling: the guide's "5-10x from pooling" -------------------------------------------

POOLING_ROUTE = "records-pooling"
POOLING_SCHEMA = "records_pooling"
#: Records in the table the reads pick from (reads cycle over them).
POOLING_RECORDS = 10_000
#: Reads of the connection-per-read baseline (a connection costs milliseconds: reported as a rate).
CONNECT_PER_READ_MAX = 500
#: PostgresBackend's default max_connections, the pool size when no sweep sets one.
DEFAULT_POOL_SIZE = 10


async def _concurrent_reads(read_one: Callable[[str], Awaitable[Any]], keys: list[str], in_flight: int) -> float:
    """Seconds to read every key with ``in_flight`` readers at once (each read must find its record)."""
    import asyncio

    pending = iter(keys)

    async def reader() -> None:
        for key in pending:  # one iterator shared by the readers: each key is read once
            if await read_one(key) is None:
                raise RuntimeError(f"{POOLING_ROUTE}: record {key} not found")

    started = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(in_flight)))
    return time.perf_counter() - started


async def run_records_pooling(ctx: RunContext, rows: int, repeat: int) -> list[dict[str, Any]]:
    """``rows`` single-record reads through a pooled store, against ``asyncpg.connect`` per read.

    Both sides keep ``--parallel`` reads in flight on the same table. The
    pooled side is ``AsyncDatabase.read(id)`` on a PostgreSQL store whose pool
    holds at most ``postgres.max_connections`` connections (sweep setting,
    default 10), opened before the clock; the baseline opens a connection,
    fetches the row, decodes its JSON and closes the connection, for the first
    ``CONNECT_PER_READ_MAX`` reads. Runs alternate; figures are medians.
    """
    import json

    import asyncpg

    from ferry.backends.records import AsyncDatabase

    from .sweep import setting

    server = ctx.state["postgres"]
    in_flight = ctx.parallel
    pool_size = setting(ctx, "postgres.max_connections", DEFAULT_POOL_SIZE)
    config = server.settings(schema=POOLING_SCHEMA, sslmode="disable", max_connections=pool_size, min_connections=1)
    seconds: list[float] = []
    baseline_seconds: list[float] = []
    async with await AsyncDatabase.create("postgres", config) as db:
        await db.clear()
        ids = (await db.create_batch(_records(min(rows, POOLING_RECORDS)))).raise_for_errors()
        keys = [ids[i % len(ids)] for i in range(rows)]
        few = keys[:CONNECT_PER_READ_MAX]
        statement = f"SELECT data::text FROM {db.target} WHERE id = $1"

        async def connect_and_read(key: str) -> Any:
            conn = await asyncpg.connect(server.dsn)
            try:
                data = await conn.fetchval(statement, key)
            finally:
                await conn.close()
            return None if data is None else json.loads(data)

        for attempt in range(1, repeat + 1):
            seconds.append(await _concurrent_reads(db.read, keys, in_flight))
            baseline_seconds.append(await _concurrent_reads(connect_and_read, few, in_flight))
            log(
                f"{POOLING_ROUTE} {rows:,} reads, {in_flight} in flight, pool {pool_size}, run {attempt}/{repeat}: "
                f"pooled {rows / seconds[-1]:,.0f}/s, connect per read {len(few) / baseline_seconds[-1]:,.0f}/s"
            )
        await db.clear()
    value, base = median(seconds), median(baseline_seconds)
    rate, base_rate = rows / value, len(few) / base
    return [
        {
            "route": POOLING_ROUTE,
            "backend": "postgres",
            "method": "read",
            "rows": rows,
            "seconds": value,
            "rows_per_s": round(rate),
            "baseline": "asyncpg.connect per read",
            # Its reads in flight are --parallel too (a sweep plot draws the baseline through its points).
            "baseline_settings": ["parallel"],
            "baseline_rows": len(few),
            "baseline_seconds": base,
            "baseline_rows_per_s": round(base_rate),
            "ratio": round(rate / base_rate, 4),
            "parallel": in_flight,
            "max_connections": pool_size,
            "repeat": repeat,
            "runs": {"seconds": seconds, "baseline_seconds": baseline_seconds},
            **environment_info(),
        }
    ]


register(
    Route(
        name=POOLING_ROUTE,
        description="single-record reads: pooled AsyncDatabase (PostgreSQL) vs asyncpg.connect per read, --parallel in flight",
        baseline_name="asyncpg.connect per read",
        run=run_records_pooling,
        services=_postgres_service,
    )
)
