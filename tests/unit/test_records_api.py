"""Query, StreamConfig, the store registry, config sources and the concurrency helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from pydantic import ValidationError

from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import parse_filter
from ferry.backends.records import (
    AsyncDatabase,
    Query,
    Record,
    StreamConfig,
    record_store_names,
    register_record_store,
)
from ferry.backends.records_concurrency import gather_collect, max_concurrent, parallel_map
from ferry.backends.records_memory import MemoryRecordStore


def test_query_is_immutable_and_canonical():
    base = Query()
    limited = base.limit(100)
    assert base.limit_value is None and limited.limit_value == 100
    a = Query({"age": {"gte": 18, "lt": 65}}).sort("age", "DESC").sort("name").offset(5).limit(10).select("name")
    b = Query.from_dict(a.to_dict())
    assert a == b and hash(a) == hash(b)
    assert a.to_dict() == {
        "filter": {"and": [{"column": "age", "op": "gte", "value": 18}, {"column": "age", "op": "lt", "value": 65}]},
        "sort": [{"field": "age", "order": "desc"}, {"field": "name", "order": "asc"}],
        "offset": 5,
        "limit": 10,
        "select": ["name"],
    }
    # The guide's QueryCache hashes json.dumps(query.to_dict(), sort_keys=True).
    digest = hashlib.md5(json.dumps(a.to_dict(), sort_keys=True).encode()).hexdigest()
    assert digest == hashlib.md5(json.dumps(b.to_dict(), sort_keys=True).encode()).hexdigest()
    assert Query().filter("age", "gt", 3).where({"name": "x"}).filter_spec == parse_filter(
        {"and": [{"age": {"gt": 3}}, {"name": "x"}]}
    )
    assert Query().filter("name", "exists").to_dict()["filter"] == {"column": "name", "op": "exists", "value": True}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Query().limit(-1), "limit must be"),
        (lambda: Query().offset(1.5), "offset must be"),
        (lambda: Query().sort("a", "up"), "'asc' or 'desc'"),
        (lambda: Query({"a": {"eq": None}}), "exists: false"),
        (lambda: Query.from_dict({"where": {}}), "unknown query key"),
        (lambda: Query("a = 1"), "a mapping"),
    ],
)
def test_query_errors(build, message):
    with pytest.raises(ConfigurationError, match=message):
        build()


def test_stream_config():
    assert StreamConfig(batch_size=500, parallel=True).parallel == 4
    assert StreamConfig(parallel=False).parallel == 1
    config = StreamConfig(batch_size=1000, buffer_size=5000)
    assert config.read_ahead_batches == 5 and config.write_slots == 1
    assert StreamConfig(batch_size=500, parallel=True).effective_buffer_size == 2500
    assert StreamConfig(batch_size=100, buffer_size=250, parallel=4).write_slots == 2
    with pytest.raises(ValidationError, match="must hold at least one batch"):
        StreamConfig(batch_size=1000, buffer_size=10)
    with pytest.raises(ValidationError):
        StreamConfig(on_error="ignore")
    with pytest.raises(ValidationError):
        StreamConfig(batchsize=3)


def test_record():
    record = Record({"id": 3, "name": "x"}, metadata={"source": "t"})
    assert record.id is None and record.storage_id() == "3"
    assert record["name"] == "x" and record.get("nope", 1) == 1 and "name" in record
    assert Record({}, id="a") == Record({}, id="a") != Record({}, id="b")
    with pytest.raises(ConfigurationError, match="record id"):
        Record({}, id=True)
    with pytest.raises(ConfigurationError, match="mapping"):
        Record([("a", 1)])


def test_unknown_backend_and_settings_errors():
    with pytest.raises(ConfigurationError, match="no record store 'mongo'; record stores: .*memory"):
        asyncio.run(AsyncDatabase.create("mongo", {}))
    with pytest.raises(ConfigurationError, match="invalid memory store settings.*nmae"):
        asyncio.run(AsyncDatabase.create("memory", {"nmae": "x"}))
    assert "memory" in record_store_names()


def test_named_memory_stores_share_records_and_closed_stores_refuse():
    async def main():
        async with await AsyncDatabase.create("memory", {"name": "shared-test"}) as one:
            two = await AsyncDatabase.create("memory", {"name": "shared-test"})
            private = await AsyncDatabase.create("memory", {})
            await one.create(Record({"v": 1}, id="x"))
            assert await two.exists("x") and not await private.exists("x")
            await one.clear()
        with pytest.raises(ConfigurationError, match="closed"):
            await one.read("x")

    asyncio.run(main())


def test_saved_memory_block_as_config():
    from ferry.backends.memory import MemoryBackend

    async def main():
        db = await AsyncDatabase.create("memory", MemoryBackend())
        assert isinstance(db, MemoryRecordStore)
        await db.close()

    asyncio.run(main())


def test_from_config_reads_the_databases_section(tmp_path, monkeypatch):
    seen = {}

    class FakePostgres(MemoryRecordStore):
        """Stands in for the Postgres store (not written yet) to check what it is given."""

        @classmethod
        async def open(cls, config):
            seen["config"] = config
            return cls()

    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "databases:\n  postgres:\n    host: db.local\n    database: app\n    pool:\n      min_size: 2\n      max_size: 7\n"
    )
    from ferry.backends import records

    monkeypatch.setitem(records._STORES, "test-postgres", FakePostgres)
    register_record_store("test-postgres", FakePostgres)  # the public way; the patch undoes it

    async def main():
        db = await AsyncDatabase.from_config(settings, "postgres", backend="test-postgres")
        await db.close()
        seen["first"] = seen["config"]
        with pytest.raises(ConfigurationError, match="no databases.elasticsearch section"):
            await AsyncDatabase.from_config(settings, "elasticsearch")
        with pytest.raises(ConfigurationError, match="no databases.mysql section"):
            await AsyncDatabase.from_config(settings, "mysql")
        with pytest.raises(ConfigurationError, match="not found"):
            await AsyncDatabase.from_config(tmp_path / "nope.yaml", "postgres")
        # A bundled template by name: its postgres section (no postgres record store is registered here).
        db = await AsyncDatabase.from_config("high-performance", "postgres", backend="test-postgres")
        assert seen["config"].pool.max_connections == 50
        await db.close()

    asyncio.run(main())
    config = seen["first"]
    assert (config.host, config.database) == ("db.local", "app")
    assert (config.pool.min_connections, config.pool.max_connections) == (2, 7)

    bad = tmp_path / "bad.yaml"
    bad.write_text("databases:\n  postgres:\n    pool:\n      min_size: 9\n      max_size: 2\n")
    with pytest.raises(ConfigurationError, match="min_connections"):
        asyncio.run(AsyncDatabase.from_config(bad, "postgres", backend="test-postgres"))


def test_max_concurrent_wrapper_limits_calls():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        original = db.create_batch

        async def slow_create_batch(records):
            await asyncio.sleep(0.005)
            return await original(records)

        db.create_batch = slow_create_batch
        limited = max_concurrent(db, 3)
        ids = await asyncio.gather(*(limited.create(Record({"n": i}, id=f"r{i}")) for i in range(20)))
        assert ids == [f"r{i}" for i in range(20)]
        assert limited.peak_in_flight == 3
        assert await limited.count() == 20
        with pytest.raises(ValueError):
            max_concurrent(db, 0)
        await db.close()

    asyncio.run(main())


def test_gather_collect_keeps_every_result_and_error():
    running = peak = 0

    async def work(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        if i % 4 == 1:
            raise ValueError(f"item {i} failed")
        return i * 10

    result = asyncio.run(parallel_map(work, range(10), limit=3))
    assert result.results == [0, None, 20, 30, 40, None, 60, 70, 80, None]
    assert [(i, str(e)) for i, e in result.errors] == [(1, "item 1 failed"), (5, "item 5 failed"), (9, "item 9 failed")]
    assert peak == 3 and not result.ok
    with pytest.raises(ValueError, match="item 1 failed") as caught:
        result.raise_first()
    assert "2 other call(s) failed" in " ".join(caught.value.__notes__)
    ok = asyncio.run(gather_collect([asyncio.sleep(0, result=i) for i in range(3)]))
    assert ok.ok and ok.raise_first() == [0, 1, 2]


def test_memory_store_is_thread_safe():
    import threading

    async def writer(worker: int) -> None:
        db = await AsyncDatabase.create("memory", {"name": "threads-test"})
        for start in range(0, 2000, 100):
            result = await db.create_batch([Record({"w": worker}, id=f"{worker}-{i}") for i in range(start, start + 100)])
            assert result.ok
            assert len(await db.search(Query({"w": worker}).limit(50))) == 50
        await db.close()

    failures: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            asyncio.run(writer(worker))
        except BaseException as exc:  # surfaced below: an assert in a thread would not fail the test
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures

    async def check() -> None:
        db = await AsyncDatabase.create("memory", {"name": "threads-test"})
        assert await db.count() == 8000
        assert await db.count(Query({"w": 3})) == 2000
        await db.clear()

    asyncio.run(check())
