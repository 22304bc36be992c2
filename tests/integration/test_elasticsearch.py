"""The Elasticsearch / OpenSearch backend against the osmem test server and an OpenSearch-like stub.

The contract suite covers round trips and write modes; these tests cover
what is particular to search indexes: the client/dialect layer, the block's
connection settings and pools, bad input, replace killed mid-load, saved
refresh settings, filter pushdown and schema inference.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pyarrow as pa
import pytest
from elasticsearch import AsyncElasticsearch, UnsupportedProductError
from elasticsearch import exceptions as es_exceptions

from ferry.backends import DataError, WriteContext, WriteMode, get_pool_count, get_pool_info
from ferry.backends.elasticsearch import ElasticsearchBackend, OpenSearchBackend
from ferry.backends.errors import ConfigurationError, TransientBackendError
from ferry.backends.filters import evaluate, parse_filter
from tests.integration.es_server import es_server, wipe  # noqa: F401
from tests.integration.opensearch_stub import opensearch_stub  # noqa: F401
from tests.integration.test_contract import _read_all, _sorted_rows, _stream, _write, every_type_table

pytestmark = pytest.mark.integration


def _http(url: str, method: str = "GET", body: dict | str | None = None) -> dict:
    data = None
    headers = {}
    if body is not None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        headers["Content-Type"] = "application/x-ndjson" if isinstance(body, str) else "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


@pytest.fixture
def es(es_server):  # noqa: F811
    wipe(es_server)
    return es_server


# -- the client / dialect layer ------------------------------------------------------------


def test_stock_client_is_refused_by_the_opensearch_like_stub(opensearch_stub):  # noqa: F811
    """The stub behaves like real OpenSearch: the official client cannot talk to it as is."""

    async def scenario():
        client = AsyncElasticsearch(opensearch_stub.url)
        try:
            with pytest.raises((UnsupportedProductError, es_exceptions.ApiError)) as caught:
                await client.info()
        finally:
            await client.close()
        return caught.value

    error = asyncio.run(scenario())
    assert isinstance(error, UnsupportedProductError) or error.meta.status == 406


def test_every_type_round_trips_through_the_opensearch_like_stub(es, opensearch_stub):  # noqa: F811
    async def scenario():
        table = every_type_table()
        backend = OpenSearchBackend(hosts=[opensearch_stub.url])
        async with backend:
            conn = backend._conn()
            assert conn.dialect.product == "opensearch"
            await _write(backend, "stub-types", table, partitions=("p0", "p1"))
            back = await _read_all(backend, "stub-types")
        assert _sorted_rows(back) == _sorted_rows(table)
        assert back.schema.equals(table.schema)

    opensearch_stub.seen.clear()
    asyncio.run(scenario())
    assert opensearch_stub.seen, "the backend did not go through the stub"
    for method, path, accept, content_type in opensearch_stub.seen:
        assert "vnd.elasticsearch" not in accept + content_type, (method, path)
    # Reads used OpenSearch's point-in-time endpoint.
    assert any(path.endswith("/_search/point_in_time?keep_alive=5m") for _, path, _, _ in opensearch_stub.seen)


def test_dialect_setting_that_contradicts_the_server_is_refused(es):
    async def scenario():
        async with ElasticsearchBackend(hosts=[es], dialect="elasticsearch"):
            pass

    with pytest.raises(ConfigurationError, match="answers as OpenSearch"):
        asyncio.run(scenario())


# -- the block: settings, pools ------------------------------------------------------------


def test_connections_and_maxsize_that_differ_are_refused_naming_both():
    with pytest.raises(ValueError) as caught:
        ElasticsearchBackend(hosts=["http://127.0.0.1:1"], connections=4, maxsize=8)
    assert "connections (4)" in str(caught.value) and "maxsize (8)" in str(caught.value)
    assert ElasticsearchBackend(connections=6, maxsize=6).connections_per_node == 6
    assert ElasticsearchBackend(maxsize=3).connections_per_node == 3


def test_secrets_never_show_in_reprs_or_descriptions():
    backend = ElasticsearchBackend(hosts=["http://127.0.0.1:1"], username="u", password="hunter2", api_key="k3y-s3cret")
    text = repr(backend) + str(backend) + backend.describe() + backend.location("x")
    assert "hunter2" not in text and "k3y-s3cret" not in text


def test_one_pool_per_configuration_and_loop_listed_and_closed_on_exit(es):
    async def scenario():
        first = ElasticsearchBackend(hosts=[es], connections=3)
        second = ElasticsearchBackend(hosts=[es], connections=3)
        other = ElasticsearchBackend(hosts=[es], connections=5)
        async with first, second, other:
            assert first._conn() is second._conn()
            assert first._conn() is not other._conn()
            node = next(iter(first._conn().client.transport.node_pool.all()))
            assert node.config.connections_per_node == 3
            info = {name: row for name, row in get_pool_info().items() if row["kind"] == "elasticsearch"}
            assert len(info) == 2
            row = info[f"elasticsearch:{first.config_hash()}@loop{id(asyncio.get_running_loop()):x}"]
            assert row["users"] == 2 and row["limits"]["connections_per_node"] == 3
            assert row["product"].startswith("OpenSearch")
        assert not [r for r in get_pool_info().values() if r["kind"] == "elasticsearch"]

    asyncio.run(scenario())
    assert get_pool_count() == 0


# -- bad input ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_host_is_a_clear_transient_error():
    url = f"http://127.0.0.1:{_free_port()}"

    async def scenario():
        async with ElasticsearchBackend(hosts=[url], max_retries=0, request_timeout_seconds=5):
            pass

    with pytest.raises(TransientBackendError) as caught:
        asyncio.run(scenario())
    assert url in str(caught.value) and "hosts" in str(caught.value)
    assert get_pool_count() == 0


def test_missing_index_names_the_index(es):
    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            assert not await backend.exists("nope")
            await backend.schema("nope")

    with pytest.raises(ConfigurationError, match="'nope'.*does not exist"):
        asyncio.run(scenario())


def _conflict_setup(url: str) -> None:
    _http(f"{url}/conflict", "PUT", {"mappings": {"properties": {"id": {"type": "long"}, "n": {"type": "long"}}}})


def _conflict_table() -> pa.Table:
    return pa.table({"id": pa.array([1, 2, 3], pa.int64()), "n": pa.array(["7", "not a number", "9"], pa.string())})


def test_mapping_conflict_fails_naming_index_document_and_reason(es):
    _conflict_setup(es)

    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "conflict", _conflict_table(), key=("id",))

    with pytest.raises(DataError) as caught:
        asyncio.run(scenario())
    message = str(caught.value)
    assert "'conflict'" in message and "'2'" in message and "not a number" in message


def test_mapping_conflict_with_collect_keeps_the_good_documents_and_the_reasons(es, tmp_path):
    _conflict_setup(es)

    async def scenario():
        table = _conflict_table()
        async with ElasticsearchBackend(hosts=[es], on_document_error="collect", rejects_dir=str(tmp_path)) as backend:
            ctx = WriteContext(run_id="r1", job_name="j", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
            await backend.begin_write("conflict", ctx)
            result = await backend.write("conflict", "p0", _stream(table), ctx)
            await backend.publish("conflict", ctx)
            count = (await backend._conn().client.count(index="conflict")).body["count"]
        return result, count

    result, count = asyncio.run(scenario())
    assert (result.rows_written, result.rows_rejected, count) == (2, 1, 2)
    import pyarrow.parquet as pq

    rejects = pq.read_table(tmp_path / "j" / "r1" / "p0-documents.parquet").to_pylist()
    assert [r["row_key"] for r in rejects] == ["2"] and "not a number" in rejects[0]["reason"]


def test_document_over_the_size_limit_is_a_document_failure(es):
    """A document the server refuses for its size is reported with its id, never dropped."""

    async def scenario():
        table = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "s": pa.array(["x", "y" * 40000, "z"], pa.string())})
        async with ElasticsearchBackend(hosts=[es], document_max_bytes=20000) as backend:
            await _write(backend, "sizes", table, key=("id",))

    with pytest.raises(DataError) as caught:
        asyncio.run(scenario())
    message = str(caught.value)
    assert "'sizes'" in message and "'2'" in message and "document_max_bytes" in message


# -- replace, refresh settings ---------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path.insert(0, {root!r})
    import pyarrow as pa
    from ferry.backends import WriteContext, WriteMode
    from ferry.backends.elasticsearch import ElasticsearchBackend

    async def main():
        schema = pa.schema([("id", pa.int64()), ("v", pa.string())])
        async def slow():
            for start in range(0, 10_000_000, 200):
                yield pa.record_batch([pa.array(range(start, start + 200), pa.int64()),
                                       pa.array(["new"] * 200)], schema=schema)
                if start == 1000:
                    print("LOADING", flush=True)
                await asyncio.sleep(0.01)
        async with ElasticsearchBackend(hosts=[{url!r}], chunk_max_docs=200) as backend:
            ctx = WriteContext(run_id="killed", job_name="j", mode=WriteMode.REPLACE, schema=schema, key=("id",))
            await backend.begin_write("orders", ctx)
            await backend.write("orders", "p0", slow(), ctx)

    asyncio.run(main())
    """
)


