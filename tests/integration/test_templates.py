"""The bundled settings templates against real servers: every key reaches the live pool, client, index or filesystem.

``configs/high-performance.yaml`` and ``configs/memory-optimized.yaml`` are
loaded as they are (their keys and values are read from the files, never
restated here) with ``AsyncDatabase.from_config`` and as ``extends:`` of jobs,
against PostgreSQL 15, moto S3 and osmem-server. What the checks read back is
the driver's own state: the asyncpg pool, the Elasticsearch client's nodes,
the settings of the index the server holds, the s3fs filesystem and its
botocore client. A key a template does not give is expected at the backend's
default.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from ferry.backends.elasticsearch import ElasticsearchBackend
from ferry.backends.postgres import PostgresBackend
from ferry.backends.records import AsyncDatabase, Record
from ferry.flows.settings import FerrySettingWarning, TemplateSettings
from ferry.flows.spec import build_backend, job_from_dict, template_path
from tests.integration.es_server import es_server, wipe  # noqa: F401  (fixture)
from tests.integration.pg_server import postgres_server  # noqa: F401  (fixture)
from tests.integration.s3_server import TEST_KEY, TEST_SECRET, S3Server, s3_server  # noqa: F401  (fixture)
from tests.integration.test_contract import _write

pytestmark = pytest.mark.integration

TEMPLATES = ("high-performance", "memory-optimized")


def _raw(name: str) -> dict[str, Any]:
    path = template_path(name, Path.cwd())
    assert path is not None, f"bundled template {name} not found"
    return yaml.safe_load(path.read_text())


def _template(name: str) -> TemplateSettings:
    return TemplateSettings.model_validate(_raw(name))


def _default(backend: type, field: str) -> Any:
    return backend.model_fields[field].default


def _or_default(value: Any, backend: type, field: str) -> Any:
    return _default(backend, field) if value is None else value


def _job(name: str, source: dict, target: dict) -> tuple[Any, list[str]]:
    """A job extending template ``name``, and the FerrySettingWarning messages its validation gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = job_from_dict({"name": "tmpl", "extends": name, "source": source, "target": target})
    return job, [str(w.message) for w in caught if issubclass(w.category, FerrySettingWarning)]


# -- PostgreSQL ---------------------------------------------------------------------------------


def _expected_pool(name: str) -> dict[str, Any]:
    pool = _template(name).databases.postgres.pool
    return {
        "min_size": _or_default(pool.min_connections, PostgresBackend, "min_connections"),
        "max_size": _or_default(pool.max_connections, PostgresBackend, "max_connections"),
        "timeout": _or_default(pool.connection_timeout, PostgresBackend, "connection_timeout"),
        "command_timeout": _or_default(pool.command_timeout, PostgresBackend, "command_timeout"),
        "max_queries": _or_default(pool.max_queries, PostgresBackend, "max_queries"),
        "max_inactive_connection_lifetime": _or_default(
            pool.max_inactive_connection_lifetime, PostgresBackend, "max_inactive_connection_lifetime"
        ),
    }


def _live_pool(pool: Any) -> dict[str, Any]:
    """What an asyncpg pool really runs with (asyncpg has public getters for the sizes only)."""
    return {
        "min_size": pool.get_min_size(),
        "max_size": pool.get_max_size(),
        "timeout": pool._connect_kwargs["timeout"],
        "command_timeout": pool._connect_kwargs["command_timeout"],
        "max_queries": pool._max_queries,
        "max_inactive_connection_lifetime": pool._max_inactive_connection_lifetime,
    }


