"""The PostgreSQL record store on a real PostgreSQL 15: the guide's calls and configs, layout, pushdown.

The guide's example functions are imported from tests/unit/test_records_guide.py
and called with the guide's arguments and its pool configs (read, write,
mixed, memory-optimized), on the session's cluster.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import asyncpg
import pytest

from ferry.backends import records_postgres_sql as rsql
from ferry.backends.errors import ConfigurationError
from ferry.backends.pools import get_pool_count, get_pool_info
from ferry.backends.records import AsyncDatabase, Query, Record, StreamConfig, StreamResult
from ferry.backends.records_query import Query as _Query
from ferry.backends.records_reference import run_query
from tests.integration.pg_server import postgres_server  # noqa: F401
from tests.unit import test_records_guide as guide

# The guide's pool configs, verbatim ("Pool Sizing" and "Connection Pool Memory").
read_config = {"min_connections": 20, "max_connections": 50, "connection_timeout": 10, "command_timeout": 30}
write_config = {"min_connections": 10, "max_connections": 30, "connection_timeout": 5, "command_timeout": 60}
mixed_config = {"min_connections": 15, "max_connections": 40, "connection_timeout": 10, "command_timeout": 45}
memory_optimized_config = {
    "min_connections": 5,
    "max_connections": 15,
    "max_inactive_connection_lifetime": 300,
    "max_queries": 50000,
}


def _config(server, pool: dict | None = None, schema: str = "records_guide", **extra) -> dict:
    """The guide's config plus where the test server listens (the guide assumes localhost:5432)."""
    return {**server.settings(schema=schema), **(pool or {}), **extra}


def _run(coro):
    return asyncio.run(coro)


# -- the guide's example calls ------------------------------------------------------------------


@pytest.mark.parametrize("name,pool", [("read", read_config), ("write", write_config), ("mixed", mixed_config), ("memory", memory_optimized_config)])
def test_simple_benchmark_script_with_the_guides_pool_configs(postgres_server, name, pool):
    figures = _run(guide.benchmark_backend("postgres", _config(postgres_server, pool)))
    assert figures["write_rps"] > 555 and figures["read_rps"] > 555 and figures["search_ms"] < 1000


def test_bulk_insert_create_batch_and_stream_write(postgres_server):
    async def main():
        db = await AsyncDatabase.create("postgres", _config(postgres_server, write_config))
        await db.clear()
        small = await guide.bulk_insert(db, [Record({"id": i, "data": f"test_{i}"}) for i in range(999)])
        assert list(small) == [str(i) for i in range(999)]
        large = await guide.bulk_insert(db, [Record({"id": i, "data": f"test_{i}"}) for i in range(1000, 6000)])
        assert isinstance(large, StreamResult)
        assert (large.total, large.successful, large.failed, large.batches) == (5000, 5000, 0, 10)
        assert await db.count() == 5999
        assert (await db.read(5999)).fields == {"id": 5999, "data": "test_5999"}
        await db.clear()
        await db.close()

    _run(main())


def test_read_all_optimized_streams_with_buffer_size(postgres_server):
    async def main():
        db = await AsyncDatabase.create("postgres", _config(postgres_server, read_config))
        await db.clear()
        await db.create_batch([Record({"id": i, "data": f"test_{i}"}) for i in range(25_000)])
        guide.chunks.clear()
        await guide.read_all_optimized(db)
        assert guide.chunks == [10000, 10000, 5000]
        guide.chunks.clear()
        await guide.read_all_optimized(db, Query({"data": {"like": "test_1%"}}))
        assert sum(guide.chunks) == 1 + 10 + 100 + 1000 + 10000
        assert await guide.process_large_dataset(db) == 25_000
        await db.clear()
        await db.close()

    _run(main())


def test_pool_monitoring_with_the_guides_configs(postgres_server):
    async def main():
        before = get_pool_count()
        stores = [await AsyncDatabase.create("postgres", _config(postgres_server, c)) for c in (read_config, write_config, mixed_config)]
        assert get_pool_count() == before + 3
        again = await AsyncDatabase.create("postgres", _config(postgres_server, read_config))  # same config: same pool
        assert get_pool_count() == before + 3 and again.get_pool_count() == before + 3
        info = get_pool_info()
        ours = {stats["config_hash"]: stats for stats in info.values() if stats["config_hash"] in {s._key for s in stores}}
        assert len(ours) == 3
        for pool_name, stats in info.items():  # the guide's loop
            print(f"Pool: {pool_name}")
            print(f"  Event Loop: {stats['loop_id']}")
            print(f"  Config Hash: {stats['config_hash']}")
        read_pool = ours[stores[0]._key]
        assert read_pool["limits"]["min_size"] == 20 and read_pool["limits"]["max_size"] == 50
        assert read_pool["users"] == 2 and read_pool["size"] >= 20
        assert read_pool["loop_id"] == id(asyncio.get_running_loop())
        for store in [*stores, again]:
            await store.close()
        assert get_pool_count() == before

    _run(main())


