"""The object-store record store on a local folder: the contract suite, exact round trips, layout, concurrency.

The contract suite's tests (tests/unit/test_records_contract.py) are imported
as they are and run on a fresh folder under ``tmp_path``; the store's own
tests follow. The two-process tests start real OS processes (``spawn``)
that write to the same folder at the same time; ``concurrent_writer`` is
shared with the S3 tests in tests/integration/test_records_s3.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import random
import traceback
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ferry.backends import ObjectStoreBackend
from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import parse_filter
from ferry.backends.records import AsyncDatabase, Query, Record
from ferry.backends.records_objectstore import ObjectStoreRecordStore
from ferry.backends.records_objectstore_codec import build_table, decode, encode, typed_columns
from ferry.backends.records_objectstore_pushdown import prefilter
from ferry.backends.records_reference import compile_filter, run_query
from tests.unit import test_records_contract as contract
from tests.unit.test_records_contract import *  # noqa: F401,F403  (the suite's tests)


def local_store(request: pytest.FixtureRequest) -> Awaitable[AsyncDatabase]:
    """A record store in a fresh folder of this test's tmp_path."""
    folder = request.getfixturevalue("tmp_path") / "records-store"
    return AsyncDatabase.create("local", {"url": str(folder)})


contract.STORE_FACTORIES["local"] = local_store


store = contract.store_fixture("local")  # noqa: F811  (this module runs the suite on a local folder only)


def _run(coro):
    return asyncio.run(coro)


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


# -- exact round trips ---------------------------------------------------------------------------

