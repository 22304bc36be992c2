"""The record cache and the query cache of AsyncDatabase, on the memory store.

Round trips are counted by a PerformanceMonitor on the store (it times the
calls that reach the store; cache hits never do).
"""

from __future__ import annotations

import asyncio

import pytest

from ferry.backends.errors import ConfigurationError
from ferry.backends.monitor import PerformanceMonitor
from ferry.backends.records import AsyncDatabase, Query, Record
from ferry.backends.records_cache import CacheSettings, LruTtlCache, query_key
from ferry.backends.records_memory import MemoryRecordSettings, MemoryRecordStore

RECORDS_ONLY = {"records": {"ttl_seconds": 60, "max_entries": 10_000}}
BOTH = {"records": {"ttl_seconds": 60, "max_entries": 10_000}, "queries": {"max_entries": 256}}


def _run(coro):
    return asyncio.run(coro)


async def _open(cache=BOTH, **config):
    monitor = PerformanceMonitor()
    db = await AsyncDatabase.create("memory", {**config, "cache": cache}, monitor=monitor)
    return db, monitor


class FakeClock:
    """A clock the test steps by hand, so TTLs are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- switching on ------------------------------------------------------------------------------


def test_caches_are_off_by_default_and_leave_the_store_untouched():
    async def main():
        db = await AsyncDatabase.create("memory", {})
        assert db.cache is None and db.cache_stats() == {}
        assert "read_batch" not in vars(db)  # no layer in the way
        await db.create(Record({"id": 1, "v": 1}))
        assert (await db.read(1)).fields == {"id": 1, "v": 1}

    _run(main())


def test_cache_section_enables_each_cache_and_bad_settings_are_refused():
    async def main():
        db, _ = await _open(RECORDS_ONLY)
        assert set(db.cache_stats()) == {"records"}
        db2, _ = await _open({"queries": True})
        assert set(db2.cache_stats()) == {"queries"}
        db3 = await AsyncDatabase.create("memory", {}, cache={"records": {}})
        assert db3.cache_stats()["records"]["max_entries"] == 10_000
        assert db3.cache_stats()["records"]["ttl_seconds"] == 60
        with pytest.raises(ConfigurationError, match="max_entries"):
            await AsyncDatabase.create("memory", {"cache": {"records": {"max_entries": 0}}})
        with pytest.raises(ConfigurationError, match="keys: records.ttl_seconds"):
            await AsyncDatabase.create("memory", {"cache": {"rows": {}}})
        with pytest.raises(ConfigurationError, match="given twice"):
            await AsyncDatabase.create("memory", {"cache": BOTH}, cache=BOTH)
        db4 = await AsyncDatabase.create("memory", {})
        db4.enable_cache()  # no argument: both caches with their defaults
        assert set(db4.cache_stats()) == {"records", "queries"}
        db4.disable_cache()
        assert db4.cache is None and "read_batch" not in vars(db4)

    _run(main())


# -- the record cache ----------------------------------------------------------------------------


def test_a_repeated_read_batch_is_served_without_reaching_the_store():
    async def main():
        db, monitor = await _open(RECORDS_ONLY)
        ids = list(await db.create_batch([Record({"id": i, "v": i}) for i in range(100)]))
        first = await db.read_batch(ids[:50])
        second = await db.read_batch(ids[:50])
        assert second == first
        assert monitor.count("memory.read_batch") == 1
        stats = db.cache_stats()["records"]
        assert (stats["misses"], stats["hits"], stats["entries"]) == (50, 50, 50)
        # Only the ids that missed reach the store, in one call.
        monitor.slow_ms = 0
        mixed = await db.read_batch(ids[40:60])
        assert [r.id for r in mixed] == ids[40:60]
        assert monitor.count("memory.read_batch") == 2
        assert monitor.slow_operations[-1]["detail"] == "read_batch of 10 id(s)"

    _run(main())


def test_absent_ids_are_not_cached_and_repeated_ids_get_their_own_copies():
    async def main():
        db, monitor = await _open(RECORDS_ONLY)
        await db.create(Record({"id": 1, "tags": ["a"]}))
        assert await db.read_batch(["1", "missing", "1"]) == [Record({"id": 1, "tags": ["a"]}, id="1"), None, Record({"id": 1, "tags": ["a"]}, id="1")]
        again = await db.read_batch(["1", "1"])
        assert again[0] is not again[1] and again[0].fields["tags"] is not again[1].fields["tags"]
        assert await db.read("missing") is None
        assert monitor.count("memory.read_batch") == 2  # the absent id went to the store again
        await db.create(Record({"id": "missing"}))
        assert (await db.read("missing")).id == "missing"

    _run(main())


def test_cached_records_cannot_be_changed_through_what_was_handed_out():
    async def main():
        db, _ = await _open(RECORDS_ONLY)
        await db.create(Record({"id": 1, "nested": {"list": [1, 2]}}, metadata={"m": [1]}))
        fetched = await db.read(1)  # the miss: this object came from the store
        fetched.fields["nested"]["list"].append(99)
        fetched.metadata["m"].append(99)
        hit = await db.read(1)
        assert hit.fields == {"id": 1, "nested": {"list": [1, 2]}} and hit.metadata == {"m": [1]}
        hit.fields["nested"]["list"].clear()
        hit.fields["new"] = True
        assert (await db.read(1)).fields == {"id": 1, "nested": {"list": [1, 2]}}
        assert db.cache_stats()["records"]["hits"] == 2

    _run(main())


@pytest.mark.parametrize("write", ["update", "upsert", "update_batch", "delete", "clear", "stream_write"])
def test_writes_through_the_same_database_invalidate_the_record(write):
    async def main():
        db, monitor = await _open(RECORDS_ONLY)
        await db.create_batch([Record({"id": i, "v": 0}) for i in range(3)])
        await db.read_batch(["0", "1", "2"])
        changed = Record({"id": 1, "v": 1})
        if write == "update":
            assert await db.update("1", changed)
        elif write == "upsert":
            await db.upsert(changed)
        elif write == "update_batch":
            assert (await db.update_batch([("1", changed), ("nope", changed)])).errors
        elif write == "delete":
            assert await db.delete("1")
        elif write == "clear":
            await db.clear()
        elif write == "stream_write":
            await db.delete("1")
            await db.read_batch(["1"])  # absent: not cached
            await db.stream_write([changed])
        found = await db.read("1")
        if write in ("delete", "clear"):
            assert found is None
        else:
            assert found.fields == {"id": 1, "v": 1}
        if write != "clear":
            # The other records stayed cached.
            before = monitor.count("memory.read_batch")
            assert (await db.read("0")).fields == {"id": 0, "v": 0}
            assert monitor.count("memory.read_batch") == before

    _run(main())


def test_writes_by_another_database_are_unseen_until_the_ttl_runs_out():
    async def main():
        clock = FakeClock()
        db, monitor = await _open({"records": {"ttl_seconds": 30}}, name="ttl-shared")
        db.cache.set_clock(clock)
        other = await AsyncDatabase.create("memory", {"name": "ttl-shared"})
        await other.create(Record({"id": 1, "v": "old"}))
        assert (await db.read(1)).fields["v"] == "old"
        await other.update("1", Record({"id": 1, "v": "new"}))  # another writer: no invalidation here
        clock.now += 29
        assert (await db.read(1)).fields["v"] == "old"  # stale, within the TTL
        clock.now += 2
        assert (await db.read(1)).fields["v"] == "new"  # expired: read from the store again
        stats = db.cache_stats()["records"]
        assert stats["expirations"] == 1 and monitor.count("memory.read_batch") == 2
        await other.clear()

    _run(main())


def test_the_record_cache_is_size_bounded_least_recently_used_first():
    async def main():
        db, monitor = await _open({"records": {"max_entries": 3}})
        await db.create_batch([Record({"id": i}) for i in range(5)])
        await db.read_batch(["0", "1", "2"])
        await db.read("0")  # 0 is now the most recently used
        await db.read_batch(["3", "4"])  # evicts 1 and 2
        stats = db.cache_stats()["records"]
        assert stats["entries"] == 3 and stats["evictions"] == 2
        calls = monitor.count("memory.read_batch")
        await db.read_batch(["0", "3", "4"])
        assert monitor.count("memory.read_batch") == calls
        await db.read("1")
        assert monitor.count("memory.read_batch") == calls + 1

    _run(main())


def test_exists_answers_from_the_record_cache():
    async def main():
        db, monitor = await _open(RECORDS_ONLY)
        await db.create(Record({"id": 1}))
        await db.read(1)
        assert await db.exists(1)
        assert monitor.count("memory.exists") == 0
        assert not await db.exists(2)
        assert monitor.count("memory.exists") == 1

    _run(main())


class _PausedReads(MemoryRecordStore):
    """A memory store whose read_batch pauses after reading, so a write can land in between."""

    def __init__(self) -> None:
        super().__init__(MemoryRecordSettings())
        self.read_done = asyncio.Event()
        self.go_on = asyncio.Event()

    async def read_batch(self, ids):
        found = await super().read_batch(ids)
        self.read_done.set()
        await self.go_on.wait()
        return found

    async def _read_batches(self, query, batch_size):
        async for batch in super()._read_batches(query, batch_size):
            self.read_done.set()
            await self.go_on.wait()
            yield batch


def test_a_read_racing_a_write_does_not_cache_what_the_write_replaced():
    async def main():
        db = _PausedReads()
        db.enable_cache(BOTH)
        await db.create(Record({"id": 1, "v": "old"}))
        reading = asyncio.ensure_future(db.read(1))
        await db.read_done.wait()  # the old row has been read, not yet cached
        await db.update("1", Record({"id": 1, "v": "new"}))
        db.go_on.set()
        assert (await reading).fields["v"] == "old"  # what the store had when it read
        assert (await db.read(1)).fields["v"] == "new"  # but the cache did not keep it

        db.read_done.clear()
        db.go_on.clear()
        searching = asyncio.ensure_future(db.search(Query({"v": {"eq": "new"}})))
        await db.read_done.wait()
        await db.delete("1")
        db.go_on.set()
        assert len(await searching) == 1
        assert await db.search(Query({"v": {"eq": "new"}})) == []

    _run(main())


# -- the query cache -----------------------------------------------------------------------------


def test_search_and_count_are_cached_by_the_canonical_query():
    async def main():
        db, monitor = await _open({"queries": {"max_entries": 256}})
        await db.create_batch([Record({"id": i, "group": i % 3}) for i in range(30)])
        first = await db.search(Query({"group": {"eq": 1}}).sort("id", "desc").limit(5))
        # Built another way, same canonical form: a hit.
        same = await db.search(Query().limit(5).where({"group": {"eq": 1}}).sort("id", "desc"))
        assert same == first and len(first) == 5
        assert monitor.count("memory.search") == 1
        assert await db.count(Query({"group": {"eq": 1}})) == 10
        assert await db.count(Query({"group": {"eq": 1}})) == 10
        assert monitor.count("memory.count") == 1
        assert await db.all() == await db.search()
        stats = db.cache_stats()["queries"]
        assert (stats["hits"], stats["misses"], stats["entries"]) == (3, 3, 3)

    _run(main())


def test_queries_with_literals_of_other_types_do_not_share_an_entry():
    async def main():
        db, _ = await _open({"queries": {}})
        await db.create_batch([Record({"id": 1, "v": 1}), Record({"id": 2, "v": "1"}), Record({"id": 3, "v": True})])
        assert [r.id for r in await db.search(Query({"v": {"eq": 1}}))] == ["1"]
        assert [r.id for r in await db.search(Query({"v": {"eq": "1"}}))] == ["2"]
        assert [r.id for r in await db.search(Query({"v": {"eq": True}}))] == ["3"]
        assert len({query_key("search", Query({"v": {"eq": v}})) for v in (1, "1", True, 1.5)}) == 4

    _run(main())


def test_any_write_empties_the_query_cache_and_results_are_copies():
    async def main():
        db, monitor = await _open({"queries": {}})
        await db.create(Record({"id": 1, "tags": ["a"]}))
        found = await db.search()
        found[0].fields["tags"].append("changed")
        hit = await db.search()
        assert hit[0].fields["tags"] == ["a"]
        await db.create(Record({"id": 2, "tags": []}))
        assert len(await db.search()) == 2
        assert monitor.count("memory.search") == 2
        assert db.cache_stats()["queries"]["invalidations"] >= 1

    _run(main())


def test_the_query_cache_is_a_bounded_lru_and_skips_large_results():
    async def main():
        db, monitor = await _open({"queries": {"max_entries": 2, "max_result_records": 5}})
        await db.create_batch([Record({"id": i, "v": i}) for i in range(10)])
        for limit in (1, 2, 3):
            await db.search(Query().limit(limit))
        stats = db.cache_stats()["queries"]
        assert stats["entries"] == 2 and stats["evictions"] == 1
        await db.search(Query().limit(1))  # evicted: the store again
        assert monitor.count("memory.search") == 4
        await db.search()  # 10 records: over max_result_records
        await db.search()
        assert monitor.count("memory.search") == 6
        assert db.cache_stats()["queries"]["oversized"] == 2

    _run(main())


def test_query_results_expire_after_their_ttl():
    async def main():
        clock = FakeClock()
        db, monitor = await _open({"queries": {"ttl_seconds": 5}})
        db.cache.set_clock(clock)
        await db.count()
        clock.now += 5
        await db.count()
        clock.now += 0.5
        await db.count()
        assert monitor.count("memory.count") == 2

    _run(main())


def test_keyword_arguments_and_one_shot_iterables_pass_through_the_layers():
    async def main():
        db, monitor = await _open(BOTH)
        created = await db.create_batch(records=(Record({"id": i}) for i in range(4)))
        assert list(created) == ["0", "1", "2", "3"]
        assert [r.id for r in await db.read_batch(ids=iter(["1", "2"]))] == ["1", "2"]
        assert [r.id for r in await db.read_batch(ids=["1", "2"])] == ["1", "2"]
        assert monitor.count("memory.read_batch") == 1
        assert list(await db.upsert_batch(items=[("1", Record({"v": 1}))])) == ["1"]
        assert (await db.read("1")).fields == {"v": 1}
        assert await db.delete_batch(ids=(i for i in ["2", "9"])) == [True, False]
        assert await db.count(query=Query()) == 3

    _run(main())


# -- the building blocks -----------------------------------------------------------------------


def test_lru_ttl_cache_counts_what_happens():
    clock = FakeClock()
    cache = LruTtlCache(max_entries=2, ttl_seconds=10, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") != 2 and len(cache) == 2
    clock.now += 11
    cache.get("a")
    cache.discard(["c", "zzz"])
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["expirations"], stats["invalidations"]) == (1, 2, 1, 1, 1)
    assert stats["entries"] == 0
    forever = LruTtlCache(max_entries=1, ttl_seconds=None, clock=clock)
    forever.put("k", "v")
    clock.now += 10**9
    assert forever.get("k") == "v"


def test_cache_settings_parse():
    assert CacheSettings.parse(None).enabled
    assert not CacheSettings.parse({}).enabled
    assert CacheSettings.parse({"records": False, "queries": True}).records is None
    with pytest.raises(ConfigurationError, match="mapping"):
        CacheSettings.parse(["records"])
    with pytest.raises(ConfigurationError, match="ttl_seconds"):
        CacheSettings.parse({"records": {"ttl_seconds": 0}})


# -- the record contract suite, with both caches and a monitor on --------------------------------
# The suite's tests are imported as they are and run on a cached store: the caches must keep every
# promise of the record API (results, order, errors, copies, stream bounds).

from tests.unit import test_records_contract as contract  # noqa: E402
from tests.unit.test_records_contract import *  # noqa: E402,F401,F403  (the suite's tests)


def _cached_memory_store(request: pytest.FixtureRequest):
    """A memory store with both caches and a monitor on."""
    return AsyncDatabase.create("memory", {"cache": BOTH}, monitor=PerformanceMonitor())


contract.STORE_FACTORIES["memory-cached"] = _cached_memory_store
store = contract.store_fixture("memory-cached")  # noqa: F811  (these run on a cached store)

