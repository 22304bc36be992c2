"""Benchmark routes of the Elasticsearch / OpenSearch backend: ``memory-to-es`` and ``es-to-memory``.

Both run against an ``osmem-server`` (the in-memory OpenSearch-compatible
test server from PyPI) that the routes' ``services`` start once per
invocation on 127.0.0.1 and a free port, and stop by process id.

* ``memory-to-es``: generated orders -> an index through Ferry (mode replace,
  key ``order_id``, one bulk request in flight per partition, so
  ``--parallel P`` means P requests in flight); baseline
  ``helpers.async_bulk`` with the client's defaults (500-document chunks,
  one request at a time, no retries) over the same generated rows, into an
  index with the same mapping. Writes on this machine are bound by the test
  server (a few thousand documents per second), not by either client.
* ``es-to-memory``: the index (loaded once by Ferry, outside the clocks) ->
  Ferry's counting sink, ``--parallel P`` point-in-time slices; baseline
  ``helpers.async_scan`` (one scroll) plus ``RecordBatch.from_pylist`` of
  every B hits into the JSON form of the orders schema, then the same
  vectorized casts to the orders schema (timestamps, decimals).
* ``es-to-memory-pit``: the same Ferry job as ``es-to-memory``; baseline
  ``pit-search-after-from-pylist``: one bare point in time read page by page
  (``search_after`` on ``_shard_doc``, 10,000 hits a page, as Ferry reads a
  slice) plus the same ``from_pylist`` and casts. It separates what the
  server's point in time costs from what Ferry adds.

The osmem server answers 406 to the official client's vendor media type, so
the baselines' client uses Ferry's plain-JSON node class (the same bytes on
the wire as Ferry's); nothing else of Ferry is on their path.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from .harness import HarnessError, log, stop_process
from .routes import BaselineResult, FerryResult, Route, RunContext, _generated_orders, register

MEMORY_TO_ES = "memory-to-es"
ES_TO_MEMORY = "es-to-memory"

_URL_KEY = ("elasticsearch", "url")


@asynccontextmanager
async def osmem_service(ctx: RunContext) -> AsyncIterator[str]:
    """Start osmem-server for this invocation; its pid joins ``ctx.service_pids``."""
    try:
        from osmem_server import resolve_binary
    except ImportError:
        raise HarnessError("osmem-server is not installed: `.venv/bin/pip install osmem-server`") from None
    process = subprocess.Popen(
        [resolve_binary(), "--addr", "127.0.0.1:0", "--no-stdin-watch"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = await asyncio.to_thread(_ready_url, process)
        ctx.service_pids.add(process.pid)
        ctx.state[_URL_KEY] = url
        log(f"osmem-server {url} (pid {process.pid})")
        yield url
    finally:
        ctx.service_pids.discard(process.pid)
        ctx.state.pop(_URL_KEY, None)
        stop_process(process)
        if process.stdout is not None:
            process.stdout.close()


def _ready_url(process: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    buffer = b""
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"osmem-server exited with code {process.returncode} before it was ready")
        if select.select([fd], [], [], 0.2)[0]:
            buffer += os.read(fd, 4096)
            if b"\n" in buffer:
                return json.loads(buffer.split(b"\n", 1)[0])["url"]
    raise HarnessError("osmem-server printed no ready line within 30 s")


def _url(ctx: RunContext) -> str:
    try:
        return ctx.state[_URL_KEY]
    except KeyError:
        raise HarnessError("the osmem service is not running") from None


def _target(ctx: RunContext, index: str) -> dict[str, Any]:
    return {
        "backend": "elasticsearch",
        "hosts": [_url(ctx)],
        "dataset": index,
        "max_requests_in_flight": 1,
        "number_of_replicas": 0,
    }


def _plain_client(url: str):
    from elasticsearch import AsyncElasticsearch

    from ferry.backends.elasticsearch_client import PlainJsonNode

    return AsyncElasticsearch(url, node_class=PlainJsonNode)


async def _drop(url: str, *names: str) -> None:
    client = _plain_client(url)
    try:
        for name in names:
            await client.options(ignore_status=404).indices.delete(index=f"{name}-*")
            await client.options(ignore_status=404).indices.delete(index=name)
    finally:
        await client.close()


# -- memory-to-es ---------------------------------------------------------------------------


async def ferry_memory_to_es(ctx: RunContext, rows: int) -> FerryResult:
    """Generated orders -> an index through Ferry (replace, key order_id, verify off)."""
    await _drop(_url(ctx), "bench-orders")
    job = ctx.job("bench-memory-to-es", source=_generated_orders(ctx, rows), target=_target(ctx, "bench-orders"))
    job["key"] = ["order_id"]
    return await ctx.run_job(job)


async def es_async_bulk(ctx: RunContext, rows: int) -> BaselineResult:
    """``helpers.async_bulk`` with the client's defaults over the same generated rows."""
    import pyarrow as pa
    from elasticsearch import helpers

    from ferry.backends.elasticsearch_mapping import index_mapping
    from ferry.backends.generator import ORDERS_SCHEMA, generate_batches

    url = _url(ctx)
    started = time.perf_counter()
    await _drop(url, "bench-baseline")
    client = _plain_client(url)
    try:
        await client.indices.create(
            index="bench-baseline",
            settings={"index": {"number_of_replicas": 0, "refresh_interval": "-1"}},
            mappings=index_mapping(ORDERS_SCHEMA),
        )

        async def actions():
            for batch in generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size):
                for row in pa.Table.from_batches([batch]).to_pylist():
                    yield {"_index": "bench-baseline", "_id": row["order_id"], "_source": row}

        clock = time.perf_counter()
        written, errors = await helpers.async_bulk(client, actions(), raise_on_error=False)
        ended = time.perf_counter()
        if errors:
            raise HarnessError(f"async_bulk refused {len(errors)} document(s); first: {errors[0]}")
    finally:
        await client.close()
    return BaselineResult(rows=written, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=MEMORY_TO_ES,
        description="generated orders -> osmem-server index (Ferry: replace, key, 1 request in flight per partition)",
        ferry=ferry_memory_to_es,
        baseline_name="helpers-async-bulk",
        baseline=es_async_bulk,
        services=osmem_service,
    )
)