def test_prepared_statements_and_indexes_as_the_guide_shows(postgres_server):
    async def find_by_status(db, status):
        # Statement is prepared and cached
        query = """
            SELECT * FROM records 
            WHERE data->>'status' = $1
            ORDER BY created_at DESC
            LIMIT 100
        """
        return await db.execute_query(query, status)

    async def optimize_postgres(db):
        # JSONB GIN index for data field
        await db.execute("""
            CREATE INDEX IF NOT EXISTS idx_data_gin 
            ON records USING GIN (data)
        """)

        # B-tree index for timestamp queries
        await db.execute("""
            CREATE INDEX IF NOT EXISTS idx_created_at 
            ON records (created_at DESC)
        """)

        # Partial index for active records
        await db.execute("""
            CREATE INDEX IF NOT EXISTS idx_active 
            ON records (id) 
            WHERE data->>'status' = 'active'
        """)

    async def main():
        db = await AsyncDatabase.create("postgres", _config(postgres_server, mixed_config, schema="records_sql"))
        await db.clear()
        await db.create_batch([Record({"status": "active" if i % 3 else "idle", "n": i}, id=f"r{i:04d}") for i in range(300)])
        await optimize_postgres(db)
        rows = await find_by_status(db, "active")
        assert len(rows) == 100 and all('"active"' in row["data"] for row in rows)
        assert len(await find_by_status(db, "idle")) == 100
        indexes = {r["indexname"] for r in await db.execute_query("SELECT indexname FROM pg_indexes WHERE schemaname = $1", "records_sql")}
        assert {"idx_data_gin", "idx_created_at", "idx_active", "records_data_gin", "records_created_at"} <= indexes
        await db.clear()
        await db.close()

    _run(main())


def test_from_config_reads_a_settings_file(postgres_server, tmp_path):
    path = tmp_path / "high-performance.yaml"
    path.write_text(
        "databases:\n"
        "  postgres:\n"
        f"    host: {postgres_server.host}\n"
        f"    port: {postgres_server.port}\n"
        f"    database: {postgres_server.database}\n"
        "    pool:\n"
        "      min_size: 2\n"
        "      max_size: 5\n"
        "      timeout: 10\n"
        "      max_queries: 100000\n"
        "      max_inactive_connection_lifetime: 600\n"
    )

    async def main():
        async with await AsyncDatabase.from_config(path, "postgres") as db:
            assert db.connection.max_connections == 5 and db.connection.max_queries == 100000
            await db.clear()
            assert await db.create(Record({"x": 1}, id="a")) == "a"
            assert (await db.read("a")).fields == {"x": 1}
            await db.clear()

    _run(main())


def test_bad_settings_say_what_to_do(postgres_server):
    with pytest.raises(ConfigurationError, match="invalid postgres store settings.*bogus"):
        _run(AsyncDatabase.create("postgres", {"bogus": 1}))
    with pytest.raises(ConfigurationError, match="min_connections"):
        _run(AsyncDatabase.create("postgres", _config(postgres_server, {"min_connections": 9, "max_connections": 2})))


# -- layout, indexes, pushdown ------------------------------------------------------------------


def _store(server, schema: str, **extra):
    return AsyncDatabase.create("postgres", _config(server, schema=schema, sslmode="disable", **extra))


def test_layout_and_declared_indexes(postgres_server):
    indexes = [
        {"fields": ["age"]},
        {"fields": ["tags"], "method": "gin"},
        {"expression": "(data ->> 'status')", "name": "status_text"},
        {"fields": ["age"], "where": "data ->> 'status' = 'active'"},
    ]

    async def main():
        db = await _store(postgres_server, "records_layout", table="people", indexes=indexes)
        columns = await db.execute_query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
            "records_layout",
            "people",
        )
        assert [(c["column_name"], c["data_type"]) for c in columns] == [
            ("id", "text"), ("data", "jsonb"), ("metadata", "jsonb"),
            ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
        ]
        names = await db.ensure_indexes()
        assert names[:2] == ["people_data_gin", "people_created_at"] and "status_text" in names
        assert await db.ensure_indexes() == names  # idempotent
        found = {
            r["indexname"]: r["indexdef"]
            for r in await db.execute_query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", "records_layout")
        }
        assert set(names) <= set(found)
        assert "USING gin (data)" in found["people_data_gin"]
        assert "USING gin (((data -> 'tags'::text)))" in found[names[3]]
        assert "WHERE" in found[names[5]] and "btree" in found[names[5]]
        with pytest.raises(ConfigurationError, match="either `fields`"):
            await _store(postgres_server, "records_layout", indexes=[{"fields": ["a"], "expression": "(id)"}])
        await db.close()

    _run(main())


