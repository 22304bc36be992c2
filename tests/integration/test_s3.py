"""The object-store backend on S3 (a real moto server on 127.0.0.1) and on local folders.

Covers the S3 settings, the pooled filesystems, the write protocol (staging,
commit markers, the CURRENT manifest, retries, pruning), encryption and
storage class on written objects, and the errors for bad input.
"""

from __future__ import annotations

import asyncio
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.backends import ObjectStoreBackend, WriteContext, WriteMode, get_pool_info
from ferry.backends.errors import ConfigurationError, PermanentBackendError, TransientBackendError
from ferry.backends.objectstore_fs import ObjectStoreSettingWarning
from tests.integration.s3_server import TEST_SECRET, S3Server, s3_server, start_moto, stop_moto  # noqa: F401
from tests.integration.test_contract import _read_all, _sorted_rows, _stream, _write, every_type_table

pytestmark = pytest.mark.integration


def _ids(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()), "name": [f"n{i}" for i in range(start, start + n)]})


def run(coro):
    return asyncio.run(coro)


# -- settings ------------------------------------------------------------------------


def test_url_bucket_and_prefix_forms():
    by_url = ObjectStoreBackend(url="s3://my-bucket/lake/raw")
    by_parts = ObjectStoreBackend(bucket="my-bucket", prefix="/lake/raw/")
    assert by_url.location_info().root == by_parts.location_info().root == "my-bucket/lake/raw"
    assert by_url.location("orders") == "s3://my-bucket/lake/raw/orders"
    assert ObjectStoreBackend(url="s3://my-bucket").location_info().root == "my-bucket"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"url": "s3://ab/x"}, "3 to 63"),
        ({"url": "s3://Upper/x"}, "bucket name"),
        ({"url": "/tmp/x", "bucket": "abc"}, "not both"),
        ({"url": "/tmp/x", "endpoint_url": "http://127.0.0.1:9000"}, "only apply to s3://"),
        ({"url": "s3://abc/x", "sse_kms_key_id": "k"}, "aws:kms"),
        ({"url": "s3://abc/x", "format": "csv", "compression": "zstd"}, "gzip or none"),
        ({"url": "gs://abc/x"}, "not supported"),
        ({"url": "s3://abc/x", "read_schema": {"a": "no_such_type"}}, "read_schema.a"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(settings, message):
    with pytest.raises(Exception, match=message):
        ObjectStoreBackend(**settings)


def test_secrets_never_show():
    block = ObjectStoreBackend(url="s3://abc/x", key="AKIAEXAMPLE", secret="very-secret", session_token="tok-123")
    shown = repr(block) + block.describe() + str(block.model_dump(mode="json"))
    for secret in ("AKIAEXAMPLE", "very-secret", "tok-123"):
        assert secret not in shown


def test_max_io_queue_is_accepted_with_one_warning_naming_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = ObjectStoreBackend(url="s3://abc/x", transfer={"max_io_queue": 100, "multipart_chunksize": 8 * 2**20})
    texts = [str(w.message) for w in caught if issubclass(w.category, ObjectStoreSettingWarning)]
    assert len(texts) == 1 and "max_io_queue" in texts[0] and "no effect" in texts[0]
    assert block.transfer.block_size == 8 * 2**20


def test_transfer_and_pool_settings_reach_s3fs():
    from ferry.backends.objectstore_fs import s3fs_options

    block = ObjectStoreBackend(
        url="s3://abc/x",
        region="eu-west-1",
        pool={"max_connections": 33},
        transfer={"multipart_chunksize": 16 * 2**20, "max_concurrency": 7},
        server_side_encryption="aws:kms",
        sse_kms_key_id="key-1",
        storage_class="STANDARD_IA",
        requester_pays=True,
    )
    options = s3fs_options(block)
    assert options["config_kwargs"]["max_pool_connections"] == 33
    assert options["default_block_size"] == 16 * 2**20
    assert options["max_concurrency"] == 7
    assert options["requester_pays"] is True
    assert "region_name" not in options["client_kwargs"]  # moto and others refuse bucket creation with it
    assert options["s3_additional_kwargs"] == {
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "key-1",
        "StorageClass": "STANDARD_IA",
    }


def test_pyarrow_io_filesystem_refuses_what_it_cannot_do(s3_server: S3Server):
    block = ObjectStoreBackend(**s3_server.settings("abc"), io_filesystem="pyarrow", storage_class="STANDARD_IA")

    async def scenario():
        async with block:
            pass

    with pytest.raises(Exception, match="io_filesystem"):
        run(scenario())


# -- pools ---------------------------------------------------------------------------


def test_filesystems_are_pooled_listed_and_closed(s3_server: S3Server):
    bucket = s3_server.new_bucket()
    first = ObjectStoreBackend(**s3_server.settings(bucket, "a"))
    second = ObjectStoreBackend(**s3_server.settings(bucket, "b"))  # other prefix, same clients

    async def scenario():
        async with first, second:
            pools = {name: info for name, info in get_pool_info().items() if info["kind"] == "objectstore-s3"}
            assert len(pools) == 1
            (info,) = pools.values()
            assert info["users"] == 2 and info["loop_id"] is None
            assert info["limits"]["max_pool_connections"] == 10
            assert "s3fs" in info["data_io"]
            assert TEST_SECRET not in json.dumps(info)
        assert not [i for i in get_pool_info().values() if i["kind"] == "objectstore-s3"]

    run(scenario())


# -- the write protocol on S3 ---------------------------------------------------------


def _backend(s3_server: S3Server, **extra) -> tuple[ObjectStoreBackend, str]:
    bucket = s3_server.new_bucket()
    return ObjectStoreBackend(**s3_server.settings(bucket, "lake", **extra)), bucket


def test_append_names_files_by_run_and_partition_and_never_overwrites(s3_server: S3Server):
    backend, bucket = _backend(s3_server)

    async def scenario():
        async with backend:
            await _write(backend, "orders", _ids(10), run_id="run-a", partitions=("p0", "p1"))
            await _write(backend, "orders", _ids(10, 10), run_id="run-b", partitions=("p0", "p1"))
            return await _read_all(backend, "orders")

    back = run(scenario())
    assert sorted(back.column("id").to_pylist()) == list(range(20))
    data = [k for k in s3_server.keys(bucket, "lake/orders/") if "/_ferry/" not in k]
    assert data == [
        "lake/orders/run-a-p0-0000.parquet",
        "lake/orders/run-a-p1-0000.parquet",
        "lake/orders/run-b-p0-0000.parquet",
        "lake/orders/run-b-p1-0000.parquet",
    ]
    assert not [k for k in s3_server.keys(bucket) if "/staging/" in k]
    assert s3_server.keys(bucket, "lake/orders/_ferry/commits/run-a/") == [
        "lake/orders/_ferry/commits/run-a/p0.json",
        "lake/orders/_ferry/commits/run-a/p1.json",
    ]


def test_replace_publishes_a_manifest_and_prunes_old_versions(s3_server: S3Server):
    backend, bucket = _backend(s3_server, keep_versions=1)

    async def scenario():
        async with backend:
            await _write(backend, "t", _ids(5), run_id="v1")
            await _write(backend, "t", _ids(6), mode=WriteMode.REPLACE, run_id="v2")
            await _write(backend, "t", _ids(7), mode=WriteMode.REPLACE, run_id="v3", partitions=("p0", "p1"))
            await _write(backend, "t", _ids(8), mode=WriteMode.REPLACE, run_id="v4")
            return await _read_all(backend, "t"), backend.manifest("t")

    back, manifest = run(scenario())
    assert back.num_rows == 8
    assert manifest["version"] == "v4" and manifest["history"][:1] == ["v3"] and manifest["rows"] == 8
    keys = s3_server.keys(bucket, "lake/t/")
    versions = sorted({k.split("/")[4] for k in keys if "/_ferry/versions/" in k})
    assert versions == ["v3", "v4"]  # keep_versions: 1 keeps the previous one
    # The first replace removed the plain folder's appended files.
    assert [k for k in keys if "/_ferry/" not in k] == []
    body = s3_server.client().get_object(Bucket=bucket, Key="lake/t/_ferry/CURRENT")["Body"].read()
    assert json.loads(body)["files"] == ["v4-p0-0000.parquet"]


def test_retried_partition_leaves_no_extra_files(s3_server: S3Server):
    backend, bucket = _backend(s3_server, file_max_rows=3)
    table = _ids(10)

    async def failing(after_rows: int):
        for batch in table.to_batches(max_chunksize=2):
            if after_rows <= 0:
                raise RuntimeError("source died")
            after_rows -= batch.num_rows
            yield batch

    async def scenario(mode: WriteMode, dataset: str):
        async with backend:
            ctx = WriteContext(run_id="r1", job_name="t", mode=mode, schema=table.schema)
            await backend.begin_write(dataset, ctx)
            with pytest.raises(RuntimeError):
                await backend.write(dataset, "p0", failing(7), ctx)
            # A killed attempt also leaves files behind without running its clean-up:
            # put one where a rolled file of the dead attempt would be.
            leftover = ctx.state["objectstore_data_path"] + "/r1-p0-0009.parquet"
            if mode is WriteMode.APPEND:
                leftover = backend._meta(dataset, "staging", "r1", "p0", "r1-p0-0000.parquet")
                backend._filesystems().fs.pipe_file(ctx.state["objectstore_data_path"] + "/r1-p0-0007.parquet", b"x")
            backend._filesystems().fs.pipe_file(leftover, b"partial")
            result = await backend.write(dataset, "p0", _stream(table), ctx)
            again = await backend.write(dataset, "p0", _stream(table), ctx)
            await backend.publish(dataset, ctx)
            return result, again, await _read_all(backend, dataset)

    for mode, dataset in ((WriteMode.REPLACE, "rep"), (WriteMode.APPEND, "app")):
        result, again, back = run(scenario(mode, dataset))
        assert sorted(back.column("id").to_pylist()) == list(range(10)), mode
        assert again.skipped and not result.skipped
        data = [k for k in s3_server.keys(bucket, f"lake/{dataset}/") if k.endswith(".parquet") and "/staging/" not in k]
        assert len(data) == 4, (mode, data)  # 10 rows, 3 per file
        assert not [k for k in s3_server.keys(bucket, f"lake/{dataset}/") if "/staging/" in k]


def test_objects_get_encryption_and_storage_class(s3_server: S3Server):
    backend, bucket = _backend(s3_server, server_side_encryption="AES256", storage_class="STANDARD_IA")

    async def scenario():
        async with backend:
            await _write(backend, "enc", _ids(4), mode=WriteMode.REPLACE, run_id="e1")
            await _write(backend, "enc", _ids(4), run_id="e2")  # append: copied from staging

    run(scenario())
    client = s3_server.client()
    data = [k for k in s3_server.keys(bucket, "lake/enc/") if k.endswith(".parquet")]
    assert len(data) == 2
    for key in data + ["lake/enc/_ferry/CURRENT"]:
        head = client.head_object(Bucket=bucket, Key=key)
        assert head.get("ServerSideEncryption") == "AES256", key
        assert head.get("StorageClass") == "STANDARD_IA", key


def test_pyarrow_native_filesystem_round_trips(s3_server: S3Server):
    backend, _ = _backend(s3_server, io_filesystem="pyarrow")
    table = every_type_table()

    async def scenario():
        async with backend:
            assert "pyarrow.fs.S3FileSystem" in backend._filesystems().io_class
            await _write(backend, "types", table, partitions=("p0", "p1"))
            return await _read_all(backend, "types")

    back = run(scenario())
    assert _sorted_rows(back) == _sorted_rows(table)


def test_role_arn_is_assumed_through_sts(s3_server: S3Server):
    backend, _ = _backend(s3_server, role_arn="arn:aws:iam::123456789012:role/ferry-writer")

    async def scenario():
        import fsspec.asyn

        async with backend:
            await _write(backend, "role", _ids(3))
            fs = backend._filesystems().fs
            # Requests are signed with the role's temporary credentials (moto's STS hands out ASIA... keys).
            signer = fs._s3._request_signer._credentials
            frozen = fsspec.asyn.sync(fs.loop, signer.get_frozen_credentials)
            return frozen, await _read_all(backend, "role")

    frozen, back = run(scenario())
    assert frozen.access_key.startswith("ASIA") and frozen.token
    assert back.num_rows == 3


def test_large_parquet_file_is_read_as_row_group_partitions(s3_server: S3Server):
    backend, _ = _backend(s3_server, row_group_rows=1000, partition_max_bytes=4096)
    table = _ids(10_000)

    async def scenario():
        async with backend:
            await _write(backend, "big", table)
            parts = await backend.partitions("big")
            seen = []
            for part in parts:
                async for batch in backend.read(part):
                    seen.extend(batch.column("id").to_pylist())
            return parts, seen

    parts, seen = run(scenario())
    assert len(parts) > 2
    assert all("row_groups" in p.spec for p in parts)
    assert sum(p.estimated_rows for p in parts) == 10_000
    assert sorted(seen) == list(range(10_000))


def test_parquet_compression_and_row_group_size_apply(tmp_path):
    backend = ObjectStoreBackend(url=str(tmp_path), compression="zstd", row_group_rows=100)

    async def scenario():
        async with backend:
            await _write(backend, "z", _ids(1000))
            return backend.data_files("z")

    (path,) = run(scenario())
    meta = pq.read_metadata(path)
    assert meta.num_row_groups == 10
    assert meta.row_group(0).column(0).compression == "ZSTD"


# -- bad input -----------------------------------------------------------------------


def test_missing_bucket_is_named(s3_server: S3Server):
    backend = ObjectStoreBackend(**s3_server.settings("no-such-bucket-here"))

    async def scenario():
        async with backend:
            pass

    with pytest.raises(PermanentBackendError, match="no-such-bucket-here.*does not exist"):
        run(scenario())


def test_unreachable_endpoint_is_named():
    backend = ObjectStoreBackend(url="s3://abc/x", endpoint_url="http://127.0.0.1:9", path_style=True, key="k", secret="s")

    async def scenario():
        async with backend:
            pass

    with pytest.raises(TransientBackendError, match=r"cannot reach the object store at http://127.0.0.1:9"):
        run(scenario())


def test_wrong_credentials_are_named(s3_server: S3Server):
    # A second moto server with authentication on (the shared one accepts any key).
    process, endpoint = start_moto(
        str(__import__("tests.integration.s3_server", fromlist=["x"]).moto_server_binary()),
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"},
    )
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="a", aws_secret_access_key="b").create_bucket(
            Bucket="locked"
        )
        backend = ObjectStoreBackend(url="s3://locked/x", endpoint_url=endpoint, path_style=True, key="wrong", secret="wrong")

        async def scenario():
            async with backend:
                pass

        with pytest.raises(PermanentBackendError, match=r"s3://locked: access denied; check `key`/`secret`"):
            run(scenario())
    finally:
        stop_moto(process)


