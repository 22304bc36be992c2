"""The performance guide's example calls, with the guide's exact arguments, on the memory store.

Each function body below is the guide's code (../shared/performance-guide.md),
changed only where the guide leaves something undefined (``process_chunk``,
``process_record``, ``logger``) or imports from ``dataknobs_data``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from ferry.backends.records import AsyncDatabase, Query, Record, StreamConfig, StreamResult
from ferry.backends.records_concurrency import RateLimitedDatabase

logger = logging.getLogger("guide")


# -- "Simple Benchmark Script" --------------------------------------------------------------


async def benchmark_backend(backend_type: str, config: dict, num_records: int = 1000):
    """Benchmark a backend's performance."""

    db = await AsyncDatabase.create(backend_type, config)
    records = [
        Record({"id": i, "data": f"test_{i}"})
        for i in range(num_records)
    ]

    # Benchmark writes
    start = time.perf_counter()
    ids = await db.create_batch(records)
    write_time = time.perf_counter() - start

    # Benchmark reads
    start = time.perf_counter()
    retrieved = await db.read_batch(ids)
    read_time = time.perf_counter() - start

    # Benchmark search
    start = time.perf_counter()
    results = await db.search(Query().limit(100))
    search_time = time.perf_counter() - start

    # Checks (not in the guide): the calls did what they say.
    assert len(ids) == num_records and ids.ok
    assert [r.fields for r in retrieved] == [r.fields for r in records]
    assert len(results) == 100

    # Cleanup
    await db.clear()
    await db.close()

    return {
        "write_rps": num_records / write_time,
        "read_rps": num_records / read_time,
        "search_ms": search_time * 1000,
    }


def test_simple_benchmark_script_on_memory():
    figures = asyncio.run(benchmark_backend("memory", {}))
    assert figures["write_rps"] > 555 and figures["read_rps"] > 555 and figures["search_ms"] < 1000


# -- "Bulk Insert Performance" ------------------------------------------------------------------


async def bulk_insert(db, records):
    # For small datasets (< 1000 records)
    if len(records) < 1000:
        return await db.create_batch(records)

    # For large datasets, use streaming
    async def record_generator():
        for record in records:
            yield record

    result = await db.stream_write(
        record_generator(),
        config=StreamConfig(
            batch_size=500,  # Optimal batch size
            parallel=True     # Enable parallel processing
        )
    )
    return result


def test_bulk_insert_small_and_large():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        small = await bulk_insert(db, [Record({"id": i, "data": f"test_{i}"}) for i in range(999)])
        assert list(small) == [str(i) for i in range(999)]
        large = await bulk_insert(db, [Record({"id": i, "data": f"test_{i}"}) for i in range(1000, 6000)])
        assert isinstance(large, StreamResult)
        assert (large.total, large.successful, large.failed, large.batches) == (5000, 5000, 0, 10)
        assert await db.count() == 5999
        await db.close()

    asyncio.run(main())


# -- "Bulk Read Performance" ----------------------------------------------------------------------

chunks: list[int] = []


async def process_chunk(records):
    chunks.append(len(records))


async def read_all_optimized(db, query=None):
    records = []

    # Use streaming for large result sets
    stream_config = StreamConfig(
        batch_size=1000,  # Fetch 1000 at a time
        buffer_size=5000   # Buffer up to 5000 records
    )

    async for record in db.stream_read(query, stream_config):
        records.append(record)

        # Process in chunks to avoid memory issues
        if len(records) >= 10000:
            await process_chunk(records)
            records = []

    # Process remaining records
    if records:
        await process_chunk(records)


def test_read_all_optimized():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        await db.create_batch([Record({"id": i, "data": f"test_{i}"}) for i in range(25_000)])
        chunks.clear()
        await read_all_optimized(db)
        assert chunks == [10000, 10000, 5000]
        chunks.clear()
        await read_all_optimized(db, Query({"data": {"like": "test_1%"}}))
        assert sum(chunks) == 1 + 10 + 100 + 1000 + 10000
        await db.close()

    asyncio.run(main())


# -- "Streaming for Large Datasets" -----------------------------------------------------------------


async def process_record(record):
    pass


async def process_large_dataset(db):
    processed = 0

    # Stream records instead of loading all into memory
    async for record in db.stream_read():
        # Process one record at a time
        await process_record(record)
        processed += 1

        # Periodic cleanup
        if processed % 10000 == 0:
            import gc
            gc.collect()
            logger.info(f"Processed {processed} records")
    return processed


def test_process_large_dataset():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        await db.create_batch([Record({"id": i, "data": f"test_{i}"}) for i in range(12_000)])
        assert await process_large_dataset(db) == 12_000
        await db.close()

    asyncio.run(main())


# -- "Semaphore for Rate Limiting" and "Monitoring" shapes --------------------------------------------


def test_rate_limited_database_and_single_calls():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        limited = RateLimitedDatabase(db, max_concurrent=10)
        record = Record({"id": 1, "data": "test_1"})
        assert await limited.create(record) == "1"
        query = Query().limit(100)
        assert len(await db.search(query)) == 1
        assert (await db.read("1")).fields == {"id": 1, "data": "test_1"}
        await db.close()

    asyncio.run(main())


def test_guide_query_cache_shape():
    import hashlib
    import json

    query = Query().limit(100)
    query_str = json.dumps(query.to_dict(), sort_keys=True)
    assert hashlib.md5(query_str.encode()).hexdigest() == hashlib.md5(
        json.dumps(Query().limit(100).to_dict(), sort_keys=True).encode()
    ).hexdigest()