def test_replace_killed_mid_load_leaves_the_alias_on_the_old_complete_index(es):
    from ferry.backends.elasticsearch_write import version_index

    old = pa.table({"id": pa.array(range(500), pa.int64()), "v": pa.array(["old"] * 500)})

    async def load_old():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "orders", old, mode=WriteMode.REPLACE, run_id="first", key=("id",))

    asyncio.run(load_old())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER.format(root=root, url=es)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "LOADING"
        time.sleep(0.3)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    unfinished = version_index("orders", "killed")
    _http(f"{es}/{unfinished}/_refresh", "POST")
    assert _http(f"{es}/{unfinished}/_count")["count"] > 0  # the killed run had loaded documents
    aliases = _http(f"{es}/_alias/orders")
    assert list(aliases) == [version_index("orders", "first")]

    async def read_back():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            return await _read_all(backend, "orders")

    back = asyncio.run(read_back())
    assert _sorted_rows(back) == _sorted_rows(old)

    async def repair():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            return await backend.repair("orders")

    assert asyncio.run(repair()) == [f"deleted unfinished replace index {unfinished} (run killed)"]
    assert list(_http(f"{es}/_alias/orders")) == [version_index("orders", "first")]
    assert asyncio.run(repair()) == []


def test_discarding_a_dead_replace_run_deletes_its_index_and_never_the_published_one(es):
    from ferry.backends.elasticsearch_write import version_index

    table = pa.table({"id": pa.array(range(20), pa.int64())})

    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "dead", table, mode=WriteMode.REPLACE, run_id="first", key=("id",))
            ctx = WriteContext(run_id="stopped", job_name="j", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
            await backend.begin_write("dead", ctx)
            await backend.write("dead", "p0", _stream(table, rows=5), ctx)  # ...and the process dies
            published = await backend.discard_run("dead", "first", WriteMode.REPLACE)
            appended = await backend.discard_run("dead", "stopped", WriteMode.APPEND)
            discarded = await backend.discard_run("dead", "stopped", WriteMode.REPLACE)
            again = await backend.discard_run("dead", "stopped", WriteMode.REPLACE)
            return published, appended, discarded, again

    published, appended, discarded, again = asyncio.run(scenario())
    assert published == [] and appended == [] and again == []
    assert discarded == [f"deleted unfinished replace index {version_index('dead', 'stopped')} (run stopped)"]
    assert list(_http(f"{es}/_alias/dead")) == [version_index("dead", "first")]
    _http(f"{es}/dead/_refresh", "POST")
    assert _http(f"{es}/dead/_count")["count"] == 20


def _settings(url: str, index: str) -> dict:
    body = _http(f"{url}/{index}/_settings")
    return next(iter(body.values()))["settings"]["index"]


def _ferry_meta(url: str, index: str) -> dict:
    body = _http(f"{url}/{index}/_mapping")
    return (next(iter(body.values()))["mappings"].get("_meta") or {}).get("ferry") or {}


def test_saved_refresh_settings_are_restored_after_a_failed_load(es):
    table = pa.table({"id": pa.array(range(10), pa.int64())})
    _http(f"{es}/tuned", "PUT", {"settings": {"index": {"refresh_interval": "7s", "number_of_replicas": 2}}})

    async def failing():
        yield table.to_batches()[0]
        raise RuntimeError("source died")

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], tune_existing_index=True) as backend:
            ctx = WriteContext(run_id="t1", job_name="j", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
            await backend.begin_write("tuned", ctx)
            during = _settings(es, "tuned")
            saved = _ferry_meta(es, "tuned").get("saved_settings")
            with pytest.raises(RuntimeError):
                await backend.write("tuned", "p0", failing(), ctx)
            await backend.abort("tuned", ctx)
        return during, saved

    during, saved = asyncio.run(scenario())
    assert (during["refresh_interval"], str(during["number_of_replicas"])) == ("-1", "0")
    assert saved == {"refresh_interval": "7s", "number_of_replicas": 2}
    after = _settings(es, "tuned")
    assert (after["refresh_interval"], str(after["number_of_replicas"])) == ("7s", "2")
    assert "saved_settings" not in _ferry_meta(es, "tuned")


def test_settings_left_by_a_crashed_load_are_restored_by_repair_and_by_the_next_run(es):
    table = pa.table({"id": pa.array(range(10), pa.int64())})
    _http(f"{es}/crashed", "PUT", {"settings": {"index": {"refresh_interval": "3s", "number_of_replicas": 1}}})

    async def crash(run_id: str) -> None:
        async with ElasticsearchBackend(hosts=[es], tune_existing_index=True) as backend:
            ctx = WriteContext(run_id=run_id, job_name="j", mode=WriteMode.APPEND, schema=table.schema, key=("id",))
            await backend.begin_write("crashed", ctx)  # ...and the process dies: no publish, no abort

    async def scenario():
        await crash("c1")
        assert _settings(es, "crashed")["refresh_interval"] == "-1"
        async with ElasticsearchBackend(hosts=[es]) as backend:
            done = await backend.repair("crashed")
        assert done == ["restored number_of_replicas 1, refresh_interval 3s on crashed"]
        assert _settings(es, "crashed")["refresh_interval"] == "3s"
        await crash("c2")
        await crash("c3")  # a second crash keeps the original settings, not the -1 of the first
        assert _ferry_meta(es, "crashed")["saved_settings"]["refresh_interval"] == "3s"
        async with ElasticsearchBackend(hosts=[es]) as backend:  # a later, untuned run
            await _write(backend, "crashed", table, run_id="c4", key=("id",))

    asyncio.run(scenario())
    after = _settings(es, "crashed")
    assert (after["refresh_interval"], str(after["number_of_replicas"])) == ("3s", "1")
    assert "saved_settings" not in _ferry_meta(es, "crashed")


def test_created_index_gets_load_settings_then_the_jobs_values(es):
    table = pa.table({"id": pa.array(range(10), pa.int64()), "name": pa.array(["x"] * 10)})

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], refresh_interval="2s", number_of_replicas=0, searchable=["name"]) as backend:
            ctx = WriteContext(run_id="n1", job_name="j", mode=WriteMode.APPEND, schema=table.schema)
            await backend.begin_write("fresh", ctx)
            during = _settings(es, "fresh")
            await backend.write("fresh", "p0", _stream(table, rows=4), ctx)
            await backend.publish("fresh", ctx)
        return during

    during = asyncio.run(scenario())
    assert during["refresh_interval"] == "-1"
    assert _settings(es, "fresh")["refresh_interval"] == "2s"
    mapping = next(iter(_http(f"{es}/fresh/_mapping").values()))["mappings"]["properties"]
    assert mapping["name"] == {"type": "text", "fields": {"keyword": {"type": "keyword"}}}
    assert mapping["id"]["type"] == "long"


