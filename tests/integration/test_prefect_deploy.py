"""End to end against a real Prefect server: `prefect deploy`, a process worker, a deployment run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.prefect_server import PrefectServer, prefect_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _wait_for_flow_run(server: PrefectServer, flow_run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    with server.api() as api:
        while time.monotonic() < deadline:
            run = api.get(f"/flow_runs/{flow_run_id}").json()
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not finish in {timeout} s")


def _deployed_project(server: PrefectServer, tmp_path: Path) -> Path:
    """A copy of the repository's prefect.yaml and demo job, deployed to the server."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    shutil.copy(REPO / "configs" / "demo.yaml", project / "configs" / "demo.yaml")
    with server.api() as api:
        if api.get("/work_pools/ferry-process").status_code == 404:
            server.cli("work-pool", "create", "ferry-process", "--type", "process")
    server.cli("--no-prompt", "deploy", "--all", cwd=project)
    return project


def test_deploy_all_and_run_demo_nightly_through_a_worker(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    project = _deployed_project(prefect_server, tmp_path)

    with prefect_server.api() as api:
        deployments = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}
    assert {"demo-nightly", "migrate-job"} <= set(deployments)
    assert deployments["demo-nightly"]["entrypoint"] == "ferry.flows.migrate:migrate"
    assert deployments["demo-nightly"]["schedules"], "demo-nightly must be scheduled"

    worker = prefect_server.start_worker("ferry-process", cwd=project)
    started = prefect_server.cli("deployment", "run", "ferry-migrate/demo-nightly", cwd=project)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    run = _wait_for_flow_run(prefect_server, flow_run_id)
    prefect_server.stop_worker(worker)
    assert run["state_type"] == "COMPLETED", run["state"]

    dataset = project / "ferry-output" / "orders"
    assert (dataset / "_ferry" / "CURRENT").exists()
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (dataset / "_ferry" / "versions").rglob("*.parquet"))
    assert rows == 1_000_000

    with prefect_server.api() as api:
        artifacts = api.post(
            "/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
        ).json()
    kinds = {(a["key"], a["type"]) for a in artifacts}
    assert ("ferry-demo-orders", "table") in kinds
    assert ("ferry-demo-orders-summary", "markdown") in kinds
    summary = next(a for a in artifacts if a["key"] == "ferry-demo-orders-summary")
    assert "Verification**: passed" in summary["data"]


def test_cancelling_a_running_deployment_run_cleans_up(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    project = _deployed_project(prefect_server, tmp_path)
    (project / "big.yaml").write_text(
        "name: big-cancel\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 20000000}}\n"
        "target: {backend: local, url: ./out, dataset: orders}\n"
        "mode: replace\n"
        "verify: false\n"
        "stream: {batch_size: 8192, parallel: 1}\n"
    )
    worker = prefect_server.start_worker("ferry-process", cwd=project)
    started = prefect_server.cli("deployment", "run", "ferry-migrate/migrate-job", "--param", "job=big.yaml", cwd=project)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    output = project / "out"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(output.rglob("*.parquet")):
        time.sleep(0.5)
    assert list(output.rglob("*.parquet")), "the run never started writing"

    prefect_server.cli("flow-run", "cancel", flow_run_id)
    run = _wait_for_flow_run(prefect_server, flow_run_id, timeout=180)
    prefect_server.stop_worker(worker)
    assert run["state_type"] == "CANCELLED", run["state"]

    # The killed replace left nothing behind: no staged files, no unpublished version.
    assert not list((project / "out").rglob("*.parquet"))
    assert not (project / "out" / "orders" / "_ferry" / "CURRENT").exists()
    with prefect_server.api() as api:
        artifacts = api.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        ).json()
    stopped = [a for a in artifacts if a["key"] == "ferry-big-cancel-summary"]
    assert stopped and "Committed partitions**: none" in stopped[0]["data"]


def test_blocks_register_and_a_saved_block_runs_a_job(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    result = prefect_server.cli("block", "register", "-m", "ferry.backends")
    with prefect_server.api() as api:
        slugs = {b["slug"] for b in api.post("/block_types/filter", json={}).json()}
    assert {"ferry-memory", "ferry-object-store"} <= slugs, result.stdout

    # Save a block through the API client, then name it in a job file.
    (tmp_path / "save.py").write_text(
        "from ferry.backends import ObjectStoreBackend\n"
        f"ObjectStoreBackend(url={str(tmp_path / 'lake')!r}).save('lake', overwrite=True)\n"
    )
    saved = subprocess.run([sys.executable, str(tmp_path / "save.py")], env=prefect_server.env, capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    (tmp_path / "job.yaml").write_text(
        "name: saved-block\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 5000}}\n"
        "target: {block: ferry-object-store/lake, dataset: orders}\n"
        "mode: replace\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "ferry.flows.cli", "run", "job.yaml", "--json"],
        cwd=tmp_path, env=prefect_server.env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert '"status": "passed"' in run.stdout
    assert list((tmp_path / "lake" / "orders").rglob("*.parquet"))
