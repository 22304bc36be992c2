"""The PostgreSQL backend inside the real ``migrate`` flow (Prefect test harness, real server)."""

from __future__ import annotations

import asyncio

import asyncpg
import pyarrow as pa
import pytest

from ferry.backends import memory_store
from ferry.backends.generator import generate_batches
from ferry.backends.pools import get_pool_info
from ferry.flows.migrate import migrate
from ferry.flows.spec import job_from_dict
from tests.integration.pg_server import postgres_server  # noqa: F401

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _pg(server, **extra) -> dict:
    return {"backend": "postgres", **server.settings(sslmode="disable"), **extra}


def _run(job: dict, run_id: str | None = None, sampler=None) -> dict:
    async def main():
        task = asyncio.ensure_future(sampler()) if sampler else None
        try:
            return await migrate(job=job_from_dict(job), run_id=run_id)
        finally:
            if task:
                task.cancel()

    return asyncio.run(main())


async def _fetch(server, query: str):
    conn = await asyncpg.connect(server.dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


def test_generated_orders_to_postgres_and_back_in_8_partitions_use_one_pool_per_backend(postgres_server, tmp_path):
    rows = 8_000
    load = {
        "name": "pg-load",
        "source": {"backend": "memory", "dataset": "orders", "generate": {"rows": rows, "seed": 3}, "partition_rows": 1_000},
        "target": _pg(postgres_server, dataset="orders_flow"),
        "mode": "replace",
        "key": ["order_id"],
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 500, "parallel": 2},
    }
    summary = _run(load)
    assert summary["rows_written"] == rows
    assert summary["verification"]["status"] == "passed"
    assert len(summary["partitions"]) == 8

    seen: list[dict] = []

    async def sample():
        while True:
            seen.append(get_pool_info())
            await asyncio.sleep(0.005)

    copy = {
        "name": "pg-copy",
        "source": _pg(postgres_server, dataset="orders_flow", partition_rows=1_000),
        "target": _pg(postgres_server, dataset="orders_flow_copy", schema="copies"),
        "mode": "append",
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 500, "parallel": 2},
    }
    summary = _run(copy, sampler=sample)
    assert summary["rows_written"] == rows
    assert summary["verification"]["status"] == "passed"
    assert len(summary["partitions"]) == 8
    # One asyncpg pool per backend (source and target differ by schema), on the flow's loop.
    busy = [info for info in seen if any(row["kind"] == "postgres" for row in info.values())]
    assert busy, "no pool was ever seen open"
    for info in busy:
        asyncpg_pools = [row for row in info.values() if row["kind"] == "postgres"]
        assert len(asyncpg_pools) <= 2
        assert len({row["config_hash"] for row in asyncpg_pools}) == len(asyncpg_pools)
        for row in asyncpg_pools:
            assert {"loop_id", "config_hash", "size", "idle", "in_use", "limits", "age_seconds"} <= set(row)
            assert row["limits"]["max_size"] == 10
    assert max(len([r for r in i.values() if r["kind"] == "postgres"]) for i in busy) == 2
    # Partitions ran on the flow's loop: one loop id for every asyncpg pool seen.
    assert len({r["loop_id"] for i in busy for r in i.values() if r["kind"] == "postgres"}) == 1

    back = asyncio.run(_fetch(postgres_server, "SELECT count(*), count(DISTINCT order_id), sum(amount) FROM copies.orders_flow_copy"))
    expected = pa.Table.from_batches(list(generate_batches(0, rows, seed=3)))
    assert back[0][0] == rows and back[0][1] == rows
    assert back[0][2] == sum(v for v in expected.column("amount").to_pylist() if v is not None)


def test_upsert_through_the_flow_last_row_wins_and_rerun_adds_nothing(postgres_server, tmp_path):
    table = pa.table(
        {
            "id": pa.array([1, 2, 1, 3, 2], pa.int64()),
            "value": pa.array(["a", "b", "c", "d", "e"]),
        }
    )
    memory_store.put("changes", table)
    job = {
        "name": "pg-upsert",
        "source": {"backend": "memory", "dataset": "changes"},
        "target": _pg(postgres_server, dataset="upserted"),
        "mode": "upsert",
        "key": ["id"],
        # The key became the primary key (NOT NULL); the memory source's id is nullable.
        "schema_policy": "evolve",
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 2, "parallel": 1},
        "verify": False,
    }
    _run(job, run_id="upsert-run")
    _run(job, run_id="upsert-run")  # a rerun of the same run: every partition is in the ledger
    rows = asyncio.run(_fetch(postgres_server, "SELECT id, value FROM public.upserted ORDER BY id"))
    assert [tuple(r) for r in rows] == [(1, "c"), (2, "e"), (3, "d")]


def test_on_error_collect_isolates_the_rows_the_table_refuses(postgres_server, tmp_path):
    from ferry.tasks.rejects import read_rejects

    asyncio.run(_fetch(postgres_server, "DROP TABLE IF EXISTS public.checked"))
    asyncio.run(
        _fetch(
            postgres_server,
            "CREATE TABLE public.checked (id bigint PRIMARY KEY, label varchar(5), amount numeric(10,2) CHECK (amount >= 0))",
        )
    )
    n = 1_000
    labels = ["ok"] * n
    labels[123] = "far too long"
    amounts = [str(i) for i in range(n)]
    amounts[777] = "-1"
    memory_store.put(
        "dirty",
        pa.table(
            {
                "id": pa.array(range(n), pa.int64()),
                "label": pa.array(labels),
                "amount": pa.array(amounts).cast(pa.decimal128(10, 2)),
            }
        ),
    )
    job = {
        "name": "pg-collect",
        "source": {"backend": "memory", "dataset": "dirty"},
        "target": _pg(postgres_server, dataset="checked"),
        "mode": "append",
        "key": ["id"],
        "schema_policy": "evolve",
        "on_error": "collect",
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 256, "parallel": 1},
    }
    summary = _run(job)
    assert summary["rows_rejected"] == 2
    assert summary["verification"]["status"] == "skipped"  # the table held rows before (none here, but it cannot tell)
    rows = asyncio.run(_fetch(postgres_server, "SELECT count(*), sum(CASE WHEN id IN (123, 777) THEN 1 ELSE 0 END) FROM public.checked"))
    assert tuple(rows[0]) == (n - 2, 0)
    (path,) = summary["rejects_files"]
    rejects = sorted(read_rejects(path), key=lambda r: r["row_key"])
    assert [r["row_key"] for r in rejects] == ["[123]", "[777]"]
    assert rejects[0]["column"] == "label" and rejects[0]["value"] == "far too long" and rejects[0]["step"] == "write"
    assert "check constraint" in rejects[1]["reason"]


def test_collected_write_rejects_leave_verification_exact(postgres_server, tmp_path):
    labels = [f"label {i}" for i in range(300)]
    labels[42] = "nul \x00 byte"  # PostgreSQL text cannot hold NUL
    memory_store.put("nul", pa.table({"id": pa.array(range(300), pa.int64()), "label": pa.array(labels)}))
    job = {
        "name": "pg-collect-verify",
        "source": {"backend": "memory", "dataset": "nul"},
        "target": _pg(postgres_server, dataset="nul_fresh"),
        "mode": "replace",
        "key": ["id"],
        "on_error": "collect",
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 64, "parallel": 1},
    }
    summary = _run(job)
    assert summary["rows_rejected"] == 1 and summary["rows_written"] == 299
    assert summary["verification"]["status"] == "passed", summary["verification"]
    assert summary["verification"]["rows_found"] == 299