async def _ensure_database(server, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.mark.parametrize("name", TEMPLATES)
def test_from_config_opens_the_record_store_with_the_template_pool(name, postgres_server, tmp_path):  # noqa: F811
    """The file as shipped, with only the connection pointed at the test cluster (its port is not 5432)."""
    raw = _raw(name)
    section = raw["databases"]["postgres"]
    database = section.get("database", "ferry_templates")
    section.update(host=postgres_server.host, port=postgres_server.port, user=postgres_server.user, database=database)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    expected = _expected_pool(name)

    async def main():
        await _ensure_database(postgres_server, database)
        async with await AsyncDatabase.from_config(path, "postgres") as db:
            assert _live_pool(db._pool) == expected
            assert db._pool.get_size() >= expected["min_size"]  # min_size connections were opened
            await db.clear()
            assert await db.create(Record({"n": 1}, id="a")) == "a"
            async with db._pool.acquire() as conn:
                assert await conn.fetchval("SELECT current_database()") == database
            await db.clear()

    asyncio.run(main())


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_job_extending_the_template_opens_its_postgres_pool_with_it(name, postgres_server):  # noqa: F811
    source = {"backend": "postgres", "dataset": "tmpl_orders", **postgres_server.settings(sslmode="disable")}
    job, notes = _job(name, source, {"backend": "memory", "dataset": "copy"})
    assert notes == []  # the endpoint gives host, port, user and database itself: nothing is left out
    expected = _expected_pool(name)

    async def main():
        backend = await build_backend(job.source)
        assert (backend.host, backend.port) == (postgres_server.host, postgres_server.port)
        async with backend:
            assert _live_pool(backend._pool()) == expected
            # The ADBC pool of the data plane takes the same bounds.
            assert (backend._adbc().max_size, backend._adbc().timeout) == (expected["max_size"], expected["timeout"])
            async with backend._pool().acquire() as conn:
                assert await conn.fetchval("SELECT current_database()") == postgres_server.database

    asyncio.run(main())


def test_an_endpoint_with_its_own_dsn_is_not_redirected(postgres_server):  # noqa: F811
    source = {"backend": "postgres", "dataset": "t", "dsn": postgres_server.dsn, "sslmode": "disable"}
    job, notes = _job("high-performance", source, {"backend": "memory", "dataset": "copy"})
    connection = _template("high-performance").databases.postgres
    assert sorted(notes) == sorted(
        f"parameters: source: databases.postgres.{key} ({value!r}) is not applied: "
        "the endpoint names its own server (`dsn`)"
        for key, value in (("host", connection.host), ("database", connection.database))
    )

    async def main():
        async with await build_backend(job.source) as backend:
            assert _live_pool(backend._pool()) == _expected_pool("high-performance")
            async with backend._pool().acquire() as conn:
                assert await conn.fetchval("SELECT current_database()") == postgres_server.database

    asyncio.run(main())


@pytest.mark.usefixtures("prefect_harness")
def test_a_saved_block_keeps_its_server_and_takes_the_template_pool(postgres_server):  # noqa: F811
    block_name = f"tmpl-{uuid.uuid4().hex[:8]}"
    PostgresBackend(**postgres_server.settings(sslmode="disable"), max_connections=3).save(block_name)
    source = {"block": f"ferry-postgres/{block_name}", "dataset": "t"}
    job, notes = _job("high-performance", source, {"backend": "memory", "dataset": "copy"})
    assert len(notes) == 2 and all(f"names saved block 'ferry-postgres/{block_name}'" in n for n in notes)

    async def main():
        backend = await build_backend(job.source)
        assert (backend.host, backend.port) == (postgres_server.host, postgres_server.port)
        assert backend.concurrency_tag() == f"ferry-{block_name}"
        async with backend:
            assert _live_pool(backend._pool()) == _expected_pool("high-performance")

    asyncio.run(main())


# -- Elasticsearch / OpenSearch -------------------------------------------------------------------


def _settings_of(url: str, index: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/{index}/_settings", timeout=30) as response:
        body = json.loads(response.read())
    (only,) = body.values()
    return only["settings"]["index"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_job_extending_the_template_sets_the_client_and_the_index_it_creates(name, es_server):  # noqa: F811
    wipe(es_server)
    section = _template(name).databases.elasticsearch
    index = f"tmpl-{name}"
    target = {"backend": "elasticsearch", "hosts": [es_server], "dataset": index}
    job, notes = _job(name, {"backend": "memory", "dataset": "orders"}, target)
    assert notes == []
    table = pa.table({"id": list(range(50)), "name": [f"n{i}" for i in range(50)]})

    async def main():
        async with await build_backend(job.target) as backend:
            client = backend._conn().client
            nodes = client.transport.node_pool.all()
            assert [node.session.connector.limit_per_host for node in nodes] == [section.pool.per_node]
            timeout = _or_default(section.timeout, ElasticsearchBackend, "request_timeout_seconds")
            assert client._request_timeout == timeout
            await _write(backend, index, table, partitions=("p0", "p1"))
            assert await backend.count(index) == 50

    asyncio.run(main())
    created = _settings_of(es_server, index)
    if section.index.number_of_shards is not None:
        assert int(created["number_of_shards"]) == section.index.number_of_shards
    assert int(created["number_of_replicas"]) == _or_default(
        section.index.number_of_replicas, ElasticsearchBackend, "number_of_replicas"
    )
    assert created["refresh_interval"] == section.index.refresh_interval


@pytest.mark.usefixtures("prefect_harness")
def test_a_migrate_run_creates_the_index_with_the_template_settings(es_server):  # noqa: F811
    """The flow re-validates a job given as parameters: the template's settings must survive that."""
    from ferry.flows.migrate import migrate

    wipe(es_server)
    section = _template("high-performance").databases.elasticsearch
    target = {"backend": "elasticsearch", "hosts": [es_server], "dataset": "tmpl-run"}
    job, _ = _job("high-performance", {"backend": "memory", "dataset": "orders", "generate": {"rows": 300}}, target)
    summary = asyncio.run(migrate(job=job))
    assert summary["rows_written"] == 300 and summary["verification"]["status"] == "passed"
    created = _settings_of(es_server, "tmpl-run")
    assert int(created["number_of_shards"]) == section.index.number_of_shards
    assert int(created["number_of_replicas"]) == section.index.number_of_replicas
    assert created["refresh_interval"] == section.index.refresh_interval


# -- S3 -------------------------------------------------------------------------------------------


def _s3_target(server: S3Server, **where: Any) -> dict[str, Any]:
    return {
        "backend": "s3",
        "dataset": "orders",
        "endpoint_url": server.endpoint_url,
        "path_style": True,
        "key": TEST_KEY,
        "secret": TEST_SECRET,
        **where,
    }


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_job_extending_the_template_tunes_the_s3_filesystem(name, s3_server: S3Server):  # noqa: F811
    from ferry.backends.objectstore_fs import S3FS_DEFAULT_BLOCK_SIZE

    section = _template(name).databases.s3
    prefix = f"tmpl-{uuid.uuid4().hex[:8]}"
    if section.bucket is not None:
        # No location on the endpoint: the template's bucket is where the data goes.
        bucket = section.bucket
        if bucket not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}:
            s3_server.client().create_bucket(Bucket=bucket)
        target = _s3_target(s3_server, prefix=prefix)
    else:
        bucket = s3_server.new_bucket("tmpl")
        target = _s3_target(s3_server, url=f"s3://{bucket}/{prefix}")
    job, notes = _job(name, {"backend": "memory", "dataset": "orders"}, target)
    assert notes == []
    block_size = section.transfer.multipart_chunksize or section.transfer.multipart_threshold
    table = pa.table({"id": list(range(20))})

    async def main():
        async with await build_backend(job.target) as backend:
            fs = backend._filesystems().fs
            assert fs.default_block_size == (block_size or S3FS_DEFAULT_BLOCK_SIZE)
            assert fs.max_concurrency == section.transfer.max_concurrency
            # The botocore client s3fs connected with (at open, when the bucket was checked).
            assert fs.s3.meta.config.max_pool_connections == section.pool.max_connections
            await _write(backend, "orders", table)

    asyncio.run(main())
    assert [k for k in s3_server.keys(bucket, f"{prefix}/orders/") if k.endswith(".parquet")]