def test_pushed_filters_use_the_gin_index(postgres_server):
    async def main():
        db = await _store(postgres_server, "records_plan")
        await db.clear()
        await db.create_batch([Record({"status": f"s{i % 50}", "name": f"n{i}"}, id=f"{i:05d}") for i in range(3000)])
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await conn.execute("ANALYZE records_plan.records; SET enable_seqscan = off")
            for spec in ({"status": "s7"}, {"status": {"in": ["s1", "s2"]}}, {"name": {"like": "n12%"}}, {"name": {"gt": "n5"}}):
                node = _Query(spec).filter_spec
                assert rsql.can_push(node)
                params = rsql.Params()
                plan = await conn.fetch(
                    f"EXPLAIN SELECT id FROM records_plan.records WHERE {rsql.filter_sql(node, params)}", *params.values
                )
                text = "\n".join(r[0] for r in plan)
                assert "records_data_gin" in text, (spec, text)
        finally:
            await conn.close()
        await db.clear()
        await db.close()

    _run(main())


def test_dates_lists_residual_filters_and_fallback_sorts_match_the_reference(postgres_server):
    rng = random.Random(7)
    base = dt.datetime(2024, 1, 1, 12, 0)
    values = [
        None, "2024-01-01", base, base.replace(tzinfo=dt.timezone.utc) + dt.timedelta(hours=1), dt.date(2024, 1, 2),
        [1, 2], {"a": 1}, "X", "x", 3, 2**70, True,
    ]
    items = []
    for i in range(200):
        fields = {"k": rng.randrange(3)}
        if rng.random() > 0.1:
            fields["v"] = rng.choice(values)
        fields["s"] = rng.choice(["abc", "ABC", "Äx", "x", "日本"])
        items.append((f"i{i:03d}", fields))
    queries = [
        Query({"v": {"gte": "2024-01-01T12:30"}}),
        Query({"v": "2024-01-02"}),
        Query({"v": {"neq": "2024-01-01"}}).sort("k").offset(3).limit(20),
        Query({"s": {"regex": "(?i)a.*"}}).sort("s", "desc").limit(7),
        Query({"and": [{"s": {"regex": "(?i)[a-z]+"}}, {"k": {"lt": 2}}]}).offset(5).limit(10).select("s"),
        Query().sort("v"),
        Query().sort("v", "desc").sort("s").offset(10).limit(30),
        Query({"v": {"exists": True}}).sort("v").select("v"),
        Query({"v": 2**70}),
    ]

    async def main():
        db = await _store(postgres_server, "records_kinds")
        await db.clear()
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        assert (await db.read("i000")).fields == items[0][1]
        for query in queries:
            expected = run_query(items, query)
            got = await db.search(query)
            if query.sort_keys:
                assert [(r.id, r.fields) for r in got] == expected, query
            else:
                assert sorted((r.id for r in got)) == sorted(k for k, _ in expected), query
            assert await db.count(query) == len(expected), query
        await db.clear()
        await db.close()

    _run(main())


def test_values_jsonb_cannot_hold_fail_one_record_only(postgres_server):
    async def main():
        db = await _store(postgres_server, "records_errors")
        await db.clear()
        result = await db.create_batch(
            [Record({"n": 1}, id="a"), Record({"n": float("nan")}, id="b"), Record({"s": "x\x00y"}, id="c"), Record({1: 2}, id="d"), Record({"n": 2}, id="e")]
        )
        assert list(result) == ["a", None, None, None, "e"] and result.failed_indices == [1, 2, 3]
        assert "NaN" in result.errors[0].reason and "NUL" in result.errors[1].reason and "field names" in result.errors[2].reason

        big = [Record({"n": i}, id=f"r{i}") for i in range(5000)]
        big[10] = Record({"n": 10}, id="a")  # exists: the optimistic COPY fails, the staging path reports it
        big[20] = Record({"n": float("inf")}, id="r20")
        stream = await db.stream_write(big, StreamConfig(batch_size=2500, on_error="collect"))
        assert (stream.total, stream.successful, stream.failed_indices) == (5000, 4998, [10, 20])
        assert await db.count() == 2 + 4998
        assert (await db.read("a")).fields == {"n": 1}
        await db.clear()
        await db.close()

    _run(main())


