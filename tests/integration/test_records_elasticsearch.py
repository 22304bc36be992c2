"""The Elasticsearch record store on the osmem test server: layout, pushdown, paging, bulk, refresh, slowlog.

The contract suite (test_records_elasticsearch_contract.py) covers the API;
these tests cover what is particular to a search index: the pushed-down
query alone gives the reference evaluator's answer for every operator,
search_after paging past ``max_result_window``, bulk requests cut by bytes,
one ``mget`` per read, refresh and read-your-writes, slowlog settings read
back from the server, per-record errors and values that round-trip exactly.
Requests are observed through the OpenSearch-like stub in front of the
test server, which records every request it forwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import urllib.request
from decimal import Decimal
from typing import Any

import pytest

from ferry.backends import records_elasticsearch_query as rq
from ferry.backends.errors import ConfigurationError
from ferry.backends.pools import get_pool_info
from ferry.backends.records import AsyncDatabase, Query, Record, StreamConfig
from ferry.backends.records_reference import run_query
from tests.integration.es_server import es_server  # noqa: F401
from tests.integration.opensearch_stub import OpenSearchStub
from tests.unit.test_records_contract import _random_fields, _random_filters

pytestmark = pytest.mark.integration


def _http(url: str, method: str = "GET", body: Any = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def _run(coro):
    return asyncio.run(coro)


async def _store(url: str, index: str, **settings: Any) -> AsyncDatabase:
    db = await AsyncDatabase.create("elasticsearch", {"hosts": [url], "index": index, **settings})
    await db.clear()
    return db


def _server_ids(url: str, index: str, query: dict[str, Any]) -> list[str]:
    """Ids the index itself returns for ``query`` (no reference evaluator involved)."""
    body = {"query": query, "size": 1000, "_source": False, "sort": [{"rid": "asc"}]}
    return [hit["_id"] for hit in _http(f"{url}/{index}/_search", "POST", body)["hits"]["hits"]]


@pytest.fixture
def stub(es_server):  # noqa: F811
    """A fresh OpenSearch-like stub in front of the test server (its request log starts empty)."""
    server = OpenSearchStub(es_server)
    try:
        yield server
    finally:
        server.close()


def _requests(stub: OpenSearchStub, index: str) -> list[tuple[str, str]]:
    """(method, path) of the requests the stub saw, the index's and the bulk ones."""
    return [(m, p) for m, p, _, _ in stub.seen if p.startswith(f"/{index}/") or p.startswith("/_bulk")]


# -- the pushed-down query alone is exact ----------------------------------------------------------