# -- reads -----------------------------------------------------------------------------------


def _filter_table() -> pa.Table:
    import datetime as dt

    utc = dt.timezone.utc
    names = ["alpha", "beta", None, "Gamma", "delta%", "ünï", "beta2", ""]
    return pa.table(
        {
            "id": pa.array(range(8), pa.int64()),
            "name": pa.array(names, pa.string()),
            "n": pa.array([5, -1, None, 10, 0, 7, 3, 2], pa.int32()),
            "at": pa.array(
                [dt.datetime(2024, 1, 1, 0, 0, 0, 500, tzinfo=utc), None]
                + [dt.datetime(2024, 1, d, tzinfo=utc) for d in range(2, 8)],
                pa.timestamp("us", tz="UTC"),
            ),
            "flag": pa.array([True, False, None, True, False, True, None, False]),
        }
    )


FILTERS = [
    {"name": "beta"},
    {"name": {"neq": "beta"}},
    {"name": {"in": ["alpha", "ünï", "zzz"]}},
    {"name": {"not_in": ["alpha"]}},
    {"name": {"gte": "b", "lt": "d"}},
    {"name": {"like": "bet%"}},
    {"name": {"like": "delta\\%"}},
    {"name": {"regex": "b.*"}},
    {"name": {"exists": False}},
    {"n": {"between": [0, 5]}},
    {"n": {"gt": 2.5}},
    {"at": {"gt": "2024-01-01T00:00:00.0004Z"}},
    {"at": {"lte": "2024-01-01T00:00:00.0004Z"}},
    {"at": {"eq": "2024-01-01T00:00:00.0005Z"}},
    {"flag": True},
    {"or": [{"n": {"lt": 0}}, {"name": {"like": "%a"}}]},
    {"not": {"name": "beta"}},
]


