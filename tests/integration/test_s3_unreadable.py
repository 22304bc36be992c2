"""Unreadable source objects on S3 (a real moto server): named with `on_error: fail`, left out and reported with `collect`."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.backends import ObjectStoreBackend, memory_store
from ferry.backends.base import ReadPolicy
from ferry.backends.errors import PermanentBackendError
from tests.integration.s3_server import S3Server, s3_server  # noqa: F401

pytestmark = pytest.mark.integration

COLLECT = ReadPolicy(on_error="collect")


def _ids(start: int, count: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + count), pa.int64()), "name": [f"n{i}" for i in range(start, start + count)]})


def _parquet_bytes(table: pa.Table, *, broken_row_group: int | None = None) -> bytes:
    """Uncompressed Parquet; with ``broken_row_group`` that group's first page header is overwritten."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1_000, compression="none")
    data = bytearray(sink.getvalue().to_pybytes())
    if broken_row_group is not None:
        meta = pq.read_metadata(pa.BufferReader(bytes(data)))
        offset = meta.row_group(broken_row_group).column(0).data_page_offset
        data[offset : offset + 16] = b"\xff" * 16
    return bytes(data)


def _put(s3_server: S3Server, bucket: str, files: dict[str, bytes]) -> None:
    client = s3_server.client()
    for key, body in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


async def _read(store: ObjectStoreBackend, dataset: str) -> list[int]:
    async with store:
        ids: list[int] = []
        for part in await store.partitions(dataset, hint=1):
            async for batch in store.read(part, batch_rows=500):
                ids.extend(batch.column("id").to_pylist())
        return ids


def test_parquet_objects_that_cannot_be_read(s3_server: S3Server):
    bucket = s3_server.new_bucket()
    _put(
        s3_server,
        bucket,
        {
            "lake/orders/a.parquet": _parquet_bytes(_ids(0, 5_000)),
            "lake/orders/b.parquet": b"PAR1 and then nothing useful",
            "lake/orders/c.parquet": _parquet_bytes(_ids(5_000, 5_000), broken_row_group=3),
            "lake/orders/d.parquet": _parquet_bytes(_ids(10_000, 5_000)),
        },
    )
    # One partition: the three readable footers share one scanner.
    settings = s3_server.settings(bucket, "lake", partition_min_bytes=10**9)

    with pytest.raises(PermanentBackendError, match=rf"s3://{bucket}/lake/orders/b\.parquet \(corrupt or truncated\?\)"):
        asyncio.run(_read(ObjectStoreBackend(**settings), "orders"))

    store = ObjectStoreBackend(**settings).set_read_policy(COLLECT)
    ids = asyncio.run(_read(store, "orders"))
    entries = {e.object: e for e in store.unreadable_inputs()}
    assert set(entries) == {f"s3://{bucket}/lake/orders/b.parquet", f"s3://{bucket}/lake/orders/c.parquet"}
    assert entries[f"s3://{bucket}/lake/orders/b.parquet"].step == "plan"
    broken = entries[f"s3://{bucket}/lake/orders/c.parquet"]
    assert broken.step == "read" and broken.partition == "files-00000"
    assert "cannot read Parquet file" in broken.reason
    assert len(ids) == len(set(ids))
    assert sorted(ids) == list(range(0, 5_000 + broken.rows_read)) + list(range(10_000, 15_000))

    # Without the unreadable footer, the failing data page fails the read naming its object.
    s3_server.client().delete_object(Bucket=bucket, Key="lake/orders/b.parquet")
    with pytest.raises(PermanentBackendError, match=rf"cannot read Parquet file s3://{bucket}/lake/orders/c\.parquet"):
        asyncio.run(_read(ObjectStoreBackend(**settings), "orders"))


def test_json_lines_object_with_a_broken_line(s3_server: S3Server):
    bucket = s3_server.new_bucket()
    good = "".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(20)).encode()
    _put(
        s3_server,
        bucket,
        {
            "lake/events/a.jsonl": good,
            "lake/events/b.jsonl": b'{"id": 100, "name": "n100"}\n{"id": 101, "na',
        },
    )
    settings = s3_server.settings(bucket, "lake", format="jsonl", read_schema={"id": "int64", "name": "string"})
    with pytest.raises(PermanentBackendError, match=rf"cannot read s3://{bucket}/lake/events/b\.jsonl"):
        asyncio.run(_read(ObjectStoreBackend(**settings), "events"))

    store = ObjectStoreBackend(**settings).set_read_policy(COLLECT)
    assert sorted(asyncio.run(_read(store, "events"))) == list(range(20))
    [entry] = store.unreadable_inputs()
    assert entry.object == f"s3://{bucket}/lake/events/b.jsonl" and entry.step == "read"


@pytest.mark.usefixtures("prefect_harness")
def test_collect_run_from_s3_reports_the_object_it_left_out(s3_server: S3Server, tmp_path):
    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict
    from ferry.tasks.rejects import read_unreadable_files

    bucket = s3_server.new_bucket()
    _put(
        s3_server,
        bucket,
        {
            "lake/orders/a.parquet": _parquet_bytes(_ids(0, 3_000)),
            "lake/orders/b.parquet": _parquet_bytes(_ids(3_000, 3_000))[:-100],  # truncated: no footer
            "lake/orders/c.parquet": _parquet_bytes(_ids(6_000, 3_000)),
        },
    )
    job = {
        "name": "s3-bad-input",
        "source": {
            "backend": "s3",
            **s3_server.settings(bucket, "lake", key="${AWS_ACCESS_KEY_ID}", secret="${AWS_SECRET_ACCESS_KEY}"),
            "dataset": "orders",
        },
        "target": {"backend": "memory", "dataset": "orders"},
        "mode": "replace",
        "on_error": "collect",
        "rejects_dir": str(tmp_path / "rejects"),
    }
    summary = asyncio.run(migrate(job=job_from_dict(job)))
    [entry] = summary["unreadable_files"]
    assert entry["object"] == f"s3://{bucket}/lake/orders/b.parquet" and entry["step"] == "plan"
    assert summary["rows_written"] == 6_000
    assert sorted(memory_store.table("orders").column("id").to_pylist()) == list(range(3_000)) + list(range(6_000, 9_000))
    assert summary["verification"]["status"] == "passed" and "could not be read" in summary["verification"]["note"]
    assert read_unreadable_files(summary["unreadable_report"]) == summary["unreadable_files"]

    job["on_error"] = "fail"
    with pytest.raises(PermanentBackendError, match=rf"s3://{bucket}/lake/orders/b\.parquet"):
        asyncio.run(migrate(job=job_from_dict(job)))