def _kinds_items(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    base = dt.datetime(2024, 1, 1, 12, 0)
    values = [
        None, "2024-01-01", "2024-01-01T12:30:00+00:00", base, base.replace(tzinfo=dt.timezone.utc) + dt.timedelta(hours=1),
        dt.date(2024, 1, 2), dt.date(2023, 12, 31), [1, 2], {"a": 1}, "X", "x", 3, -0.0, 0, 2.5, True, False,
    ]
    items = []
    for i in range(200):
        fields = _random_fields(rng)
        if rng.random() > 0.1:
            fields["v"] = rng.choice(values)
        items.append((f"k{i:03d}", fields))
    return items


def _kinds_filters() -> list[dict[str, Any]]:
    filters = []
    for literal in ("2024-01-01", "2024-01-01T12:00", "2024-01-01T13:00+00:00", "2024-01-02", "x", 0, -0.0, 2.5, True, False):
        for op in ("eq", "neq", "gt", "gte", "lt", "lte"):
            filters.append({"column": "v", "op": op, "value": literal})
    filters += [
        {"v": {"between": ["2023-12-31", "2024-01-01T12:00"]}},
        {"v": {"between": [0, 3]}},
        {"v": {"between": [False, True]}},
        {"v": {"between": ["2024", 3]}},
        {"v": {"in": ["2024-01-02", 3, True]}},
        {"v": {"not_in": ["2024-01-02", 3, True]}},
        {"v": {"exists": False}},
        {"not": {"v": {"lt": "2024-01-01T12:30"}}},
    ]
    return filters


def test_every_operator_is_pushed_down_exactly(es_server):  # noqa: F811
    """For every operator the index alone returns the reference evaluator's records (no residual step)."""
    rng = random.Random(20261127)
    items = [(f"id{i:03d}", _random_fields(rng)) for i in range(300)] + _kinds_items(rng)
    specs = _random_filters(rng) + _kinds_filters()

    async def main():
        db = await _store(es_server, "records-pushdown")
        assert (await db.create_batch([Record(fields, id=key) for key, fields in items])).ok
        await db.refresh()
        exact = 0
        for spec in specs:
            query = Query(spec)
            expected = sorted(key for key, _ in run_query(items, query))
            es_query, is_exact = rq.translate(query.filter_spec, set())
            pushed = _server_ids(es_server, "records-pushdown", es_query)
            if is_exact:
                exact += 1
                assert pushed == expected, spec
            else:  # a superset, finished by the reference evaluator
                assert set(expected) <= set(pushed), spec
                assert "(?i)" in json.dumps(spec), spec
            assert sorted(r.id for r in await db.search(query)) == expected, spec
            ordered = query.sort("n", "desc").sort("v").sort("s", "desc")
            assert [r.id for r in await db.search(ordered)] == [k for k, _ in run_query(items, ordered)], spec
        assert exact >= len(specs) - 25
        await db.close()

    _run(main())


def _random_regex(rng: random.Random, depth: int = 0) -> str:
    atoms = ["a", "b", "A", ".", "\\d", "\\w", "\\s", "\\D", "\\W", "\\.", "[a-c]", "[^ab]", "[\\d_]", "é", "😀", "\\*",
             "-", " ", "x", "@", "~", "<", "#", '"', "&", "[]a]", "[a\\-]", "\\n", "\\t"]
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


def test_like_and_regex_on_random_patterns_match_the_reference(es_server):  # noqa: F811
    rng = random.Random(11)
    alphabet = ["a", "b", "A", "x", ".", "%", "_", "\\", "\n", "\t", "é", "e\u0301", "😀", "ß", "[", "]", "(", "*", "?",
                "{", "}", "|", "-", "^", "$", "0", "9", " ", "'", '"', "@", "~", "<", ">", "#", "&"]
    items = [(f"s{i:03d}", {"s": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))}) for i in range(300)]
    items += [("n1", {"s": None}), ("n2", {}), ("n3", {"s": ["ab"]}), ("n4", {"s": 5})]
    likes = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(80)]
    regexes = [_random_regex(rng) for _ in range(80)]

    async def main():
        db = await _store(es_server, "records-patterns")
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        await db.refresh()
        for op, patterns in (("like", likes), ("regex", regexes)):
            for pattern in patterns:
                for spec in ({"s": {op: pattern}}, {"not": {"s": {op: pattern}}}):
                    query = Query(spec)
                    expected = sorted(k for k, _ in run_query(items, query))
                    es_query, exact = rq.translate(query.filter_spec, set())
                    assert exact, (spec, pattern)
                    assert _server_ids(es_server, "records-patterns", es_query) == expected, (spec, pattern)
        await db.close()

    _run(main())


# -- values the index cannot hold exactly: superset plus the reference ------------------------------