@pytest.mark.parametrize("spec", FILTERS, ids=[json.dumps(f, ensure_ascii=True) for f in FILTERS])
def test_where_gives_exactly_the_reference_evaluators_rows(es_server, spec):  # noqa: F811
    table = _filter_table()
    where = parse_filter(spec)

    async def scenario():
        async with ElasticsearchBackend(hosts=[es_server]) as backend:
            if not await backend.exists("filters"):
                await _write(backend, "filters", table, key=("id",))
            ids = []
            for part in await backend.partitions("filters", hint=2, where=where):
                async for batch in backend.read(part, columns=["id"], where=where):
                    ids.extend(batch.column("id").to_pylist())
            return sorted(ids)

    expected = sorted(table.filter(evaluate(where, table)).column("id").to_pylist())
    assert asyncio.run(scenario()) == expected


def test_pushdown_sends_bool_filter_clauses():
    from ferry.backends.elasticsearch_mapping import index_mapping
    from ferry.backends.elasticsearch_query import to_query

    schema = _filter_table().schema
    properties = index_mapping(schema)["properties"]
    query = to_query(parse_filter({"and": [{"name": "beta"}, {"n": {"gte": 1}}, {"not": {"n": 3}}]}), schema, properties)
    assert query == {"bool": {"filter": [{"bool": {"filter": [{"term": {"name": "beta"}}, {"range": {"n": {"gte": 1}}}]}}]}}