# -- es-to-memory ---------------------------------------------------------------------------


async def prepare_es_input(ctx: RunContext, rows: int) -> None:
    """Load the orders index once with Ferry (outside every clock); both sides read it."""
    await _drop(_url(ctx), "bench-input")
    job = ctx.job("bench-prepare-es", source=_generated_orders(ctx, rows), target=_target(ctx, "bench-input"))
    job["key"] = ["order_id"]
    job["target"]["max_requests_in_flight"] = 2
    started = time.perf_counter()
    result = await ctx.run_job(job)
    if result.summary.get("rows_written") != rows:
        raise HarnessError(f"loading the index wrote {result.summary.get('rows_written')} rows, expected {rows}")
    log(f"{ES_TO_MEMORY} {rows:,} rows: index loaded in {time.perf_counter() - started:.1f}s")


async def ferry_es_to_memory(ctx: RunContext, rows: int) -> FerryResult:
    """The index -> Ferry's counting sink, one point-in-time slice per partition."""
    job = ctx.job(
        "bench-es-to-memory",
        source={"backend": "elasticsearch", "hosts": [_url(ctx)], "dataset": "bench-input"},
        target={"backend": "memory", "dataset": "sink", "discard": True},
    )
    return await ctx.run_job(job)


def _json_schema(schema):
    """The orders schema as the JSON documents hold it (timestamps and decimals as text)."""
    import pyarrow as pa

    def json_type(t):
        if pa.types.is_timestamp(t) or pa.types.is_decimal(t):
            return pa.string()
        return t

    return pa.schema([pa.field(f.name, json_type(f.type)) for f in schema])


def _orders_converter():
    """``convert(sources) -> rows``: ``RecordBatch.from_pylist`` into the JSON schema, cast to the orders schema."""
    import pyarrow as pa

    from ferry.backends.generator import ORDERS_SCHEMA

    json_schema = _json_schema(ORDERS_SCHEMA)

    def convert(sources: list[dict]) -> int:
        batch = pa.RecordBatch.from_pylist(sources, schema=json_schema)
        columns = [c if c.type == f.type else c.cast(f.type) for c, f in zip(batch.columns, ORDERS_SCHEMA)]
        return pa.RecordBatch.from_arrays(columns, schema=ORDERS_SCHEMA).num_rows

    return convert


