"""The migrate flow under Prefect's test harness: memory and local Parquet, end to end."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.backends import memory_store
from ferry.backends.errors import DataError, RejectLimitExceeded
from ferry.backends.generator import generate_batches
from ferry.flows.migrate import migrate
from ferry.flows.spec import job_from_dict
from ferry.tasks.rejects import read_rejects

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _job(tmp_path: Path, **overrides) -> dict:
    job = {
        "name": "test-orders",
        "source": {"backend": "memory", "dataset": "orders", "generate": {"rows": 30_000, "seed": 7}},
        "target": {"backend": "local", "url": str(tmp_path / "out"), "dataset": "orders"},
        "mode": "replace",
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 4096, "parallel": 2},
    }
    job.update(overrides)
    return job


def _run(job: dict, run_id: str | None = None) -> dict:
    return asyncio.run(migrate(job=job_from_dict(job), run_id=run_id))


def _parquet_rows(folder: Path) -> int:
    files = [p for p in folder.rglob("*.parquet") if "staging" not in p.parts]
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def test_generated_orders_to_parquet_are_verified(tmp_path):
    job = _job(tmp_path)
    job["source"]["partition_rows"] = 10_000
    summary = _run(job)
    assert summary["rows_written"] == 30_000
    assert summary["verification"]["status"] == "passed"
    assert summary["verification"]["rows_found"] == 30_000
    assert len(summary["partitions"]) == 4  # 3 needed, rounded up to a multiple of parallel
    assert all(p["status"] == "committed" for p in summary["partitions"])
    out = Path(summary["output"])
    assert _parquet_rows(out) == 30_000
    expected = pa.Table.from_batches(list(generate_batches(0, 30_000, seed=7)))
    back = pq.read_table(out).sort_by("order_id")
    assert back.column("order_id").to_pylist() == expected.column("order_id").to_pylist()
    assert back.column("amount").to_pylist() == expected.column("amount").to_pylist()


def test_parquet_back_to_memory_round_trips(tmp_path):
    _run(_job(tmp_path))
    back_job = {
        "name": "back",
        "source": {"backend": "local", "url": str(tmp_path / "out"), "dataset": "orders"},
        "target": {"backend": "memory", "dataset": "copy"},
        "mode": "replace",
        "stream": {"batch_size": 5000, "parallel": 2},
    }
    summary = _run(back_job)
    assert summary["verification"]["status"] == "passed"
    copy = memory_store.table("copy").sort_by("order_id")
    expected = pa.Table.from_batches(list(generate_batches(0, 30_000, seed=7)))
    assert copy.to_pylist() == expected.to_pylist()


def test_transforms_where_and_threads_runner(tmp_path):
    job = _job(
        tmp_path,
        transforms=[
            {"rename": {"customer_name": "customer"}},
            {"derive": {"double_qty": "quantity * 2"}},
            {"select": ["order_id", "customer", "double_qty", "status"]},
        ],
        runner="threads",
    )
    job["source"]["where"] = {"column": "status", "op": "eq", "value": "paid"}
    summary = _run(job)
    table = pq.read_table(summary["output"])
    assert table.column_names == ["order_id", "customer", "double_qty", "status"]
    assert set(table.column("status").to_pylist()) == {"paid"}
    expected = pa.Table.from_batches(list(generate_batches(0, 30_000, seed=7)))
    paid = [r for r in expected.to_pylist() if r["status"] == "paid"]
    assert table.num_rows == len(paid) == summary["rows_written"]
    assert summary["verification"]["status"] == "passed"


def test_rerun_with_same_run_id_skips_committed_partitions(tmp_path):
    job = _job(tmp_path, mode="append")
    first = _run(job, run_id="fixed-run")
    second = _run(job, run_id="fixed-run")
    assert first["rows_written"] == 30_000
    assert all(p["status"] == "skipped" for p in second["partitions"])
    assert _parquet_rows(tmp_path / "out" / "orders") == 30_000


def test_transform_failure_fails_the_run_and_leaves_old_data(tmp_path):
    _run(_job(tmp_path))
    before = sorted(os.listdir(tmp_path / "out" / "orders" / "_ferry" / "versions"))
    bad = _job(tmp_path, transforms=[{"cast": {"status": "int64"}}])
    with pytest.raises(DataError, match="status"):
        _run(bad)
    versions = sorted(os.listdir(tmp_path / "out" / "orders" / "_ferry" / "versions"))
    assert versions == before  # the failed replace left no version behind
    assert _parquet_rows(tmp_path / "out" / "orders" / "_ferry" / "versions") == 30_000
    assert not (tmp_path / "out" / "orders" / "_ferry" / "staging").exists() or not any(
        (tmp_path / "out" / "orders" / "_ferry" / "staging").iterdir()
    )


def test_collect_routes_bad_rows_to_rejects(tmp_path):
    # 'paid' cannot become an integer: every paid order is rejected, the rest load.
    job = _job(
        tmp_path,
        on_error="collect",
        key=["order_id"],
        transforms=[{"derive": {"status_code": "cast(if_else(status == 'paid', 'x', '1'), 'int64')"}}],
    )
    summary = _run(job)
    expected = pa.Table.from_batches(list(generate_batches(0, 30_000, seed=7)))
    paid = sum(1 for s in expected.column("status").to_pylist() if s == "paid")
    assert summary["rows_rejected"] == paid
    assert summary["rows_written"] == 30_000 - paid
    rows = [r for path in summary["rejects_files"] for r in read_rejects(path)]
    assert len(rows) == paid
    assert {r["error_class"] for r in rows}
    assert all(r["record"] and r["row_key"].startswith("[") for r in rows)
    assert summary["verification"]["status"] == "passed"


def test_reject_limit_stops_the_run(tmp_path):
    job = _job(
        tmp_path,
        on_error="collect",
        max_rejected_rows=10,
        transforms=[{"cast": {"status": "int64"}}],
    )
    with pytest.raises(RejectLimitExceeded):
        _run(job)


def test_run_publishes_partition_table_and_summary_artifacts(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = _run(_job(tmp_path, name="artifact-check"))

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ferry-artifact-check", "ferry-artifact-check-summary"]))
            )

    artifacts = {a.key: a for a in asyncio.run(read())}
    table = artifacts["ferry-artifact-check"]
    assert table.type == "table"
    assert summary["run_id"] in table.description
    for partition in summary["partitions"]:
        assert partition["partition"] in str(table.data)
    assert "Verification**: passed" in str(artifacts["ferry-artifact-check-summary"].data)


def _task_runs_tagged(tag):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[tag])))

    return sorted(r.name for r in asyncio.run(read()))


def _set_tag_limit(tag, limit):
    from prefect.client.orchestration import get_client

    async def create():
        async with get_client() as client:
            if limit is None:
                await client.delete_global_concurrency_limit_by_name(f"tag:{tag}")
            else:
                await client.upsert_global_concurrency_limit_by_name(f"tag:{tag}", limit)

    asyncio.run(create())


def test_partition_tasks_carry_the_store_tag_that_has_a_concurrency_limit(tmp_path):
    from ferry.flows.spec import build_backend

    job = job_from_dict(_job(tmp_path, name="tag-check"))
    target_tag = asyncio.run(build_backend(job.target)).concurrency_tag()
    source_tag = asyncio.run(build_backend(job.source)).concurrency_tag()
    assert target_tag.startswith("ferry-objectstore-")
    _set_tag_limit(target_tag, 1)
    try:
        summary = asyncio.run(migrate(job=job))
    finally:
        _set_tag_limit(target_tag, None)
    # The stage tasks (read, transform, write) run inside a partition and carry no tag.
    assert _task_runs_tagged(target_tag) == sorted(f"partition {p['partition']}" for p in summary["partitions"])
    # No limit on the source's tag: no task carries it (it would only cost a slot request per partition).
    assert _task_runs_tagged(source_tag) == []


def test_without_a_concurrency_limit_partition_tasks_carry_no_store_tag(tmp_path):
    from ferry.flows.spec import build_backend

    job = job_from_dict(_job(tmp_path, name="untagged-check"))
    summary = asyncio.run(migrate(job=job))
    assert summary["partitions"]
    for endpoint in (job.source, job.target):
        assert _task_runs_tagged(asyncio.run(build_backend(endpoint)).concurrency_tag()) == []


def test_a_job_given_as_parameters_may_not_carry_a_secret(tmp_path, monkeypatch):
    from ferry.backends.errors import ConfigurationError

    job = _job(tmp_path)
    job["target"] = {"backend": "postgres", "host": "127.0.0.1", "dataset": "orders", "password": "hunter2"}
    with pytest.raises(ConfigurationError) as info:
        _run(job)
    assert info.value.path == "target.password"
    assert "hunter2" not in str(info.value)
    assert "${ENV_VAR}" in str(info.value) and "block" in str(info.value)
