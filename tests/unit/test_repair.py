"""`ferry repair`: what a killed run left on a local-folder target is removed, published data stays."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.backends.base import WriteContext, WriteMode
from ferry.backends.objectstore import ObjectStoreBackend

FERRY = [sys.executable, "-m", "ferry.flows.cli"]

JOB = """
name: repair-me
source: {backend: memory, dataset: orders, generate: {rows: 5000}}
target: {backend: local, url: ./out, dataset: orders}
mode: replace
"""


def _ferry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FERRY, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


async def _leave_an_unpublished_replace(root: Path, run_id: str = "killed") -> None:
    """A replace run that committed one partition and died before publishing."""
    table = pa.table({"order_id": pa.array(range(10), pa.int64())})
    async with ObjectStoreBackend(url=str(root)) as backend:
        ctx = WriteContext(run_id=run_id, job_name="repair-me", mode=WriteMode.REPLACE, schema=table.schema)
        await backend.begin_write("orders", ctx)

        async def batches():
            for batch in table.to_batches():
                yield batch

        await backend.write("orders", "p0", batches(), ctx)


def _leave_an_unfinished_append(dataset: Path, data_folder: Path) -> Path:
    """An append partition killed after copying its file in, before writing its commit marker."""
    staging = dataset / "_ferry" / "staging" / "dead" / "p3"
    staging.mkdir(parents=True)
    table = pa.table({"order_id": pa.array([1, 2, 3], pa.int64())})
    pq.write_table(table, staging / "dead-p3-0.parquet")
    copied = data_folder / "dead-p3-0.parquet"
    pq.write_table(table, copied)
    return copied


def test_repair_removes_a_killed_runs_leftovers_and_keeps_the_published_data(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    first = _ferry("run", str(job), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    dataset = tmp_path / "out" / "orders"
    published = pq.read_table(dataset / "_ferry" / "versions" / os.listdir(dataset / "_ferry" / "versions")[0])

    asyncio.run(_leave_an_unpublished_replace(tmp_path / "out"))
    assert (dataset / "_ferry" / "versions" / "killed").exists()
    current = next(p for p in (dataset / "_ferry" / "versions").iterdir() if p.name != "killed")
    copied = _leave_an_unfinished_append(dataset, current)

    repaired = _ferry("repair", str(job), cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert "removed unpublished replace version killed" in repaired.stdout
    assert "removed unfinished append files of run dead, partition p3" in repaired.stdout
    assert not (dataset / "_ferry" / "versions" / "killed").exists()
    assert not (dataset / "_ferry" / "commits" / "killed").exists()
    assert not (dataset / "_ferry" / "staging" / "dead").exists()
    assert not copied.exists()
    assert pq.read_table(current).sort_by("order_id").equals(published.sort_by("order_id"))

    again = _ferry("repair", str(job), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to repair" in again.stdout


def test_repair_on_a_store_with_nothing_to_undo_says_so(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("target: {backend: local, url: ./out, dataset: orders}", "target: {backend: memory, dataset: copy}"))
    result = _ferry("repair", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "memory:copy: nothing to repair"


@pytest.mark.usefixtures("prefect_harness")
def test_the_stopped_run_hook_removes_that_runs_leftovers_only(tmp_path, monkeypatch):
    """What the worker runs after a hard cancel or a crash: the labelled run's output goes, nothing else."""
    import uuid

    from prefect.client.schemas.objects import FlowRun

    from ferry.flows.migrate import migrate
    from ferry.flows.stopped import JOB_FILE_LABEL, RUN_ID_LABEL, clean_up_stopped_run

    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    first = _ferry("run", str(job), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    versions = tmp_path / "out" / "orders" / "_ferry" / "versions"
    [published] = os.listdir(versions)
    asyncio.run(_leave_an_unpublished_replace(tmp_path / "out", "stopped"))
    asyncio.run(_leave_an_unpublished_replace(tmp_path / "out", "another"))
    monkeypatch.chdir(tmp_path)  # the worker's folder: the job's relative paths resolve there, as in the flow

    def flow_run(labels: dict) -> FlowRun:
        return FlowRun(id=uuid.uuid4(), name="stopped-run", flow_id=uuid.uuid4(), labels=labels, parameters={"job": "job.yaml"})

    # A flow run stopped before Ferry started a run of its own: nothing is touched.
    asyncio.run(clean_up_stopped_run(migrate, flow_run({}), None))
    assert sorted(os.listdir(versions)) == sorted([published, "stopped", "another"])

    stopped = flow_run({RUN_ID_LABEL: "stopped", JOB_FILE_LABEL: str(job)})
    asyncio.run(clean_up_stopped_run(migrate, stopped, None))
    assert sorted(os.listdir(versions)) == sorted([published, "another"])
    assert not (tmp_path / "out" / "orders" / "_ferry" / "commits" / "stopped").exists()

    # Labelled with the published run itself (it stopped after publishing): the data stays.
    asyncio.run(clean_up_stopped_run(migrate, flow_run({RUN_ID_LABEL: published, JOB_FILE_LABEL: str(job)}), None))
    assert published in os.listdir(versions)
    assert pq.read_table(versions / published).num_rows == 5000