def test_id_column_and_schema_inferred_for_an_index_ferry_did_not_create(es):
    _http(
        f"{es}/foreign",
        "PUT",
        {"mappings": {"properties": {"title": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
                                     "tags": {"type": "keyword"}, "at": {"type": "date"}, "n": {"type": "integer"}}}},
    )
    lines = [
        {"index": {"_index": "foreign", "_id": "a"}}, {"title": "One", "tags": ["x", "y"], "at": "2024-01-01", "n": 1},
        {"index": {"_index": "foreign", "_id": "b"}}, {"title": "Two", "tags": "z", "at": 1704153600000},
        {"index": {"_index": "foreign", "_id": "c"}}, {"title": "Three"},
    ]  # fmt: skip
    _http(f"{es}/_bulk?refresh=true", "POST", "".join(json.dumps(line) + "\n" for line in lines))

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], expose_id=True) as backend:
            schema = await backend.schema("foreign")
            return schema, await _read_all(backend, "foreign")

    schema, back = asyncio.run(scenario())
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("at").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("n").type == pa.int32() and schema.field("_id").type == pa.string()
    rows = {r["_id"]: r for r in back.to_pylist()}
    assert rows["a"]["tags"] == ["x", "y"] and rows["b"]["tags"] == ["z"] and rows["c"]["tags"] is None
    assert rows["b"]["at"].isoformat() == "2024-01-02T00:00:00+00:00"
    assert rows["c"]["n"] is None and rows["a"]["title"] == "One"