def test_inexact_values_are_finished_by_the_reference(es_server):  # noqa: F811
    long_text = "é" * 9000  # over the keyword limit: stored, not indexed
    values = [2**70, float(2**70), 2**70 - 5, 2**53 + 1, 0.1, Decimal("0.1"), float("nan"), float("inf"), 3, 2.5, long_text,
              long_text + "b", "b", [3], {"k": 1}, None]
    items = [(f"v{i:02d}", {"v": value, "k": i % 3}) for i, value in enumerate(values)]
    queries = [
        Query({"v": {"gt": 2**69}}), Query({"v": 2**70}), Query({"v": {"eq": 2**70 - 5}}), Query({"v": {"neq": 3}}),
        Query({"v": {"gte": 0.1}}).sort("v"), Query({"v": {"lt": float("inf")}}), Query({"v": {"like": "é%"}}),
        Query({"v": {"gt": "a"}}).sort("v", "desc"), Query({"v": {"not_in": [long_text, 3]}}),
        Query({"not": {"v": {"regex": "é+b?"}}}).offset(2).limit(5), Query().sort("v"),
        Query().sort("v", "desc").offset(3).limit(6).select("v"), Query({"v": {"exists": True}}).sort("k").sort("v"),
        Query({"v": {"gt": 2**53}}).offset(1).limit(2),
    ]

    async def main():
        db = await _store(es_server, "records-inexact")
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        for query in queries:
            expected = run_query(items, query)
            got = await db.search(query)
            if query.sort_keys:
                assert [r.id for r in got] == [k for k, _ in expected], query
            else:
                assert sorted(r.id for r in got) == sorted(k for k, _ in expected), query
            assert await db.count(query) == len(expected), query
        read = await db.read_batch([k for k, _ in items])
        for (key, fields), record in zip(items, read):
            if isinstance(fields["v"], float) and fields["v"] != fields["v"]:
                assert record.fields["v"] != record.fields["v"]
            else:
                assert record.fields == fields and type(record.fields["v"]) is type(fields["v"]), key
        await db.close()

    _run(main())


