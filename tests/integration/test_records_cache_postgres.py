"""The record and query caches on a real PostgreSQL 15: a cache hit costs no round trip, a write invalidates.

Two witnesses that a call reached the server: the store's PerformanceMonitor
(it times every call that reaches the store) and the server's own
``pg_stat_activity``, where every statement a session runs moves its
``query_start``. The store's sessions carry their own ``application_name``,
so the observer sees exactly them.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ferry.backends.monitor import PerformanceMonitor
from ferry.backends.records import AsyncDatabase, Query, Record
from tests.integration.pg_server import postgres_server  # noqa: F401

APP = "ferry-cache-test"
CACHE = {"records": {"ttl_seconds": 60, "max_entries": 10_000}, "queries": {"max_entries": 256}}


class FakeClock:
    """A clock stepped by hand, so the TTL is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(server, **extra) -> dict:
    return {**server.settings(schema="records_cache"), "application_name": APP, "min_connections": 2, **extra}


async def _store_statements(observer: asyncpg.Connection) -> dict[int, tuple]:
    """Per session of the store: when its latest statement started, and which it was."""
    rows = await observer.fetch(
        "SELECT pid, query_start, query FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
        APP,
    )
    return {row["pid"]: (row["query_start"], row["query"]) for row in rows}


def test_a_cached_read_batch_costs_no_round_trip_and_a_write_invalidates_it(postgres_server):
    async def main():
        monitor = PerformanceMonitor()
        db = await AsyncDatabase.create("postgres", {**_config(postgres_server), "cache": CACHE}, monitor=monitor)
        observer = await asyncpg.connect(postgres_server.dsn)
        try:
            await db.clear()
            ids = list(await db.create_batch([Record({"id": i, "name": f"n{i}", "tags": [i]}) for i in range(200)]))
            recent = ids[:100]
            first = await db.read_batch(recent)
            assert monitor.count("postgres.read_batch") == 1

            before = await _store_statements(observer)
            assert before, "the store's sessions are visible in pg_stat_activity"
            again = await db.read_batch(recent)
            assert again == first
            assert monitor.count("postgres.read_batch") == 1  # no call reached the store
            assert await _store_statements(observer) == before  # and no statement reached the server
            assert db.cache_stats()["records"]["hits"] == 100

            # A write through the same database invalidates what it wrote, and only that.
            assert await db.update(ids[0], Record({"id": 0, "name": "renamed", "tags": [0]}))
            after_write = await _store_statements(observer)
            assert after_write != before
            fresh = await db.read_batch(recent)
            assert fresh[0].fields["name"] == "renamed"
            assert [r.fields for r in fresh[1:]] == [r.fields for r in first[1:]]
            assert monitor.count("postgres.read_batch") == 2
            assert await _store_statements(observer) != after_write  # the re-read did go to the server
            assert db.cache_stats()["records"]["misses"] == 101  # 100 first, then the one invalidated id

            assert await db.delete(ids[1])
            assert (await db.read_batch(ids[:2]))[1] is None
            assert monitor.count("postgres.read_batch") == 3
        finally:
            await db.clear()
            await db.close()
            await observer.close()

    asyncio.run(main())


def test_a_cached_search_and_count_cost_no_round_trip_until_a_write(postgres_server):
    async def main():
        monitor = PerformanceMonitor()
        db = await AsyncDatabase.create("postgres", _config(postgres_server), cache=CACHE, monitor=monitor)
        observer = await asyncpg.connect(postgres_server.dsn)
        try:
            await db.clear()
            await db.create_batch([Record({"id": i, "group": i % 4}) for i in range(400)])
            query = Query({"group": {"eq": 2}}).sort("id").limit(20)
            first = await db.search(query)
            total = await db.count(Query({"group": {"eq": 2}}))
            assert len(first) == 20 and total == 100

            before = await _store_statements(observer)
            assert await db.search(query) == first
            assert await db.count(Query({"group": {"eq": 2}})) == 100
            assert await _store_statements(observer) == before
            assert (monitor.count("postgres.search"), monitor.count("postgres.count")) == (1, 1)

            await db.upsert(Record({"id": 1000, "group": 2}))
            assert await db.count(Query({"group": {"eq": 2}})) == 101
            assert monitor.count("postgres.count") == 2
            stats = db.cache_stats()["queries"]
            assert stats["hits"] == 2 and stats["invalidations"] == 2
        finally:
            await db.clear()
            await db.close()
            await observer.close()

    asyncio.run(main())


def test_a_write_by_another_session_is_unseen_until_the_ttl_runs_out(postgres_server):
    async def main():
        clock = FakeClock()
        db = await AsyncDatabase.create(
            "postgres", _config(postgres_server), cache={"records": {"ttl_seconds": 30}}
        )
        db.cache.set_clock(clock)
        observer = await asyncpg.connect(postgres_server.dsn)
        try:
            await db.clear()
            await db.create(Record({"id": 1, "v": "old"}))
            assert (await db.read(1)).fields["v"] == "old"
            await observer.execute(
                """UPDATE records_cache.records SET data = '{"id": 1, "v": "new"}' WHERE id = '1'"""
            )
            clock.now += 29
            assert (await db.read(1)).fields["v"] == "old"  # the documented staleness, bounded by the TTL
            clock.now += 2
            assert (await db.read(1)).fields["v"] == "new"
        finally:
            await db.clear()
            await db.close()
            await observer.close()

    asyncio.run(main())


def test_the_monitor_reports_the_store_pool_with_its_utilisation_and_slow_statements(postgres_server, caplog):
    async def main():
        monitor = PerformanceMonitor(slow_ms=0)
        db = await AsyncDatabase.create("postgres", _config(postgres_server, max_connections=7), monitor=monitor)
        try:
            await db.execute_query("SELECT id FROM records WHERE data->>'v' = $1", "a-bound-value")
            report = monitor.report_dict(pools=True)
            row = next(r for r in report["pools"].values() if r["kind"] == "postgres" and r["limits"]["max_size"] == 7)
            assert row["max_size"] == 7 and row["size"] >= 1
            assert row["in_use"] == row["size"] - row["idle"]
            assert row["utilisation"] == round(row["in_use"] / 7, 3)
            assert "utilisation" in monitor.report(pools=True)
        finally:
            await db.close()

    with caplog.at_level(logging.WARNING, logger="ferry.slow"):
        asyncio.run(main())
    slow = [r.getMessage() for r in caplog.records if "postgres.execute_query" in r.getMessage()]
    assert len(slow) == 1
    assert "SELECT id FROM records WHERE data->>'v' = $1 (1 bound value(s))" in slow[0]
    assert "a-bound-value" not in slow[0]
