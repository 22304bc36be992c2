"""The record contract suite: every record store must pass it (docs/records.md).

Parametrized over ``STORE_FACTORIES``: a factory takes the pytest request (so
a server-backed store can ask for its server fixture with
``request.getfixturevalue(...)``) and returns an awaitable of an open store;
the suite clears it before and after each test. A store joins by adding one
entry, e.g. ``STORE_FACTORIES["postgres"] = lambda request: ...``, and a module
running the suite on it alone sets ``store = store_fixture("postgres")``.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Awaitable, Callable

import pyarrow as pa
import pytest

from ferry.backends.errors import ConfigurationError, DataError
from ferry.backends.records import (
    AsyncDatabase,
    BatchResult,
    Query,
    Record,
    StreamConfig,
    StreamResult,
    StreamWriteError,
)
from ferry.backends.records_reference import run_query

StoreFactory = Callable[[pytest.FixtureRequest], Awaitable[AsyncDatabase]]

STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda request: AsyncDatabase.create("memory", {}),
}


def run_on_fresh_store(factory: StoreFactory, request: pytest.FixtureRequest) -> Callable[[Callable[[AsyncDatabase], Awaitable[Any]]], Any]:
    """A function running ``body(db)`` on a store from ``factory``, cleared before and after."""

    def run(body: Callable[[AsyncDatabase], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = await factory(request)
            try:
                await db.clear()
                return await body(db)
            finally:
                await db.clear()
                await db.close()

        return asyncio.run(main())

    return run


def store_fixture(*names: str) -> Any:
    """The suite's ``store`` fixture over the factories ``names``.

    A module that runs the suite on its own store registers a factory, imports
    the tests and sets ``store = store_fixture("<name>")``.
    """

    @pytest.fixture(params=list(names))
    def store(request: pytest.FixtureRequest) -> Callable[[Callable[[AsyncDatabase], Awaitable[Any]]], Any]:
        """A function running ``body(db)`` on a fresh, empty store of each kind."""
        return run_on_fresh_store(STORE_FACTORIES[request.param], request)

    return store


store = store_fixture(*sorted(STORE_FACTORIES))


# -- single-record operations -------------------------------------------------------------


def test_single_record_operations(store):
    async def body(db: AsyncDatabase):
        record_id = await db.create(Record({"name": "Ada", "age": 36}, id="ada"))
        assert record_id == "ada"
        generated = await db.create(Record({"name": "Bob"}))
        assert isinstance(generated, str) and generated
        assert await db.exists("ada") and not await db.exists("nobody")
        assert (await db.read("ada")).fields == {"name": "Ada", "age": 36}
        assert (await db.read("ada")).id == "ada"
        assert await db.read("nobody") is None
        with pytest.raises(DataError, match="already exists"):
            await db.create(Record({"name": "again"}, id="ada"))

        assert await db.update("ada", Record({"name": "Ada L.", "age": 37}))
        assert (await db.read("ada")).fields == {"name": "Ada L.", "age": 37}
        assert not await db.update("nobody", Record({"x": 1}))

        assert await db.upsert("cy", Record({"name": "Cy"})) == "cy"
        assert await db.upsert(Record({"name": "Cy 2"}, id="cy")) == "cy"
        assert (await db.read("cy")).fields == {"name": "Cy 2"}

        assert await db.count() == 3
        assert await db.count(Query({"name": {"like": "C%"}})) == 1
        assert sorted(r.id for r in await db.all()) == sorted(["ada", "cy", generated])

        assert await db.delete("ada") and not await db.delete("ada")
        assert await db.count() == 2
        await db.clear()
        assert await db.count() == 0 and await db.all() == []

    store(body)


def test_id_field_is_the_record_id(store):
    async def body(db):
        ids = await db.create_batch([Record({"id": 7, "data": "x"}), Record({"id": "k", "data": "y"})])
        assert list(ids) == ["7", "k"]
        assert (await db.read(7)).fields == {"id": 7, "data": "x"}
        assert (await db.read("7")).id == "7"

    store(body)


def test_stored_records_are_isolated_from_the_caller(store):
    async def body(db):
        tags = ["a"]
        record = Record({"tags": tags, "n": 1}, id="r")
        await db.create(record)
        tags.append("changed")
        record.fields["n"] = 2
        read = await db.read("r")
        assert read.fields == {"tags": ["a"], "n": 1}
        read.fields["tags"].append("local")
        assert (await db.read("r")).fields["tags"] == ["a"]

    store(body)


# -- batch operations ---------------------------------------------------------------------


def test_create_batch_ids_in_input_order_and_per_record_errors(store):
    async def body(db):
        await db.create(Record({"v": 0}, id="taken"))
        records = [
            Record({"v": 1}, id="b"),
            Record({"v": 2}),  # generated id
            Record({"v": 3}, id="taken"),  # exists already
            Record({"v": 4}, id="a"),
            Record({"v": 5}, id="b"),  # duplicate inside the batch
            "not a record",
        ]
        result = await db.create_batch(records)
        assert isinstance(result, BatchResult) and len(result) == 6
        assert result[0] == "b" and result[3] == "a" and isinstance(result[1], str)
        assert result[2] is None and result[4] is None and result[5] is None
        assert result.failed_indices == [2, 4, 5]
        assert "already exists" in result.errors[0].reason and result.errors[0].id == "taken"
        assert "Record" in result.errors[2].reason
        assert not result.ok
        with pytest.raises(DataError, match="3 of 6"):
            result.raise_for_errors()
        assert await db.count() == 4
        assert (await db.read("taken")).fields == {"v": 0}  # not overwritten
        assert (await db.read("b")).fields == {"v": 1}

    store(body)


def test_read_update_delete_upsert_batches(store):
    async def body(db):
        ids = await db.create_batch([Record({"i": i}, id=f"r{i}") for i in range(5)])
        read = await db.read_batch(["r3", "missing", "r0", "r3"])
        assert [r.fields["i"] if r else None for r in read] == [3, None, 0, 3]
        assert [r.id if r else None for r in read] == ["r3", None, "r0", "r3"]

        updated = await db.update_batch([("r1", Record({"i": 10})), Record({"i": 20}, id="r2"), ("zz", Record({}))])
        assert list(updated) == ["r1", "r2", None] and updated.failed_indices == [2]
        assert "no record" in updated.errors[0].reason

        upserted = await db.upsert_batch([Record({"i": 30}, id="r3"), Record({"i": 99}, id="new")])
        assert list(upserted) == ["r3", "new"] and upserted.ok

        assert await db.delete_batch(["r0", "missing", "r0", "r4"]) == [True, False, False, True]
        remaining = {r.id: r.fields["i"] for r in await db.all()}
        assert remaining == {"r1": 10, "r2": 20, "r3": 30, "new": 99}
        assert list(ids) == [f"r{i}" for i in range(5)]

    store(body)


def test_large_batch_keeps_input_order(store):
    async def body(db):
        keys = [f"k{n}" for n in random.Random(3).sample(range(100_000), 5000)]
        ids = await db.create_batch([Record({"n": i}, id=k) for i, k in enumerate(keys)])
        assert list(ids) == keys
        read = await db.read_batch(list(reversed(keys)))
        assert [r.fields["n"] for r in read] == list(range(4999, -1, -1))

    store(body)


# -- search: paging and projection ------------------------------------------------------------


def test_offset_limit_select(store):
    async def body(db):
        await db.create_batch([Record({"n": i, "s": f"v{i:02d}", "extra": i * 2}, id=f"{i:03d}") for i in range(30)])
        page = await db.search(Query().sort("n").offset(10).limit(5))
        assert [r.fields["n"] for r in page] == [10, 11, 12, 13, 14]
        desc = await db.search(Query().sort("n", "desc").offset(28).limit(5))
        assert [r.fields["n"] for r in desc] == [1, 0]
        assert await db.search(Query().sort("n").offset(100)) == []
        assert await db.search(Query().limit(0)) == []
        projected = await db.search(Query({"n": {"lt": 3}}).sort("n").select("s", "missing"))
        assert [(r.id, r.fields) for r in projected] == [("000", {"s": "v00"}), ("001", {"s": "v01"}), ("002", {"s": "v02"})]
        assert await db.count(Query({"n": {"gte": 10}}).offset(5).limit(100)) == 15

    store(body)


# -- every operator against the reference evaluator ----------------------------------------------

_UNICODE = ["", "a", "A", "b", "é", "e\u0301", "Z", "ß", "日本", "😀", "a%b", "a_b", "x.y", "line\nbreak", "abc", "abd", "ab"]


def _random_fields(rng: random.Random) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    # Each field is missing, null or a value; few distinct values so that ties are common.
    choice = rng.random()
    if choice > 0.15:
        fields["n"] = None if choice < 0.25 else rng.choice([-2, 0, 1, 1, 2, 3, 2.5, 10, -0.5])
    choice = rng.random()
    if choice > 0.15:
        fields["s"] = None if choice < 0.25 else rng.choice(_UNICODE)
    choice = rng.random()
    if choice > 0.2:
        fields["b"] = None if choice < 0.3 else rng.choice([True, False])
    choice = rng.random()
    if choice > 0.3:
        fields["m"] = rng.choice([1, "1", 2, "x", True, None, 0.5])
    fields["k"] = rng.randrange(4)
    return fields


def _random_filters(rng: random.Random) -> list[dict[str, Any]]:
    strings = [s for s in _UNICODE if s]
    leaves = []
    for column, values in (("n", [-2, 0, 1, 2, 2.5, 10]), ("s", strings), ("m", [1, "1", "x", True]), ("b", [True, False])):
        value = rng.choice(values)
        for op in ("eq", "neq", "gt", "gte", "lt", "lte"):
            leaves.append({"column": column, "op": op, "value": value})
        leaves.append({"column": column, "op": "in", "value": rng.sample(values, 2)})
        leaves.append({"column": column, "op": "not_in", "value": rng.sample(values, 2)})
        low, high = sorted(rng.sample(values[:4] if column != "b" else values, 2), key=str) if column != "n" else sorted(rng.sample(values, 2))
        if column == "n" or column == "s":
            leaves.append({"column": column, "op": "between", "value": [low, high]})
        leaves.append({"column": column, "op": "exists", "value": True})
        leaves.append({"column": column, "op": "exists", "value": False})
    leaves.append({"column": "nope", "op": "eq", "value": 1})
    leaves.append({"column": "nope", "op": "neq", "value": 1})
    for pattern in ("a%", "%b", "a_b", "%", "_", "A%", "a\\%b", "日%", "%😀%", "line%"):
        leaves.append({"column": "s", "op": "like", "value": pattern})
    for pattern in ("a.*", "[a-z]+", "ab?[cd]?", "(?i)a.*", "日本|😀", "x\\.y", ".*", "[^a]+", "\\d", "a{1,2}b?"):
        leaves.append({"column": "s", "op": "regex", "value": pattern})
    leaves.append({"column": "m", "op": "like", "value": "%"})
    combined = []
    for _ in range(20):
        a, b = rng.sample(leaves, 2)
        combined.append({"and": [a, b]})
        combined.append({"or": [a, {"not": b}]})
        combined.append({"not": {"or": [a, b]}})
    return leaves + combined


def test_every_operator_matches_the_reference(store):
    rng = random.Random(20261126)
    items = [(f"id{i:03d}", _random_fields(rng)) for i in range(300)]

    async def body(db):
        ids = await db.create_batch([Record(fields, id=key) for key, fields in items])
        assert ids.ok
        checked = 0
        for spec in _random_filters(rng):
            query = Query(spec)
            expected = run_query(items, query)
            got = await db.search(query)
            assert sorted(r.id for r in got) == sorted(key for key, _ in expected), spec
            # Sorted on several keys with ties: the same ids in the same order.
            ordered = query.sort("k").sort("s", "desc").sort("n")
            expected_ordered = [key for key, _ in run_query(items, ordered)]
            assert [r.id for r in await db.search(ordered)] == expected_ordered, spec
            assert await db.count(query) == len(expected)
            checked += 1
        assert checked > 100

    store(body)


def test_sorting_mixed_kinds_nulls_and_code_points(store):
    items = [
        ("a", {"v": "b"}), ("b", {"v": "B"}), ("c", {"v": 2}), ("d", {"v": None}), ("e", {}),
        ("f", {"v": True}), ("g", {"v": "é"}), ("h", {"v": 1.5}), ("i", {"v": "b"}), ("j", {"v": False}),
    ]

    async def body(db):
        await db.create_batch([Record(fields, id=key) for key, fields in items])
        ascending = [r.id for r in await db.search(Query().sort("v"))]
        # strings by code point, then numbers, then booleans; nulls/missing last; ties by id.
        assert ascending == ["b", "a", "i", "g", "h", "c", "j", "f", "d", "e"]
        assert ascending == [k for k, _ in run_query(items, Query().sort("v"))]
        descending = [r.id for r in await db.search(Query().sort("v", "desc"))]
        assert descending == ["d", "e", "f", "j", "c", "h", "g", "a", "i", "b"]
        assert descending == [k for k, _ in run_query(items, Query().sort("v", "desc"))]

    store(body)


# -- streams ---------------------------------------------------------------------------------


def test_stream_write_collects_failures_with_exact_accounting(store):
    async def body(db):
        await db.create(Record({"n": -1}, id="dup7"))

        async def records():
            for i in range(1050):
                # Records 7 and 777 collide with existing ids; 500 is not a Record.
                if i == 500:
                    yield "bad"
                elif i in (7, 777):
                    yield Record({"n": i}, id="dup7")
                else:
                    yield Record({"n": i}, id=f"r{i}")

        result = await db.stream_write(records(), StreamConfig(batch_size=100, parallel=3, on_error="collect"))
        assert isinstance(result, StreamResult)
        assert (result.total, result.successful, result.failed) == (1050, 1047, 3)
        assert result.failed_indices == [7, 500, 777]
        assert [e.index for e in result.errors] == [7, 500, 777]
        assert all(e.reason for e in result.errors)
        assert result.batches == 11 and result.duration > 0 and not result.stopped
        assert len(result.ids) == 1050 and result.ids[7] is None and result.ids[8] == "r8"
        assert await db.count() == 1048

    store(body)


def test_stream_write_stops_at_the_first_failure(store):
    async def body(db):
        await db.create(Record({}, id="r150"))
        consumed = 0

        async def records():
            nonlocal consumed
            for i in range(10_000):
                consumed += 1
                yield Record({"n": i}, id=f"r{i}")

        with pytest.raises(StreamWriteError, match="on_error='collect'") as caught:
            await db.stream_write(records(), StreamConfig(batch_size=100, parallel=1, on_error="stop"))
        result = caught.value.result
        assert result.stopped and result.failed_indices == [150] and result.failed == 1
        assert result.total == result.successful + 1 and result.total < 10_000
        assert consumed <= result.total + 100  # the input stopped being read
        assert await db.count() == result.successful + 1

    store(body)


def test_stream_write_buffer_bounds_records_held(store):
    buffer_size = 300

    async def body(db):
        async def records():
            for i in range(3000):
                # Records read from the input and not yet written may never exceed buffer_size
                # (sampled: a count per record would be slow on a server-backed store).
                if i % 7 == 0:
                    assert i - await db.count() <= buffer_size
                yield Record({"n": i}, id=f"r{i}")

        config = StreamConfig(batch_size=100, buffer_size=buffer_size, parallel=8)
        assert config.write_slots == 3
        result = await db.stream_write(records(), config)
        assert result.successful == 3000 and await db.count() == 3000

    store(body)


def test_stream_write_parallel_sets_batches_in_flight(store):
    async def body(db):
        original = db._write_stream_batch
        in_flight = peak = 0

        async def slow_write(batch):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.01)
                return await original(batch)
            finally:
                in_flight -= 1

        db._write_stream_batch = slow_write
        for parallel, expected in ((1, 1), (3, 3), (True, 4)):
            peak = 0
            await db.clear()
            config = StreamConfig(batch_size=50, parallel=parallel)
            result = await db.stream_write((Record({"n": i}) for i in range(1000)), config)
            assert result.successful == 1000 and result.batches == 20
            assert peak == expected, (parallel, peak)

    store(body)


def test_stream_read_buffer_bounds_read_ahead(store):
    async def body(db):
        await db.create_batch([Record({"n": i}, id=f"{i:05d}") for i in range(2500)])
        produced = 0
        original = db._read_batches

        async def counting(query, batch_size):
            nonlocal produced
            async for batch in original(query, batch_size):
                produced += len(batch)
                yield batch

        db._read_batches = counting
        consumed = 0
        config = StreamConfig(batch_size=100, buffer_size=500)
        async for record in db.stream_read(Query().sort("n"), config):
            assert produced - consumed <= 500
            consumed += 1
            if consumed % 50 == 0:
                await asyncio.sleep(0)  # a slow consumer: the producer runs ahead as far as allowed
        assert consumed == 2500

        # Leaving early stops the producer.
        async for record in db.stream_read(None, StreamConfig(batch_size=10, buffer_size=20)):
            break

    store(body)


def test_stream_read_follows_the_query(store):
    async def body(db):
        await db.create_batch([Record({"n": i, "s": f"x{i % 3}"}, id=f"{i:04d}") for i in range(1234)])
        query = Query({"s": "x1"}).sort("n", "desc").offset(5).limit(300).select("n")
        streamed = [r async for r in db.stream_read(query, StreamConfig(batch_size=64, buffer_size=128))]
        assert [(r.id, r.fields) for r in streamed] == [(r.id, r.fields) for r in await db.search(query)]
        assert len(streamed) == 300 and streamed[0].fields == {"n": 1231 - 15}

    store(body)


def test_stream_read_batches_yields_arrow(store):
    async def body(db):
        await db.create_batch([Record({"n": i, "s": str(i)}, id=f"{i:03d}") for i in range(250)])
        schema = pa.schema([("_id", pa.string()), ("n", pa.int64()), ("s", pa.string())])
        batches = [b async for b in db.stream_read_batches(Query().sort("n"), StreamConfig(batch_size=100), schema=schema)]
        assert [b.num_rows for b in batches] == [100, 100, 50]
        table = pa.Table.from_batches(batches)
        assert table.column("n").to_pylist() == list(range(250))
        assert table.column("_id").to_pylist()[:2] == ["000", "001"]

    store(body)


def test_query_errors_say_what_to_do(store):
    async def body(db):
        with pytest.raises(ConfigurationError, match="outside the common subset"):
            await db.search(Query({"s": {"regex": "^a"}}))
        with pytest.raises(ConfigurationError, match="unknown operator"):
            Query({"s": {"greater": 1}})

    store(body)


def test_stream_write_counts_a_refused_batch_record_by_record(store):
    async def body(db):
        original = db._write_stream_batch

        async def refuse_second_batch(batch):
            if batch[0].fields["n"] == 100:
                raise DataError("the store refused this batch")
            return await original(batch)

        db._write_stream_batch = refuse_second_batch
        result = await db.stream_write(
            [Record({"n": i}, id=f"r{i}") for i in range(250)], StreamConfig(batch_size=100, on_error="collect")
        )
        assert (result.total, result.successful, result.failed, result.batches) == (250, 150, 100, 3)
        assert result.failed_indices == list(range(100, 200))
        assert result.errors[0].id == "r100" and "refused" in result.errors[0].reason
        assert await db.count() == 150

    store(body)


def test_stream_read_closed_early_stops_its_producer(store):
    async def body(db):
        await db.create_batch([Record({"n": i}, id=f"{i:04d}") for i in range(1000)])
        produced = 0
        original = db._read_batches

        async def counting(query, batch_size):
            nonlocal produced
            async for batch in original(query, batch_size):
                produced += len(batch)
                yield batch

        db._read_batches = counting
        stream = db.stream_read(None, StreamConfig(batch_size=10, buffer_size=30))
        first = [await stream.__anext__() for _ in range(5)]
        await stream.aclose()
        settled = produced
        await asyncio.sleep(0.01)
        assert len(first) == 5 and produced == settled <= 30

    store(body)
