"""Ferry's migrate flow with an index as target and as source (osmem test server, Prefect test API)."""

from __future__ import annotations

import asyncio

import pytest

from ferry.backends.memory import memory_store
from ferry.flows.migrate import migrate
from ferry.flows.planning import plan_job
from ferry.flows.spec import build_backend, job_from_dict
from tests.integration.es_server import es_server, wipe  # noqa: F401

pytestmark = pytest.mark.integration


def _job(url: str, **extra) -> dict:
    job = {
        "name": "orders-to-es",
        "source": {"backend": "memory", "dataset": "orders", "generate": {"rows": 3000, "seed": 7}},
        "target": {"backend": "elasticsearch", "hosts": [url], "dataset": "orders", "number_of_replicas": 0},
        "mode": "replace",
        "key": ["order_id"],
        "verify": True,
        "stream": {"batch_size": 1000, "parallel": 2},
    }
    job.update(extra)
    return job


@pytest.mark.usefixtures("prefect_harness")
def test_orders_to_an_index_and_back_are_verified(es_server):  # noqa: F811
    wipe(es_server)
    summary = asyncio.run(migrate(job=job_from_dict(_job(es_server))))
    assert summary["rows_written"] == 3000 and summary["verification"]["status"] == "passed"
    back = {
        "name": "es-to-memory",
        "source": {
            "backend": "elasticsearch",
            "hosts": [es_server],
            "dataset": "orders",
            "columns": ["order_id", "status", "amount", "created_at", "tags", "shipping"],
            "where": {"status": {"in": ["paid", "shipped"]}},
        },
        "target": {"backend": "memory", "dataset": "back"},
        "mode": "replace",
        "verify": True,
        "stream": {"batch_size": 500, "parallel": 3},
    }
    summary = asyncio.run(migrate(job=job_from_dict(back)))
    assert summary["verification"]["status"] == "passed"
    table = memory_store.table("back")
    assert table.num_rows == summary["rows_written"] > 0
    assert set(table.column("status").to_pylist()) == {"paid", "shipped"}
    assert table.schema.names == ["order_id", "status", "amount", "created_at", "tags", "shipping"]


def test_plan_says_appends_without_a_key_are_not_retry_safe(es_server):  # noqa: F811
    wipe(es_server)

    async def scenario():
        job = job_from_dict(_job(es_server, mode="append", key=[]))
        source, target = await build_backend(job.source), await build_backend(job.target)
        async with source, target:
            return (await plan_job(job, source, target)).render()

    text = asyncio.run(scenario())
    assert "not retry-safe" in text and '"order_id"' in text


@pytest.mark.usefixtures("prefect_harness")
def test_refused_documents_go_to_the_rejects_file_with_on_error_collect(es_server, tmp_path):  # noqa: F811
    import json

    import pyarrow as pa

    from ferry.tasks.rejects import read_rejects

    wipe(es_server)
    memory_store.put("rows", pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), "n": ["7", "x", "9", "y"]}))
    job = {
        "name": "conflict",
        "source": {"backend": "memory", "dataset": "rows"},
        # The user's mapping wins over the inferred keyword: text that is no number is refused.
        "target": {
            "backend": "elasticsearch",
            "hosts": [es_server],
            "dataset": "conflict",
            "mapping": {"properties": {"n": {"type": "long"}}},
        },
        "mode": "replace",
        "key": ["id"],
        "on_error": "collect",
        "rejects_dir": str(tmp_path),
        "verify": True,
        "stream": {"parallel": 1},
    }
    summary = asyncio.run(migrate(job=job_from_dict(job)))
    assert summary["rows_written"] == 2 and summary["rows_rejected"] == 2
    assert summary["verification"]["status"] == "passed"
    (path,) = summary["rejects_files"]
    rejects = read_rejects(path)
    assert sorted(json.loads(r["row_key"])[0] for r in rejects) == [2, 4]
    assert all("mapper_parsing_exception" in r["reason"] for r in rejects)
    assert sorted(json.loads(r["record"])["n"] for r in rejects) == ["x", "y"]


def _oversized_job(url: str, tmp_path, on_error: str) -> dict:
    import pyarrow as pa

    # Row 3's note is far over the target's document_max_bytes; the others are small.
    notes = ["short", "short", "x" * 5000, "short"]
    memory_store.put("notes", pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), "note": notes}))
    return {
        "name": "oversized",
        "source": {"backend": "memory", "dataset": "notes"},
        "target": {"backend": "elasticsearch", "hosts": [url], "dataset": "oversized", "document_max_bytes": 2000},
        "mode": "replace",
        "key": ["id"],
        "on_error": on_error,
        "rejects_dir": str(tmp_path),
        "verify": True,
        "stream": {"parallel": 1},
    }


@pytest.mark.usefixtures("prefect_harness")
def test_a_document_over_the_size_limit_is_kept_in_the_rejects_file(es_server, tmp_path):  # noqa: F811
    import json

    from ferry.tasks.rejects import read_rejects

    wipe(es_server)
    summary = asyncio.run(migrate(job=job_from_dict(_oversized_job(es_server, tmp_path, "collect"))))
    assert summary["rows_written"] == 3 and summary["rows_rejected"] == 1
    assert summary["verification"]["status"] == "passed"
    (path,) = summary["rejects_files"]
    (reject,) = read_rejects(path)
    assert json.loads(reject["row_key"]) == [3]
    assert "document_too_large" in reject["reason"] and "document_max_bytes" in reject["reason"]
    assert len(json.loads(reject["record"])["note"]) == 5000  # the whole row is kept


@pytest.mark.usefixtures("prefect_harness")
def test_a_document_over_the_size_limit_stops_the_run_naming_it(es_server, tmp_path):  # noqa: F811
    from ferry.backends.errors import FerryError

    wipe(es_server)
    with pytest.raises(FerryError) as info:
        asyncio.run(migrate(job=job_from_dict(_oversized_job(es_server, tmp_path, "fail"))))
    message = str(info.value)
    assert "oversized" in message and "document_too_large" in message
    assert "document '3'" in message  # the refused document's id (from the key)
    assert "on_error" in message or "collect" in message  # and what to do about it
