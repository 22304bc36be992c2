"""The object-store record store on the moto S3 server: layout, exact values, pools, concurrency.

The contract suite runs on S3 in tests/integration/test_records_s3_contract.py;
this module checks what is S3's own: the objects written (one per batch,
compaction, no temporary objects), values and queries checked against the
reference evaluator, the shared filesystem pool, the missing-bucket error,
reads that overlap a compaction, and two OS processes writing the same
prefix at the same time.
"""

from __future__ import annotations

import asyncio
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.backends import ObjectStoreBackend, get_pool_info
from ferry.backends.errors import PermanentBackendError
from ferry.backends.records import AsyncDatabase, Query, Record
from tests.integration.s3_server import S3Server, s3_server  # noqa: F401
from tests.unit.test_records_local import (
    _VALUES,
    _same,
    check_queries_against_reference,
    check_two_writers,
    run_two_writers,
)

pytestmark = pytest.mark.integration


def _run(coro):
    return asyncio.run(coro)


def _objects(server: S3Server, bucket: str, prefix: str) -> list[pa.Table]:
    client = server.client()
    return [pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())) for key in server.keys(bucket, prefix)]


def test_one_object_per_batch_and_compaction_on_s3(s3_server: S3Server):
    bucket = s3_server.new_bucket("records")
    config = s3_server.settings(bucket, prefix="app", dataset="people", compact_file_rows=400)
    prefix = "app/people/"

    async def main():
        db = await AsyncDatabase.create("s3", config)
        await db.create_batch([Record({"n": i, "s": f"v{i}"}, id=f"p{i}") for i in range(1000)])
        assert [t.num_rows for t in _objects(s3_server, bucket, prefix)] == [1000]  # never one object per record
        await db.update_batch([(f"p{i}", Record({"n": -i})) for i in range(20)])
        assert await db.delete_batch([f"p{i}" for i in range(20, 30)]) == [True] * 10
        keys = s3_server.keys(bucket, prefix)
        assert len(keys) == 3 and all(k.endswith(".parquet") and "/." not in k for k in keys)
        assert await db.data_files() == [f"s3://{bucket}/{k}" for k in keys]
        before = [(r.id, r.fields) for r in await db.search(Query().sort("n"))]
        result = await db.compact()
        assert (result.files_read, result.rows_read, result.rows_written, result.tombstones_kept) == (3, 1030, 1000, 10)
        tables = _objects(s3_server, bucket, prefix)
        assert [t.num_rows for t in tables] == [400, 400, 200] and len(s3_server.keys(bucket, prefix)) == 3
        assert [(r.id, r.fields) for r in await db.search(Query().sort("n"))] == before
        assert await db.count() == 990 and (await db.read("p5")).fields == {"n": -5}
        await db.clear()
        assert s3_server.keys(bucket, prefix) == [] and await db.count() == 0
        await db.close()

    _run(main())


def test_values_round_trip_exactly_on_s3(s3_server: S3Server):
    fields = dict(_VALUES, nan=float("nan"))

    async def main():
        db = await AsyncDatabase.create("s3", s3_server.settings(s3_server.new_bucket("records")))
        await db.create(Record(fields, id="all", metadata={"source": "s3"}))
        stored = await db.read("all")
        assert _same(stored.fields, fields) and stored.metadata == {"source": "s3"}
        assert _same((await db.search(Query({"int": {"between": [6, 8]}})))[0].fields, fields)
        await db.close()

    _run(main())


def test_queries_match_the_reference_on_s3(s3_server: S3Server):
    # Two typed fields per file: some filters run on typed columns, the rest in Python.
    config = s3_server.settings(s3_server.new_bucket("records"), max_typed_fields=2)
    _run(check_queries_against_reference(config, 1203))


def test_a_store_shares_the_migration_backends_filesystems(s3_server: S3Server):
    bucket = s3_server.new_bucket("records")
    settings = s3_server.settings(bucket)

    async def main():
        backend = ObjectStoreBackend(**settings)
        async with backend:
            db = await AsyncDatabase.create("s3", {**settings, "dataset": "events"})
            pools = [info for info in get_pool_info().values() if info["kind"] == "objectstore-s3"]
            assert len(pools) == 1 and pools[0]["users"] == 2
            await db.close()
        assert not [info for info in get_pool_info().values() if info["kind"] == "objectstore-s3"]

    _run(main())


def test_missing_bucket_fails_at_open(s3_server: S3Server):
    with pytest.raises(PermanentBackendError, match="no-such-records-bucket.*does not exist"):
        _run(AsyncDatabase.create("s3", s3_server.settings("no-such-records-bucket")))


def test_reads_overlapping_compactions_see_every_record_once(s3_server: S3Server):
    config = s3_server.settings(s3_server.new_bucket("records"))

    async def main():
        writer = await AsyncDatabase.create("s3", config)
        # No file cache: every read fetches the files, which the compactions remove under it.
        reader = await AsyncDatabase.create("s3", {**config, "file_cache_bytes": 0})
        expected = set()

        async def write_and_compact():
            for round_number in range(6):
                ids = [f"r{round_number}-{i}" for i in range(50)]
                assert (await writer.create_batch([Record({"round": round_number}, id=k) for k in ids])).ok
                expected.update(ids)
                await writer.compact()

        async def read():
            reads = 0
            while not done.is_set() or reads < 3:
                seen = set(expected)  # written before this read started
                got = [r.id for r in await reader.search(Query({"round": {"gte": 0}}))]
                assert len(got) == len(set(got)), "a record came back twice"
                assert seen <= set(got), "a record written before the read is missing"
                reads += 1
            return reads

        done = asyncio.Event()
        reading = asyncio.ensure_future(read())
        await write_and_compact()
        done.set()
        assert await reading >= 3
        assert sorted(r.id for r in await reader.all()) == sorted(expected)
        await writer.close()
        await reader.close()

    _run(main())


def test_two_processes_writing_one_prefix_lose_nothing(s3_server: S3Server):
    """Two writer processes at once on one S3 prefix, one of them compacting under the other's writes."""
    bucket = s3_server.new_bucket("records")
    config = s3_server.settings(bucket, prefix="shared")
    batches, batch_rows = 16, 20
    summaries = run_two_writers(config, batches, batch_rows, (5, 0))
    assert summaries["a"]["compactions"] == 3

    async def main():
        db = await AsyncDatabase.create("s3", config)
        await check_two_writers(db, summaries, batches, batch_rows, _objects(s3_server, bucket, "shared/records/"))
        await db.close()

    _run(main())