def test_upsert_by_key_overwrites_and_a_retried_keyed_partition_never_duplicates(es):
    table = pa.table({"id": pa.array(range(100), pa.int64()), "v": pa.array(["a"] * 100)})

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], max_requests_in_flight=4, chunk_max_docs=7) as backend:
            ctx = WriteContext(run_id="u1", job_name="j", mode=WriteMode.UPSERT, schema=table.schema, key=("id",))
            await backend.begin_write("ups", ctx)
            await backend.write("ups", "p0", _stream(table, rows=30), ctx)
            await backend.publish("ups", ctx)
            changed = table.set_column(1, "v", pa.array(["b"] * 100))
            ctx2 = WriteContext(run_id="u2", job_name="j", mode=WriteMode.UPSERT, schema=table.schema, key=("id",))
            await backend.begin_write("ups", ctx2)
            await backend.write("ups", "p0", _stream(changed.slice(0, 50), rows=30), ctx2)
            await backend.publish("ups", ctx2)
            assert await backend.count("ups") == 100
            assert await backend.count("ups", where=parse_filter({"v": "b"})) == 50
            return await _read_all(backend, "ups")

    back = asyncio.run(scenario())
    values = {r["id"]: r["v"] for r in back.to_pylist()}
    assert back.num_rows == 100 and sum(v == "b" for v in values.values()) == 50


def test_sliced_scroll_mode_reads_every_type_and_every_row_once(es):
    table = every_type_table()
    where = parse_filter({"or": [{"big": {"gt": 0}}, {"text": {"neq": "plain"}}]})

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], read_mode="scroll", page_size=1) as backend:
            await _write(backend, "scrolled", table, partitions=("p0", "p1"))
            parts = await backend.partitions("scrolled", hint=3)
            assert all(p.spec["pit"] is None for p in parts)
            back = await _read_all(backend, "scrolled", hint=3)
            ids = []
            for part in parts:
                async for batch in backend.read(part, columns=["id"], where=where):
                    ids.extend(batch.column("id").to_pylist())
        return back, sorted(ids)

    back, ids = asyncio.run(scenario())
    assert _sorted_rows(back) == _sorted_rows(table)
    assert ids == sorted(table.filter(evaluate(where, table)).column("id").to_pylist())