def test_a_saved_block_shares_its_pool_with_the_migration_backend(postgres_server):
    from ferry.backends.postgres import PostgresBackend

    block = PostgresBackend(**postgres_server.settings(schema="records_block", sslmode="disable", max_connections=4))

    async def main():
        migration = block.fresh()
        await migration.open()
        try:
            async with await AsyncDatabase.create("postgres", block) as db:
                shared = [s for s in get_pool_info().values() if s["kind"] == "postgres" and s["config_hash"] == block.config_hash()]
                assert len(shared) == 1 and shared[0]["users"] == 2
                await db.clear()
                record = Record({"when": dt.datetime(2024, 5, 1, 8, 30, tzinfo=dt.timezone.utc)}, id="m", metadata={"source": "app", "v": 2})
                await db.create(record)
                assert await db.read("m") == record
                assert await db.update("m", Record({"x": 1}))
                assert (await db.read("m")).metadata == {}
                assert await db.upsert(Record({"y": 2}, id="m", metadata={"k": dt.date(2024, 1, 1)})) == "m"
                assert (await db.read("m")).metadata == {"k": dt.date(2024, 1, 1)}
                await db.clear()
        finally:
            await migration.close()

    _run(main())


def _random_regex(rng: random.Random, depth: int = 0) -> str:
    atoms = ["a", "b", "A", ".", "\\d", "\\w", "\\s", "\\D", "\\W", "\\.", "[a-c]", "[^ab]", "[\\d_]", "é", "😀", "\\*", "-", " ", "x"]
    quantifiers = ["", "", "*", "+", "?", "{1,2}", "*?", "{2}", "{0,}", "+?"]
    parts = []
    for _ in range(rng.randint(1, 4)):
        if depth < 2 and rng.random() < 0.2:
            inner = "|".join(_random_regex(rng, depth + 1) for _ in range(rng.randint(1, 2)))
            atom = rng.choice(["(", "(?:"]) + inner + ")"
        else:
            atom = rng.choice(atoms)
        parts.append(atom + rng.choice(quantifiers))
    return "".join(parts)


def test_like_and_regex_agree_with_the_reference_on_random_patterns(postgres_server):
    rng = random.Random(11)
    alphabet = ["a", "b", "A", "x", ".", "%", "_", "\\", "\n", "é", "e\u0301", "😀", "ß", "[", "]", "(", "*", "{", "}", "|", "-", "^", "$", "0", "9", " ", "\t", "'", '"']
    items = [(f"s{i:03d}", {"s": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))}) for i in range(300)]
    items += [("n1", {"s": None}), ("n2", {}), ("n3", {"s": ["ab"]}), ("n4", {"s": 5})]
    likes = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(80)]
    regexes = [_random_regex(rng) for _ in range(80)]

    async def main():
        db = await _store(postgres_server, "records_patterns")
        await db.clear()
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        for op, patterns in (("like", likes), ("regex", regexes)):
            for pattern in patterns:
                for spec in ({"s": {op: pattern}}, {"not": {"s": {op: pattern}}}):
                    query = Query(spec)
                    assert rsql.can_push(query.filter_spec)
                    expected = sorted(k for k, _ in run_query(items, query))
                    assert sorted(r.id for r in await db.search(query)) == expected, (spec, pattern)
        await db.clear()
        await db.close()

    _run(main())


def test_large_numbers_and_decimal_literals_match_the_reference(postgres_server):
    from decimal import Decimal

    numbers = [2**70, float(2**70), 2**70 - 5, 0.1, 2**53, 2**53 + 1, float(2**53), -(2**60), 1e300, 3]
    items = [(f"v{i}", {"v": value}) for i, value in enumerate(numbers)]
    literals = [2**70, float(2**70), 2**70 - 5, 0.1, Decimal("0.1"), 2**53, 2**53 + 1, float(2**53), 3, 3.0, 1e300]

    async def main():
        db = await _store(postgres_server, "records_numbers")
        await db.clear()
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        assert [(await db.read(k)).fields["v"] for k, _ in items] == numbers
        for literal in literals:
            for op in ("eq", "neq", "gt", "gte", "lt", "lte"):
                query = Query({"v": {op: literal}})
                expected = sorted(k for k, _ in run_query(items, query))
                assert sorted(r.id for r in await db.search(query)) == expected, (op, literal)
            query = Query({"v": {"in": [literal, 3]}}).sort("v", "desc")
            assert [r.id for r in await db.search(query)] == [k for k, _ in run_query(items, query)], literal
        assert [r.id for r in await db.search(Query().sort("v"))] == [k for k, _ in run_query(items, Query().sort("v"))]
        await db.clear()
        await db.close()

    _run(main())