def _put_files(s3_server: S3Server, bucket: str, files: dict[str, bytes]) -> None:
    client = s3_server.client()
    for key, body in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_corrupt_and_truncated_files_are_named(s3_server: S3Server):
    backend, bucket = _backend(s3_server)
    good = _parquet_bytes(_ids(5))
    _put_files(s3_server, bucket, {"lake/bad/a.parquet": good, "lake/bad/b.parquet": good[: len(good) // 2]})
    _put_files(s3_server, bucket, {"lake/junk/a.parquet": b"this is not parquet at all"})

    async def scenario(dataset):
        async with backend:
            await backend.partitions(dataset)

    with pytest.raises(PermanentBackendError, match=r"s3://.*/lake/bad/b.parquet \(corrupt or truncated\?\)"):
        run(scenario("bad"))
    with pytest.raises(PermanentBackendError, match=r"lake/junk/a.parquet"):
        run(scenario("junk"))


def test_schema_differing_between_files_names_both(s3_server: S3Server):
    backend, bucket = _backend(s3_server)
    _put_files(
        s3_server,
        bucket,
        {
            "lake/mixed/a.parquet": _parquet_bytes(_ids(3)),
            "lake/mixed/b.parquet": _parquet_bytes(pa.table({"id": ["x", "y"]})),
        },
    )

    async def scenario():
        async with backend:
            await backend.schema("mixed")

    with pytest.raises(PermanentBackendError, match=r"mixed/b.parquet has a schema that differs from .*mixed/a.parquet \(id: int64 vs string\)"):
        run(scenario())


def test_missing_dataset_says_where_it_looked(s3_server: S3Server):
    backend, bucket = _backend(s3_server)

    async def scenario():
        async with backend:
            assert not await backend.exists("nothing")
            await backend.schema("nothing")

    with pytest.raises(ConfigurationError, match=rf"no Parquet files found for dataset 'nothing' under s3://{bucket}/lake/nothing"):
        run(scenario())


# -- a killed replace ------------------------------------------------------------------

_KILLED_WRITER = r'''
import asyncio, json, sys, time
import pyarrow as pa
from ferry.backends import ObjectStoreBackend, WriteContext, WriteMode

settings, phase = json.loads(sys.argv[1]), sys.argv[2]
table = pa.table({"id": pa.array(range(1000, 2000), pa.int64())})

async def batches(part):
    for batch in part.to_batches(max_chunksize=100):
        yield batch
        if phase == "write":
            print("WRITING", flush=True)
            await asyncio.sleep(0.5)

async def main():
    backend = ObjectStoreBackend(**settings)
    async with backend:
        ctx = WriteContext(run_id="new", job_name="t", mode=WriteMode.REPLACE, schema=table.schema)
        await backend.begin_write("ds", ctx)
        for index, pid in enumerate(("p0", "p1")):
            await backend.write("ds", pid, batches(table.slice(index * 500, 500)), ctx)
        fs = backend._filesystems().fs
        original = fs.pipe_file

        def pipe_file(path, value, **kwargs):
            # Stop the process just before, or just after, the manifest PUT.
            if path.endswith("/_ferry/CURRENT") and phase == "publish-before":
                print("PUBLISHING", flush=True)
                time.sleep(60)
            result = original(path, value, **kwargs)
            if path.endswith("/_ferry/CURRENT") and phase == "publish-after":
                print("PUBLISHED", flush=True)
                time.sleep(60)
            return result

        fs.pipe_file = pipe_file
        await backend.publish("ds", ctx)

asyncio.run(main())
'''


@pytest.mark.parametrize("phase, signal_line, survivor", [
    ("write", "WRITING", "old"),
    ("publish-before", "PUBLISHING", "old"),
    ("publish-after", "PUBLISHED", "new"),
])
def test_replace_killed_during_write_or_publish_leaves_a_whole_dataset(s3_server: S3Server, phase, signal_line, survivor):
    import os
    import signal
    import subprocess
    import sys

    bucket = s3_server.new_bucket()
    settings = s3_server.settings(bucket, "lake")
    backend = ObjectStoreBackend(**settings)
    old = pa.table({"id": pa.array(range(1000), pa.int64())})

    async def write_old():
        async with backend:
            await _write(backend, "ds", old, mode=WriteMode.REPLACE, run_id="old", partitions=("p0", "p1"))

    run(write_old())
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, json.dumps(settings), phase],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline().strip()
        assert line == signal_line, f"the writer said {line!r} (exit code {child.poll()})"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        child.stdout.close()

    async def read_back():
        async with backend:
            return await _read_all(backend, "ds")

    ids = sorted(run(read_back()).column("id").to_pylist())
    assert ids == (list(range(1000)) if survivor == "old" else list(range(1000, 2000)))

    # The next replace publishes and removes what the killed run left.
    async def next_replace():
        async with backend:
            await _write(backend, "ds", _ids(3), mode=WriteMode.REPLACE, run_id="third")
            return await _read_all(backend, "ds")

    assert run(next_replace()).num_rows == 3
    versions = {k.split("/")[4] for k in s3_server.keys(bucket, "lake/ds/_ferry/versions/")}
    assert versions == {"third"}


# -- the migrate flow, end to end -----------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_migrate_memory_to_s3_and_back_is_verified(s3_server: S3Server):
    from ferry.backends import memory_store
    from ferry.backends.generator import generate_batches
    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict

    bucket = s3_server.new_bucket()
    # Secrets in a job given as parameters are ${ENV} references (the fixture exports them).
    target = {
        "backend": "s3",
        "dataset": "orders",
        **s3_server.settings(bucket, "lake", key="${AWS_ACCESS_KEY_ID}", secret="${AWS_SECRET_ACCESS_KEY}"),
    }
    to_s3 = {
        "name": "to-s3",
        "source": {"backend": "memory", "dataset": "orders", "generate": {"rows": 20_000, "seed": 3}, "partition_rows": 5000},
        "target": target,
        "mode": "replace",
        "stream": {"batch_size": 4096, "parallel": 2},
    }
    summary = asyncio.run(migrate(job=job_from_dict(to_s3)))
    assert summary["verification"]["status"] == "passed"
    assert summary["output"].startswith(f"s3://{bucket}/lake/orders/_ferry/versions/")
    back = {
        "name": "from-s3",
        "source": {**target},
        "target": {"backend": "memory", "dataset": "copy"},
        "mode": "replace",
        "stream": {"batch_size": 4096, "parallel": 2},
    }
    summary = asyncio.run(migrate(job=job_from_dict(back)))
    assert summary["verification"]["status"] == "passed"
    expected = pa.Table.from_batches(list(generate_batches(0, 20_000, seed=3)))
    assert memory_store.table("copy").sort_by("order_id").to_pylist() == expected.to_pylist()


def test_small_files_are_packed_into_partitions_and_verify_finds_its_own(s3_server: S3Server):
    backend, _ = _backend(s3_server)
    parts_of = tuple(f"p{i:02d}" for i in range(10))

    async def scenario():
        async with backend:
            await _write(backend, "small", _ids(100), run_id="first", partitions=parts_of)
            await _write(backend, "small", _ids(50, 100), run_id="second", partitions=parts_of[:5])
            packed = await backend.partitions("small", hint=2)
            seen = []
            for part in packed:
                async for batch in backend.read(part):
                    seen.extend(batch.column("id").to_pylist())
            own = backend.partitions_written_by("second", packed)
            mine = []
            for part in own:
                async for batch in backend.read(part):
                    mine.extend(batch.column("id").to_pylist())
            return packed, seen, mine

    packed, seen, mine = run(scenario())
    assert len(packed) == 2 and sum(len(p.spec["files"]) for p in packed) == 15
    assert sum(p.estimated_rows for p in packed) == 150
    assert sorted(seen) == list(range(150))
    assert sorted(mine) == list(range(100, 150))


def test_region_goes_to_the_session_not_client_kwargs(s3_server: S3Server):
    backend, _ = _backend(s3_server, region="eu-west-1")

    async def scenario():
        async with backend:
            fs = backend._filesystems().fs
            assert "region_name" not in fs.client_kwargs
            await _write(backend, "regional", _ids(3))
            return await _read_all(backend, "regional")

    assert run(scenario()).num_rows == 3


def test_files_roll_at_the_byte_limit_as_well_as_the_row_limit(s3_server: S3Server):
    by_bytes, bucket = _backend(s3_server, row_group_rows=500, file_max_bytes=4096)
    table = _ids(5000)

    async def scenario(backend, dataset):
        async with backend:
            result = None
            ctx = WriteContext(run_id="r", job_name="t", mode=WriteMode.APPEND, schema=table.schema)
            await backend.begin_write(dataset, ctx)
            result = await backend.write(dataset, "p0", _stream(table, rows=500), ctx)
            await backend.publish(dataset, ctx)
            return result, await _read_all(backend, dataset)

    result, back = run(scenario(by_bytes, "bytes"))
    sizes = [s3_server.client().head_object(Bucket=bucket, Key=f.removeprefix(f"s3://{bucket}/"))["ContentLength"] for f in result.files]
    assert len(result.files) > 2
    # Each file is cut at the first row group past the limit.
    assert all(size < 4096 + 20_000 for size in sizes)
    assert result.bytes_written == sum(sizes)
    assert sorted(back.column("id").to_pylist()) == list(range(5000))