def test_values_and_field_names_round_trip_and_stay_queryable(es_server):  # noqa: F811
    moment = dt.datetime(2024, 5, 1, 8, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    fields = {
        "_id": "not the id", "_source": 1, "_index": [1, 2], "_routing": {"x": None}, "rid": "r", "src": "s", "ix": 7,
        "a.b": 1.5, "": "empty name", ".": True, "日本": "語", "with space": -0.0, "big": 2**80, "neg": -(2**63) - 1,
        "when": moment, "naive": dt.datetime(2024, 1, 1), "day": dt.date(1999, 12, 31), "price": Decimal("12.340"),
        "nested": {"list": [1, "two", {"three": [3.0, None]}], "empty": {}}, "empty": [], "nul": "a\x00b", "none": None,
    }

    async def main():
        db = await _store(es_server, "records-values")
        await db.create(Record(fields, id="x", metadata={"source": "app", "at": dt.date(2024, 1, 1)}))
        await db.create(Record({"_id": "other", "a.b": 0.5}, id="y"))
        read = await db.read("x")
        assert read.fields == fields and read.metadata == {"source": "app", "at": dt.date(2024, 1, 1)}
        assert type(read.fields["big"]) is int and type(read.fields["price"]) is Decimal and read.fields["when"] == moment
        assert str(read.fields["with space"]) == "-0.0"
        assert [r.id for r in await db.search(Query({"_id": "not the id"}))] == ["x"]
        assert [r.id for r in await db.search(Query({"a.b": {"gt": 1}}))] == ["x"]
        assert [r.id for r in await db.search(Query({"日本": {"like": "語%"}}).where({".": True}))] == ["x"]
        assert [r.id for r in await db.search(Query({"when": {"gte": "2024-05-01T06:30:15.123456Z"}}))] == ["x"]
        assert [r.id for r in await db.search(Query({"when": {"gt": "2024-05-01T06:30:15.123456Z"}}))] == []
        assert [r.id for r in await db.search(Query().sort("a.b"))] == ["y", "x"]
        assert [r.id for r in await db.search(Query({"none": {"exists": False}}).sort("_id", "desc"))] == ["y", "x"]
        assert (await db.search(Query({"ix": 7}).select("rid", "src", "missing")))[0].fields == {"rid": "r", "src": "s"}
        await db.close()

    _run(main())


# -- search_after beyond max_result_window ------------------------------------------------------


def test_search_after_pages_beyond_max_result_window(es_server, stub):  # noqa: F811
    window = 20
    items = [(f"r{i:03d}", {"n": i % 17, "s": f"v{i % 5}", "i": i}) for i in range(130)]
    queries = [
        Query().sort("n").sort("i"), Query().sort("n").offset(19).limit(3), Query().sort("n", "desc").offset(20).limit(45),
        Query({"s": {"neq": "v1"}}).sort("s").offset(61).limit(30), Query().offset(125), Query().offset(200),
        Query({"n": {"lt": 9}}).offset(55), Query({"n": {"gte": 3}}).sort("i", "desc").offset(40).limit(100).select("i"),
    ]

    async def main():
        db = await _store(stub.url, "records-window", index_settings={"max_result_window": window})
        assert db.max_result_window == window
        settings = _http(f"{es_server}/records-window/_settings?flat_settings=true")
        assert settings["records-window"]["settings"]["index.max_result_window"] == str(window)
        assert (await db.create_batch([Record(f, id=k) for k, f in items])).ok
        stub.seen.clear()
        for query in queries:
            expected = run_query(items, query)
            assert [(r.id, r.fields) for r in await db.search(query)] == expected, query
            assert await db.count(query) == len(expected)
        streamed = [r.id async for r in db.stream_read(Query().sort("i"), StreamConfig(batch_size=50))]
        assert streamed == [k for k, _ in items]
        batches = [len(b) async for b in db.stream_read_batches(Query().sort("i"), StreamConfig(batch_size=50))]
        assert batches == [50, 50, 30]  # pages of the window, batches of batch_size
        searches = [p for m, p in _requests(stub, "records-window") if p.startswith("/records-window/_search")]
        assert len(searches) > 40  # many pages: the window is small
        await db.close()

    _run(main())


# -- bulk requests and mget ---------------------------------------------------------------------


def test_each_batch_is_one_bulk_request_cut_by_bytes_and_reads_are_one_mget(stub):
    records = [Record({"n": i, "text": "x" * 200}, id=f"r{i:03d}") for i in range(300)]

    async def main():
        db = await _store(stub.url, "records-bulk")
        stub.seen.clear()
        stub.handler.bulk_ids.clear()
        assert (await db.create_batch(records)).ok
        assert (await db.upsert_batch([Record({"n": -i}, id=f"r{i:03d}") for i in range(300)])).ok
        assert (await db.update_batch([(f"r{i:03d}", Record({"n": i})) for i in range(300)])).ok
        read = await db.read_batch([f"r{i:03d}" for i in reversed(range(300))] + ["missing"])
        assert [r.fields["n"] for r in read[:-1]] == list(reversed(range(300))) and read[-1] is None
        assert await db.delete_batch([f"r{i:03d}" for i in range(0, 300, 2)]) == [True] * 150
        sent = stub.handler.bulk_ids
        assert [len(ids) for ids in sent] == [300, 300, 300, 150]  # one bulk request per batch
        mgets = [p for m, p in _requests(stub, "records-bulk") if "/_mget" in p]
        assert len(mgets) == 1
        await db.close()

        small = await _store(stub.url, "records-bulk", chunk_max_bytes=16 * 1024, max_requests_in_flight=1)
        stub.handler.bulk_ids.clear()
        ids = await small.create_batch(records)
        assert list(ids) == [r.id for r in records]
        sent = stub.handler.bulk_ids
        assert len(sent) > 3 and [i for chunk in sent for i in chunk] == [r.id for r in records]
        assert await small.count() == 300
        await small.close()

    _run(main())


def test_per_record_errors_from_the_client_and_the_server(es_server):  # noqa: F811
    async def main():
        db = await _store(es_server, "records-errors", document_max_bytes=2048,
                          index_settings={"mapping.total_fields.limit": 40})
        await db.create(Record({"n": 0}, id="taken"))
        wide = {f"f{i}": i for i in range(30)}  # more fields than the index may map
        result = await db.create_batch([
            Record({"n": 1}, id="a"), Record({"n": 2}, id="taken"), Record({"n": 3}, id="a"), "not a record",
            Record({1: "x"}, id="b"), Record({"s": "\ud800"}, id="c"), Record({"s": "y" * 5000}, id="d"),
            Record(wide, id="e"), Record({"t": dt.time(1, 2)}, id="f"), Record({"n": 9}, id="g"),
        ])
        assert list(result) == ["a", None, None, None, None, None, None, None, None, "g"]
        reasons = {error.index: error.reason for error in result.errors}
        assert "already exists" in reasons[1] and "earlier in this batch" in reasons[2]
        assert "Record" in reasons[3] and "field names" in reasons[4] and "surrogate" in reasons[5]
        assert "document_max_bytes" in reasons[6] and "total fields" in reasons[7].lower() and "time" in reasons[8]
        assert {error.index: error.id for error in result.errors}[1] == "taken"
        assert {error.index: error.id for error in result.errors}[7] == "e"
        assert await db.count() == 3

        updated = await db.update_batch([("a", Record({"n": 10})), ("zz", Record({})), Record({"n": 1}), ("a", Record({"n": 11}))])
        assert list(updated) == ["a", None, None, "a"] and updated.failed_indices == [1, 2]
        assert "no record" in updated.errors[0].reason and "needs the record's id" in updated.errors[1].reason
        assert (await db.read("a")).fields == {"n": 11}  # the last write of an id wins
        await db.close()

    _run(main())


# -- refresh and read-your-writes -------------------------------------------------------------------


def test_refresh_options(stub):
    def refreshes() -> int:
        return sum(1 for m, p in _requests(stub, "records-refresh") if p.startswith("/records-refresh/_refresh"))

    def bulk_paths() -> list[str]:
        return [p for m, p in _requests(stub, "records-refresh") if p.startswith("/_bulk")]

    async def main():
        db = await _store(stub.url, "records-refresh")
        stub.seen.clear()
        await db.create_batch([Record({"n": i}, id=str(i)) for i in range(10)])
        assert bulk_paths() and all("refresh=false" in p for p in bulk_paths())  # the guide's bulk setting
        assert refreshes() == 0
        assert (await db.read("3")).fields == {"n": 3} and await db.exists("4")  # by id: real time, no refresh
        assert refreshes() == 0
        assert await db.count() == 10  # read your writes: one refresh before the first search after writes
        assert refreshes() == 1
        await db.search(Query({"n": {"gt": 4}}))
        assert refreshes() == 1
        await db.delete("0")
        assert await db.count() == 9 and refreshes() == 2
        await db.close()

        db = await _store(stub.url, "records-refresh", read_your_writes=False)
        stub.seen.clear()
        await db.create_batch([Record({"n": i}, id=f"b{i}") for i in range(5)])
        await db.count()
        assert refreshes() == 0
        await db.refresh()  # the explicit call
        assert refreshes() == 1
        await db.close()

        db = await _store(stub.url, "records-refresh", refresh="wait_for")
        stub.seen.clear()
        await db.create_batch([Record({"n": i}, id=f"w{i}") for i in range(5)])
        assert await db.count() == 5
        assert all("refresh=wait_for" in p for p in bulk_paths()) and refreshes() == 0
        await db.close()

    _run(main())


# -- slowlog ---------------------------------------------------------------------------------------


def test_slowlog_thresholds_are_set_and_read_back_from_the_server(es_server):  # noqa: F811
    guide = {
        "index.search.slowlog.threshold.query.warn": "10s",
        "index.search.slowlog.threshold.query.info": "5s",
        "index.search.slowlog.threshold.query.debug": "2s",
        "index.search.slowlog.threshold.query.trace": "500ms",
    }

    async def main():
        db = await _store(es_server, "records-slowlog", slowlog={"fetch.warn": "1s"})
        assert await db.get_slowlog() == {"index.search.slowlog.threshold.fetch.warn": "1s"}
        assert await db.set_slowlog(guide) == guide
        await db.set_slowlog(index_warn="3s", fetch_warn=None)
        on_server = _http(f"{es_server}/records-slowlog/_settings?flat_settings=true")["records-slowlog"]["settings"]
        expected = {**guide, "index.indexing.slowlog.threshold.index.warn": "3s"}
        assert {k: v for k, v in on_server.items() if "slowlog" in k} == expected
        assert await db.get_slowlog() == expected
        with pytest.raises(ConfigurationError, match="unknown slowlog threshold"):
            await db.set_slowlog({"query.fatal": "1s"})
        with pytest.raises(ConfigurationError, match="time value"):
            await db.set_slowlog(query_warn="ten seconds")
        await db.close()

    _run(main())


# -- settings, layout and pools ------------------------------------------------------------------


def test_the_guides_configs_and_a_settings_file(es_server, tmp_path):  # noqa: F811
    search_config = {"hosts": [es_server], "connections": 20, "maxsize": 50, "timeout": 30}
    index_config = {"hosts": [es_server], "connections": 10, "maxsize": 20, "refresh": False, "timeout": 60}
    path = tmp_path / "high-performance.yaml"
    path.write_text(
        "databases:\n"
        "  elasticsearch:\n"
        f"    hosts: [{es_server}]\n"
        "    pool:\n"
        "      connections: 30\n"
        "      maxsize: 30\n"
        "    index:\n"
        "      number_of_shards: 2\n"
        "      number_of_replicas: 0\n"
        '      refresh_interval: "30s"\n'
    )

    async def main():
        _http(f"{es_server}/_all", "DELETE")
        db = await AsyncDatabase.from_config(path, "elasticsearch")
        assert db.connection.connections_per_node == 30 and db.index == "records"
        settings = _http(f"{es_server}/records/_settings?flat_settings=true")["records"]["settings"]
        assert settings["index.number_of_shards"] == "2" and settings["index.refresh_interval"] == "30s"
        assert settings["index.number_of_replicas"] == "0"
        mapping = _http(f"{es_server}/records/_mapping")["records"]["mappings"]
        assert mapping["dynamic"] == "strict" and mapping["properties"]["src"] == {"type": "object", "enabled": False}
        assert mapping["properties"]["rid"] == {"type": "keyword"}
        await db.close()

        with pytest.warns(UserWarning, match="maxsize"):
            searcher = await AsyncDatabase.create("elasticsearch", search_config)
        with pytest.warns(UserWarning, match="maxsize"):
            indexer = await AsyncDatabase.create("opensearch", index_config)
        assert searcher.connection.connections_per_node == 50 and searcher.connection.request_timeout_seconds == 30
        assert indexer.settings.refresh is False and indexer.index == "records"
        limits = {s["config_hash"]: s["limits"] for s in get_pool_info().values()}
        assert limits[searcher.connection.config_hash()]["connections_per_node"] == 50
        await searcher.close()
        await indexer.close()

    _run(main())


def test_bad_settings_and_foreign_indexes_are_refused(es_server):  # noqa: F811
    _http(f"{es_server}/not-records", "PUT", {"mappings": {"properties": {"x": {"type": "keyword"}}}})
    with pytest.raises(ConfigurationError, match="not a record index"):
        _run(AsyncDatabase.create("elasticsearch", {"hosts": [es_server], "index": "not-records"}))
    with pytest.raises(ConfigurationError, match="unknown key.*bogus"):
        _run(AsyncDatabase.create("elasticsearch", {"hosts": [es_server], "bogus": 1}))
    with pytest.raises(ConfigurationError, match="slowlog"):
        _run(AsyncDatabase.create("elasticsearch", {"hosts": [es_server], "slowlog": {"query.warn": "soon"}}))


def test_a_saved_block_shares_its_pool_with_the_migration_backend(es_server):  # noqa: F811
    from ferry.backends.elasticsearch import ElasticsearchBackend

    block = ElasticsearchBackend(hosts=[es_server], maxsize=4)

    async def main():
        migration = block.fresh()
        await migration.open()
        try:
            async with await AsyncDatabase.create("elasticsearch", block) as db:
                shared = [s for s in get_pool_info().values() if s["config_hash"] == block.config_hash()]
                assert len(shared) == 1 and shared[0]["users"] == 2
                await db.clear()
                assert await db.create(Record({"x": 1}, id="m")) == "m"
                assert (await db.read("m")).fields == {"x": 1}
                await db.clear()
        finally:
            await migration.close()

    _run(main())