async def es_async_scan(ctx: RunContext, rows: int) -> BaselineResult:
    """``helpers.async_scan`` + ``RecordBatch.from_pylist`` of every B hits, cast to the orders schema."""
    from elasticsearch import helpers

    started = time.perf_counter()
    client = _plain_client(_url(ctx))
    convert = _orders_converter()
    seen = 0

    try:
        clock = time.perf_counter()
        sources: list[dict] = []
        async for hit in helpers.async_scan(client, index="bench-input"):
            sources.append(hit["_source"])
            if len(sources) >= ctx.batch_size:
                seen += convert(sources)
                sources = []
        if sources:
            seen += convert(sources)
        ended = time.perf_counter()
    finally:
        await client.close()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=ES_TO_MEMORY,
        description="osmem-server index (loaded by Ferry) -> Ferry's counting sink (point-in-time slices)",
        ferry=ferry_es_to_memory,
        baseline_name="helpers-async-scan-from-pylist",
        baseline=es_async_scan,
        prepare=prepare_es_input,
        services=osmem_service,
    )
)


# -- es-to-memory-scroll --------------------------------------------------------------------

ES_TO_MEMORY_SCROLL = "es-to-memory-scroll"


async def prepare_es_input_scroll(ctx: RunContext, rows: int) -> None:
    """The same input as es-to-memory (this route runs on its own server, so it loads its own copy)."""
    await prepare_es_input(ctx, rows)


async def ferry_es_to_memory_scroll(ctx: RunContext, rows: int) -> FerryResult:
    """The index -> Ferry's counting sink with ``read_mode: scroll`` (one sliced scroll per partition)."""
    job = ctx.job(
        "bench-es-to-memory-scroll",
        source={"backend": "elasticsearch", "hosts": [_url(ctx)], "dataset": "bench-input", "read_mode": "scroll"},
        target={"backend": "memory", "dataset": "sink", "discard": True},
    )
    return await ctx.run_job(job)


register(
    Route(
        name=ES_TO_MEMORY_SCROLL,
        description="osmem-server index (loaded by Ferry) -> Ferry's counting sink (read_mode scroll: sliced scroll)",
        ferry=ferry_es_to_memory_scroll,
        baseline_name="helpers-async-scan-from-pylist",
        baseline=es_async_scan,
        prepare=prepare_es_input_scroll,
        services=osmem_service,
    )
)


# -- es-to-memory-pit -----------------------------------------------------------------------

ES_TO_MEMORY_PIT = "es-to-memory-pit"
#: Hits per page of the bare point-in-time read (Ferry's default page for a point in time).
PIT_PAGE_SIZE = 10000


async def prepare_es_input_pit(ctx: RunContext, rows: int) -> None:
    """The same input as es-to-memory (this route runs on its own server, so it loads its own copy)."""
    await prepare_es_input(ctx, rows)


async def es_pit_search_after(ctx: RunContext, rows: int) -> BaselineResult:
    """One bare OpenSearch point in time, paged with ``search_after`` on ``_shard_doc``, + from_pylist and casts."""
    started = time.perf_counter()
    client = _plain_client(_url(ctx))
    convert = _orders_converter()
    seen = 0
    headers = {"accept": "application/json", "content-type": "application/json"}
    try:
        clock = time.perf_counter()
        opened = await client.perform_request(
            "POST", "/bench-input/_search/point_in_time", params={"keep_alive": "5m"}, headers=headers
        )
        pit_id = opened.body["pit_id"]
        after = None
        while True:
            body: dict[str, Any] = {
                "size": PIT_PAGE_SIZE,
                "pit": {"id": pit_id, "keep_alive": "5m"},
                "sort": [{"_shard_doc": "asc"}],
                "track_total_hits": False,
            }
            if after is not None:
                body["search_after"] = after
            response = await client.search(body=body)
            hits = response.body["hits"]["hits"]
            if not hits:
                break
            seen += convert([h["_source"] for h in hits])
            after = hits[-1]["sort"]
            if len(hits) < PIT_PAGE_SIZE:
                break
        ended = time.perf_counter()
        await client.perform_request("DELETE", "/_search/point_in_time", body={"pit_id": [pit_id]}, headers=headers)
    finally:
        await client.close()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=ES_TO_MEMORY_PIT,
        description="osmem-server index -> Ferry's counting sink (point-in-time slices) against one bare point-in-time read",
        ferry=ferry_es_to_memory,
        baseline_name="pit-search-after-from-pylist",
        baseline=es_pit_search_after,
        prepare=prepare_es_input_pit,
        services=osmem_service,
    )
)