def test_less_common_types_round_trip(es):
    import datetime as dt
    from decimal import Decimal

    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "u64": pa.array([2**64 - 1, 0, None], pa.uint64()),
            "f16": pa.array([1.5, None, -2.0], pa.float16()),
            "t": pa.array([dt.time(12, 30, 1, 5), None, dt.time(0)], pa.time64("us")),
            "dur": pa.array([5, None, -7], pa.duration("ms")),
            "iv": pa.array([pa.MonthDayNano([1, 2, 3000]), None, pa.MonthDayNano([0, -1, 0])], pa.month_day_nano_interval()),
            "m": pa.array([[("a", 1), ("b", 2)], None, []], pa.map_(pa.string(), pa.int64())),
            "big": pa.array([Decimal("12345678901234567890.123"), None, Decimal("-1")], pa.decimal128(38, 3)),
            "naive": pa.array([dt.datetime(2024, 1, 1, 1, 2, 3, 456789), None, dt.datetime(1900, 1, 1)], pa.timestamp("us")),
            "ns": pa.array([1_700_000_000_123_456_789, None, 0], pa.timestamp("ns", tz="UTC")),
            "structs": pa.array([[{"x": 1.5, "b": b"\x00"}], [], None], pa.list_(pa.struct([("x", pa.float64()), ("b", pa.binary())]))),
            "floats": pa.array([float("nan"), float("-inf"), None], pa.float32()),
        }
    )

    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "rare", table, key=("id",))
            return await _read_all(backend, "rare")

    back = asyncio.run(scenario())
    assert back.schema.equals(table.schema)
    left, right = back.sort_by("id"), table.sort_by("id")
    for name in table.column_names:
        if name == "floats":
            assert str(left.column(name).to_pylist()) == str(right.column(name).to_pylist())
        else:
            assert left.column(name).to_pylist() == right.column(name).to_pylist(), name


def test_append_with_an_added_column_keeps_the_schema_whole(es):
    first = pa.table({"id": pa.array([1, 2], pa.int64()), "a": pa.array(["x", "y"])})
    second = pa.table({"id": pa.array([3], pa.int64()), "a": pa.array(["z"]), "tags": pa.array([["t"]], pa.list_(pa.string()))})

    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "grow", first, run_id="g1", key=("id",))
            await _write(backend, "grow", second, run_id="g2", key=("id",))
            return await _read_all(backend, "grow")

    back = asyncio.run(scenario())
    assert back.schema.field("tags").type == pa.list_(pa.string())
    assert sorted(back.to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "a": "x", "tags": None},
        {"id": 2, "a": "y", "tags": None},
        {"id": 3, "a": "z", "tags": ["t"]},
    ]