_AWARE = dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
_VALUES: dict[str, Any] = {
    "int": 7,
    "zero": 0,
    "negative": -12,
    "big": 2**70,
    "big_negative": -(2**64) - 1,
    "float": 1.5,
    "whole_float": 2.0,
    "tiny": 5e-324,
    "huge": 1.7976931348623157e308,
    "minus_zero": -0.0,
    "inf": float("inf"),
    "minus_inf": float("-inf"),
    "true": True,
    "false": False,
    "null": None,
    "empty": "",
    "unicode": "é e\u0301 日本 😀 \x00 line\nbreak",
    "surrogate": "half \ud800 pair",
    "decimal": Decimal("1.10"),
    "decimal_big": Decimal("123456789012345678901234567890.000000001"),
    "date": dt.date(2024, 2, 29),
    "naive": dt.datetime(2024, 1, 1, 12, 30),
    "aware": _AWARE,
    "list": [1, "two", 3.0, None, [True, {"k": dt.date(2020, 1, 1)}]],
    "dict": {"a": {"b": [1, 2]}, "n": None},
    "empty_list": [],
    "empty_dict": {},
    "tag_like": {"$date": "2024-01-01"},
    "tag_like_map": {"$map": [["x", 1]]},
    "tag_like_decimal": {"$decimal": "1"},
    "dollar_key": {"$other": 1, "b": 2},
}


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (NaN equals NaN, -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (a != a and b != b) or (a == b and str(a) == str(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dt.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return a == b


def test_values_round_trip_exactly(tmp_path):
    fields = dict(_VALUES, nan=float("nan"))

    async def main():
        db = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        await db.create(Record(fields, id="all", metadata={"source": "test", "at": _AWARE, "n": 2**65}))
        await db.create(Record({"only": 1}, id="sparse"))
        stored = await db.read("all")
        assert _same(stored.fields, fields), stored.fields
        assert _same(stored.metadata, {"source": "test", "at": _AWARE, "n": 2**65})
        # The same through a query, a projection and after compaction.
        found = (await db.search(Query({"int": 7})))[0]
        assert _same(found.fields, fields)
        await db.compact()
        assert _same((await db.read("all")).fields, fields)
        projected = (await db.search(Query().select("null", "missing", "big").sort("int")))
        assert [(r.id, r.fields) for r in projected] == [("all", {"null": None, "big": 2**70}), ("sparse", {})]
        # Absent and null behave as in the reference evaluator.
        assert [r.id for r in await db.search(Query({"null": {"exists": False}}).sort("int"))] == ["all", "sparse"]
        assert [r.id for r in await db.search(Query({"only": {"exists": False}}))] == ["all"]
        assert "null" in (await db.read("all")).fields and "null" not in (await db.read("sparse")).fields
        await db.close()

    _run(main())


def test_codec_escapes_tags_and_refuses_what_it_cannot_store():
    for value in _VALUES.values():
        assert _same(decode(encode({"v": value}))["v"], value), value
    with pytest.raises(TypeError, match="strings"):
        encode({"v": {1: "int key"}})
    with pytest.raises(TypeError, match="set"):
        encode({"v": {1, 2}})
    assert encode({"a": 1, "b": "x"}) == '{"a":1,"b":"x"}'  # the common case is plain JSON


def test_unstorable_records_fail_one_by_one(tmp_path):
    async def main():
        db = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        result = await db.create_batch([Record({"ok": 1}, id="a"), Record({"bad": {1, 2}}, id="b"), Record({3: "x"}, id="c")])
        assert list(result) == ["a", None, None] and result.failed_indices == [1, 2]
        assert "cannot be stored" in result.errors[0].reason and result.errors[0].id == "b"
        assert await db.count() == 1
        await db.close()

    _run(main())


# -- the reference evaluator on values only Python knows ---------------------------------------------


def _rich_fields(rng: random.Random) -> dict[str, Any]:
    pool = [
        None, 0, 1, -1, 2.5, 2**53 + 1, 2**80, -(2**60), float("nan"), float("inf"), Decimal("1.5"), Decimal("0.1"),
        True, False, "", "a", "abc", "é", "😀", "1", "2024-01-01", dt.date(2024, 1, 1),
        dt.datetime(2024, 1, 1, 10), dt.datetime(2024, 1, 1, 10, tzinfo=dt.timezone.utc), [1], ["a"], {"k": 1},
    ]
    fields = {name: rng.choice(pool) for name in ("v", "w") if rng.random() > 0.15}
    fields["k"] = rng.randrange(3)
    for extra in range(rng.randrange(4)):
        fields[f"x{rng.randrange(6)}"] = rng.choice(pool)
    return fields


def _rich_filters(rng: random.Random) -> list[dict[str, Any]]:
    literals = [0, 1, -1, 2.5, 2**53 + 1, 2**80, float("nan"), float("inf"), True, False, "", "a", "é", "1",
                "2024-01-01", "2024-01-01T10:00", "2024-01-01T10:00Z"]
    leaves = []
    for column in ("v", "w", "x1", "nope"):
        for op in ("eq", "neq", "gt", "gte", "lt", "lte"):
            leaves.append({"column": column, "op": op, "value": rng.choice(literals)})
        leaves.append({"column": column, "op": "in", "value": rng.sample(literals, 3)})
        leaves.append({"column": column, "op": "not_in", "value": rng.sample(literals, 3)})
        leaves.append({"column": column, "op": "between", "value": sorted(rng.sample([0, 1, 2.5, 2**80, -1], 2))})
        leaves.append({"column": column, "op": "between", "value": ["2023-12-31", "2024-01-02"]})
        leaves.append({"column": column, "op": "exists", "value": rng.choice([True, False])})
        leaves.append({"column": column, "op": "like", "value": rng.choice(["a%", "%", "_", "é", "1"])})
        leaves.append({"column": column, "op": "regex", "value": rng.choice(["a.*", "(?i)A.*", "\\d+", ".*"])})
    combined = []
    for _ in range(25):
        a, b = rng.sample(leaves, 2)
        combined += [{"and": [a, b]}, {"or": [a, {"not": b}]}, {"not": {"or": [a, b]}}, {"not": {"and": [a, {"not": b}]}}]
    return leaves + combined


async def check_queries_against_reference(config: dict[str, Any], seed: int) -> None:
    """Every kind of value, several files, updates and deletes: each query returns the reference's answer."""
    rng = random.Random(seed)
    items = {f"r{i:03d}": _rich_fields(rng) for i in range(180)}
    db = await AsyncDatabase.create("s3" if str(config.get("url", "")).startswith("s3://") else "local", config)
    try:
        keys = list(items)
        for start in range(0, len(keys), 45):
            assert (await db.create_batch([Record(items[k], id=k) for k in keys[start : start + 45]])).ok
        # Newer versions in later files: updates, upserts and deletes.
        for key in rng.sample(keys, 40):
            items[key] = _rich_fields(rng)
            assert await db.update(key, Record(items[key]))
        for key in rng.sample(keys, 25):
            del items[key]
            assert await db.delete(key)
        reference = list(items.items())
        for spec in _rich_filters(rng):
            query = Query(spec)
            expected = run_query(reference, query)
            got = await db.search(query)
            assert sorted(r.id for r in got) == sorted(k for k, _ in expected), spec
            ordered = query.sort("k").sort("v", "desc")
            assert [r.id for r in await db.search(ordered)] == [k for k, _ in run_query(reference, ordered)], spec
    finally:
        await db.close()


@pytest.mark.parametrize("max_typed_fields", [64, 1])
def test_queries_match_the_reference_on_every_kind_across_versions(tmp_path, max_typed_fields):
    """Lists, dicts, dates, Decimals, NaN, huge ints; with 1 typed field most rows are "unshredded"."""
    _run(check_queries_against_reference({"url": str(tmp_path), "max_typed_fields": max_typed_fields}, 909 + max_typed_fields))


def test_pushdown_keeps_a_superset_and_is_exact_on_typed_values():
    """The Arrow expression never drops a match; on strings, exact numbers and booleans it is the reference."""
    rng = random.Random(5)
    typed_pool = [None, 0, 1, -1, 2.5, 2**53, -0.0, float("inf"), True, False, "", "a", "abc", "é", "😀", "1", "a\nb"]
    rows = []
    for i in range(400):
        fields = {}
        for name in ("v", "w"):
            if rng.random() > 0.2:
                fields[name] = rng.choice(typed_pool) if i < 300 else rng.choice([[1], {"a": 1}, Decimal("1"), 2**60 + 1])
        rows.append((f"{i:04d}", fields, encode(fields), None))
    table = build_table(rows, "0" * 20 + "-" + "0" * 16, 64)
    columns = {f.name: f.type for f in table.schema}
    for name in ("v", "w", "nope"):
        for column, kind in typed_columns(name).items():
            if column not in columns:
                table = table.append_column(pa.field(column, kind), pa.nulls(table.num_rows, kind))
    table = table.append_column("unshredded", pa.nulls(table.num_rows, pa.bool_()))
    dataset = pads.dataset(table)
    typed = {key for key, _, _, _ in rows if int(key) < 300}
    exact = 0
    for spec in _rich_filters(random.Random(6)) + contract._random_filters(random.Random(7)):
        spec = _rename(spec, {"s": "v", "n": "w", "m": "v", "b": "w", "x1": "w"})
        node = parse_filter(spec)
        expression = prefilter(node)
        kept = {key for key, _, _, _ in rows}
        if expression is not None:
            kept = set(dataset.to_table(filter=expression, columns=["id"])["id"].to_pylist())
        predicate = compile_filter(node)
        matching = {key for key, fields, _, _ in rows if predicate(fields)}
        assert matching <= kept, spec
        if _translatable(spec):
            assert kept & typed == matching & typed, spec
            exact += 1
    assert exact > 250


def _translatable(spec: Any) -> bool:
    """Whether every leaf maps exactly: no (?i) regex, no ordering against a number float64 cannot hold."""
    if "column" not in spec:
        items = spec.get("and") or spec.get("or") or [spec.get("not")]
        return all(_translatable(item) for item in items)
    op, value = spec["op"], spec.get("value")
    if op == "regex":
        return not value.startswith("(?i)")
    if op in ("gt", "gte", "lt", "lte", "between"):
        values = value if op == "between" else [value]
        return all(isinstance(v, (bool, str)) or v != v or float(v) == v for v in values)
    return True


def _rename(spec: Any, names: dict[str, str]) -> Any:
    if isinstance(spec, dict):
        return {k: (names.get(v, v) if k == "column" else _rename(v, names)) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_rename(item, names) for item in spec]
    return spec


# -- layout: one file per batch, compaction ------------------------------------------------------------


def test_one_parquet_file_per_written_batch(tmp_path):
    async def main():
        db = await AsyncDatabase.create("local", {"url": str(tmp_path), "dataset": "people"})
        folder = tmp_path / "people"
        await db.create_batch([Record({"n": i, "s": f"v{i}"}, id=f"p{i}") for i in range(1000)])
        files = _parquet_files(folder)
        assert len(files) == 1 and pq.read_metadata(files[0]).num_rows == 1000
        await db.update_batch([(f"p{i}", Record({"n": -i})) for i in range(10)])
        await db.upsert_batch([Record({"n": 5000}, id="p5000"), Record({"n": 1}, id="p1")])
        assert await db.delete_batch(["p2", "p3", "missing"]) == [True, True, False]
        await db.create_batch([Record({"n": 1}, id="p0")])  # refused: writes nothing
        files = _parquet_files(folder)
        assert [pq.read_metadata(f).num_rows for f in files] == [1000, 10, 2, 2]
        assert [f.name for f in files] == sorted(f.name for f in files)
        assert await db.data_files() == [str(f) for f in files]
        tombstones = pq.read_table(files[-1])
        assert tombstones["deleted"].to_pylist() == [True, True] and tombstones["fields"].null_count == 2
        # Every row holds the exact JSON plus typed copies for pushdown.
        first = pq.read_table(files[0])
        assert {"id", "stamp", "deleted", "fields", "metadata", "s.s", "n.n"} <= set(first.column_names)
        assert len(set(first["stamp"].to_pylist())) == 1
        assert await db.count() == 999 and (await db.read("p1")).fields == {"n": 1}
        await db.close()

    _run(main())


def test_compaction_keeps_the_newest_versions(tmp_path):
    async def main():
        db = await AsyncDatabase.create(
            "local", {"url": str(tmp_path), "compact_file_rows": 300, "tombstone_retention_seconds": 3600}
        )
        for start in range(0, 1000, 100):
            await db.create_batch([Record({"n": i}, id=f"r{i:04d}") for i in range(start, start + 100)])
        await db.update_batch([(f"r{i:04d}", Record({"n": -i})) for i in range(0, 1000, 7)])
        await db.delete_batch([f"r{i:04d}" for i in range(0, 1000, 11)])
        before = [(r.id, r.fields) for r in await db.search(Query().sort("n"))]
        result = await db.compact()
        assert result.files_read == 12 and result.rows_read == 1000 + 143 + 91
        # 909 live records plus the 91 recent tombstones, in files of at most 300 rows.
        assert (result.rows_written, result.tombstones_kept, result.files_written) == (1000, 91, 4)
        files = _parquet_files(tmp_path / "records")
        assert [pq.read_metadata(f).num_rows for f in files] == [300, 300, 300, 100]
        assert [(r.id, r.fields) for r in await db.search(Query().sort("n"))] == before
        assert await db.count() == 909 and await db.read("r0011") is None and (await db.read("r0007")).fields == {"n": -7}
        again = await db.compact()  # nothing superseded but the tombstones and several files: rewritten, same data
        assert again.rows_written == 1000
        await db.close()

        # With no retention the tombstones go too; an old tombstone then hides nothing that is left.
        db = await AsyncDatabase.create("local", {"url": str(tmp_path), "tombstone_retention_seconds": 0})
        result = await db.compact()
        assert (result.rows_written, result.tombstones_kept, result.files_written) == (909, 0, 1)
        assert [(r.id, r.fields) for r in await db.search(Query().sort("n"))] == before
        assert (await db.compact()).files_written == 0  # one file, nothing superseded: nothing to do
        await db.close()

    _run(main())


def test_a_second_store_sees_and_orders_the_first_ones_writes(tmp_path):
    async def main():
        one = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        two = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        assert one.writer_id != two.writer_id
        await one.create(Record({"v": 1}, id="x"))
        assert (await two.read("x")).fields == {"v": 1}
        with pytest.raises(Exception, match="already exists"):
            await two.create(Record({"v": 2}, id="x"))
        await two.update("x", Record({"v": 2}))
        await one.update("x", Record({"v": 3}))  # later stamp: wins
        assert (await two.read("x")).fields == {"v": 3} and await two.count() == 1
        assert await two.delete("x") and not await one.exists("x")
        await one.close()
        await two.close()

    _run(main())


def test_a_reused_listing_shows_other_writers_late_and_its_own_writes_at_once(tmp_path):
    async def main():
        # file_cache_bytes 0: a file compacted away cannot be served from memory, it must be found again.
        lazy = await AsyncDatabase.create(
            "local", {"url": str(tmp_path), "listing_max_age_seconds": 3.0, "file_cache_bytes": 0}
        )
        other = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        assert await lazy.count() == 0  # lists the (empty) folder
        await other.create(Record({"v": 1}, id="x"))
        await lazy.create(Record({"v": 2}, id="mine"))
        # Within the listing's age: the other store's record is not seen yet, its own is.
        assert not await lazy.exists("x") and (await lazy.read("mine")).fields == {"v": 2}
        await asyncio.sleep(3.1)
        assert (await lazy.read("x")).fields == {"v": 1} and await lazy.count() == 2

        await lazy.close()

        # Another store compacts away the files a young listing holds: a read lists again and finds the merged file.
        await other.create_batch([Record({"n": i}, id=f"r{i}") for i in range(50)])
        await other.update_batch([(f"r{i}", Record({"n": -i})) for i in range(10)])
        patient = await AsyncDatabase.create(
            "local", {"url": str(tmp_path), "listing_max_age_seconds": 600, "file_cache_bytes": 0}
        )
        assert await patient.count() == 52
        assert (await other.compact()).files_read == 4
        records = {r.id: r.fields for r in await patient.search(Query())}
        assert len(records) == 52 and records["r3"] == {"n": -3} and records["r30"] == {"n": 30}
        await other.create(Record({"v": 3}, id="late"))
        assert await patient.read_batch(["r5", "x", "late"]) == [Record({"n": -5}, id="r5"), Record({"v": 1}, id="x"), None]
        await patient.close()
        await other.close()

    _run(main())


def test_concurrent_creates_of_one_id_in_one_store_succeed_once(tmp_path):
    async def main():
        db = await AsyncDatabase.create("local", {"url": str(tmp_path)})
        results = await asyncio.gather(
            *(db.create_batch([Record({"try": i}, id="same"), Record({"try": i}, id=f"own{i}")]) for i in range(12))
        )
        assert sum(result[0] == "same" for result in results) == 1
        assert await db.count() == 13
        deletes = await asyncio.gather(*(db.delete("same") for _ in range(6)))
        assert sorted(deletes) == [False] * 5 + [True]
        await db.close()

    _run(main())


def test_settings_are_checked(tmp_path):
    async def main():
        with pytest.raises(ConfigurationError, match="Parquet"):
            await AsyncDatabase.create("local", {"url": str(tmp_path), "format": "jsonl"})
        with pytest.raises(ConfigurationError, match="unknown key"):
            await AsyncDatabase.create("local", {"url": str(tmp_path), "table": "x"})
        with pytest.raises(ConfigurationError, match="dataset"):
            await AsyncDatabase.create("local", {"url": str(tmp_path), "dataset": "../up"})
        db = await AsyncDatabase.create("file", {"url": str(tmp_path)})
        assert isinstance(db, ObjectStoreRecordStore)
        await db.create(Record({"v": 1}, id="x"))
        await db.close()
        # A migration block's settings (a saved block loads as one): the default dataset, the same records.
        from_block = await AsyncDatabase.create("objectstore", ObjectStoreBackend(url=str(tmp_path), compression="zstd"))
        assert (await from_block.read("x")).fields == {"v": 1}
        await from_block.close()
        with pytest.raises(ConfigurationError, match="closed"):
            await db.count()

    _run(main())


# -- two processes writing at the same time ---------------------------------------------------------------


def concurrent_writer(
    config: dict[str, Any], name: str, start: Any, results: Any, batches: int, batch_rows: int, compact_every: int
) -> None:
    """One writer process: creates its own records, upserts the shared ones, deletes some, maybe compacts.

    Waits at the ``start`` barrier so that both processes write at the same time; puts
    ``(name, summary)`` or ``(name, "error", traceback)`` on ``results``.
    """

    async def main() -> dict[str, Any]:
        db = await AsyncDatabase.create("s3" if str(config.get("url", "")).startswith("s3://") else "local", config)
        compactions = 0
        try:
            start.wait(120)  # both processes are ready: go
            for number in range(batches):
                await asyncio.sleep(0.02)  # paced, so that the two writers' batches interleave
                ids = [f"{name}-{number}-{i}" for i in range(batch_rows)]
                created = await db.create_batch([Record({"writer": name, "batch": number}, id=k) for k in ids])
                assert created.ok, created.errors[:1]
                # Both writers replace the same ids: last writer wins per id.
                await db.upsert_batch([Record({"writer": name, "batch": number}, id=f"shared-{i}") for i in range(5)])
                if number % 4 == 3:
                    assert await db.delete(ids[0])
                if compact_every and number % compact_every == compact_every - 1:
                    await db.compact()
                    compactions += 1
            return {"writer": db.writer_id, "compactions": compactions}
        finally:
            await db.close()

    try:
        results.put((name, asyncio.run(main())))
    except BaseException:
        results.put((name, "error", traceback.format_exc()))


def run_two_writers(config: dict[str, Any], batches: int, batch_rows: int, compact_every: tuple[int, int]) -> dict:
    """Start two writer processes on ``config`` at the same moment; their summaries by name."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = context.Queue()
    processes = [
        context.Process(
            target=concurrent_writer, args=(config, name, start, results, batches, batch_rows, every), daemon=True
        )
        for name, every in zip(("a", "b"), compact_every)
    ]
    for process in processes:
        process.start()
    try:
        summaries = {}
        for _ in processes:
            item = results.get(timeout=300)
            assert len(item) == 2, item[2]
            summaries[item[0]] = item[1]
        return summaries
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


async def check_two_writers(db: AsyncDatabase, summaries: dict, batches: int, batch_rows: int, files: list[pa.Table]) -> None:
    """Nothing lost, deletes applied, last writer wins per shared id by (time, writer id); writers overlapped."""
    expected = {
        f"{name}-{number}-{i}"
        for name in ("a", "b")
        for number in range(batches)
        for i in range(batch_rows)
        if not (number % 4 == 3 and i == 0)
    } | {f"shared-{i}" for i in range(5)}
    records = await db.all()
    assert sorted(r.id for r in records) == sorted(expected)  # every record once: no loss, no duplicate
    assert await db.count() == len(expected)
    # The newest version of each shared id by stamp, from the files themselves, is what the store returns.
    table = pa.concat_tables(files, promote_options="default")
    for i in range(5):
        rows = [(s, f) for k, s, f, d in zip(*(table[c].to_pylist() for c in ("id", "stamp", "fields", "deleted"))) if k == f"shared-{i}" and not d]
        stamp, fields = max(rows)
        assert (await db.read(f"shared-{i}")).fields == decode(fields)
        assert stamp.endswith(summaries[decode(fields)["writer"]]["writer"])
    # The two writers' files interleave in time: they really wrote at the same time.
    stamps = {name: [s for s in set(table["stamp"].to_pylist()) if s.endswith(summary["writer"])] for name, summary in summaries.items()}
    assert min(stamps["a"]) < max(stamps["b"]) and min(stamps["b"]) < max(stamps["a"])


def test_two_processes_writing_one_folder_lose_nothing(tmp_path):
    """Two writer processes at once, one of them compacting every 5 batches under the other's writes."""
    batches, batch_rows = 24, 20
    config = {"url": str(tmp_path)}
    summaries = run_two_writers(config, batches, batch_rows, (5, 0))
    assert summaries["a"]["compactions"] == 4 and summaries["b"]["compactions"] == 0

    async def main():
        db = await AsyncDatabase.create("local", config)
        files = [pq.read_table(f) for f in _parquet_files(tmp_path / "records")]
        await check_two_writers(db, summaries, batches, batch_rows, files)
        await db.close()

    _run(main())