def test_rerun_of_a_crashed_replace_with_the_same_run_id_skips_committed_partitions(es):
    table = pa.table({"id": pa.array(range(20), pa.int64())})

    async def failing():
        yield table.slice(10, 5).to_batches()[0]
        raise RuntimeError("source died")

    async def scenario():
        ctx = WriteContext(run_id="again", job_name="j", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await backend.begin_write("rerun", ctx)
            await backend.write("rerun", "p0", _stream(table.slice(0, 10)), ctx)
            with pytest.raises(RuntimeError):
                await backend.write("rerun", "p1", failing(), ctx)
            # ...the process dies here: no abort.
        ctx = WriteContext(run_id="again", job_name="j", mode=WriteMode.REPLACE, schema=table.schema, key=("id",))
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await backend.begin_write("rerun", ctx)
            first = await backend.write("rerun", "p0", _stream(table.slice(0, 10)), ctx)
            second = await backend.write("rerun", "p1", _stream(table.slice(10, 10)), ctx)
            await backend.publish("rerun", ctx)
            back = await _read_all(backend, "rerun")
        return first, second, back

    first, second, back = asyncio.run(scenario())
    assert first.skipped and not second.skipped
    assert sorted(back.column("id").to_pylist()) == list(range(20))


def test_only_documents_refused_with_429_are_sent_again(es):
    from tests.integration.opensearch_stub import OpenSearchStub

    stub = OpenSearchStub(es)
    try:
        stub.handler.busy_bulk_responses = 2
        table = pa.table({"id": pa.array(range(40), pa.int64())})

        async def scenario():
            backend = ElasticsearchBackend(hosts=[stub.url], chunk_max_docs=10, max_requests_in_flight=1, initial_backoff_seconds=0.01)
            async with backend:
                await _write(backend, "busy", table, key=("id",))
                return await _read_all(backend, "busy")

        back = asyncio.run(scenario())
        sent = stub.handler.bulk_ids
    finally:
        stub.close()
    assert sorted(back.column("id").to_pylist()) == list(range(40))
    # Chunk 1 (0-9): 5 refused, sent again alone; then that retry is refused in part too.
    assert sent[0] == [str(i) for i in range(10)]
    assert sent[1] == ["1", "3", "5", "7", "9"]
    assert sent[2] == ["3", "7"] and sent[3] == [str(i) for i in range(10, 20)]
    assert sum(len(ids) for ids in sent) == 40 + 5 + 2


def test_wrong_credentials_are_a_clear_permanent_error(es):
    import base64

    from ferry.backends.errors import PermanentBackendError
    from tests.integration.opensearch_stub import OpenSearchStub

    stub = OpenSearchStub(es)
    stub.handler.authorization = "Basic " + base64.b64encode(b"ferry:right").decode()
    try:

        async def connect(password: str) -> str:
            async with OpenSearchBackend(hosts=[stub.url], username="ferry", password=password) as backend:
                return backend._conn().dialect.label

        assert asyncio.run(connect("right")).startswith("OpenSearch")
        with pytest.raises(PermanentBackendError) as caught:
            asyncio.run(connect("wrong"))
    finally:
        stub.close()
    assert "401" in str(caught.value) and "password" in str(caught.value) and "wrong" not in str(caught.value)


@pytest.mark.parametrize("mode", ["disabled", "flattened", "nested"])
def test_object_field_modes_keep_the_struct_column(es, mode):
    table = every_type_table()

    async def scenario():
        async with ElasticsearchBackend(hosts=[es], object_fields={"nested": mode}) as backend:
            await _write(backend, f"objects-{mode}", table, key=("id",))
            return await _read_all(backend, f"objects-{mode}")

    back = asyncio.run(scenario())
    expected = {"disabled": {"type": "object", "enabled": False}, "flattened": {"type": "flat_object"}}
    mapping = next(iter(_http(f"{es}/objects-{mode}/_mapping").values()))["mappings"]["properties"]["nested"]
    if mode in expected:
        assert mapping == expected[mode]
    else:
        assert mapping["type"] == "nested"
    assert _sorted_rows(back) == _sorted_rows(table)


def test_raw_query_dsl_narrows_every_read(es):
    table = _filter_table()

    async def scenario():
        async with ElasticsearchBackend(hosts=[es]) as backend:
            await _write(backend, "raw", table, key=("id",))
        async with ElasticsearchBackend(hosts=[es], query={"terms": {"name": ["alpha", "beta"]}}) as backend:
            where = parse_filter({"n": {"gt": 0}})
            ids = []
            for part in await backend.partitions("raw", hint=2, where=where):
                async for batch in backend.read(part, columns=["id"], where=where):
                    ids.extend(batch.column("id").to_pylist())
            return sorted(ids)

    assert asyncio.run(scenario()) == [0]


def test_elasticsearch_dialect_uses_the_pit_endpoints(es):
    """Against a server answering like Elasticsearch, reads open and close ``/_pit``."""
    from tests.integration.opensearch_stub import OpenSearchStub

    stub = OpenSearchStub(es, flavor="elasticsearch")
    try:
        table = every_type_table()

        async def scenario():
            async with ElasticsearchBackend(hosts=[stub.url], dialect="elasticsearch") as backend:
                assert backend._conn().dialect.label == "Elasticsearch 8.19.0"
                await _write(backend, "es-types", table, key=("id",))
                back = await _read_all(backend, "es-types")
                assert all(p.spec["pit"] for p in await backend.partitions("es-types", hint=2))
            return back

        back = asyncio.run(scenario())
        seen = [(method, path.split("?")[0]) for method, path, _, _ in stub.seen]
    finally:
        stub.close()
    assert _sorted_rows(back) == _sorted_rows(table)
    assert ("POST", "/es-types/_pit") in seen and ("DELETE", "/_pit") in seen
    assert not [path for _, path in seen if "point_in_time" in path]
