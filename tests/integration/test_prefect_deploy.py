"""End to end against a real Prefect server: `prefect deploy`, a process worker, a deployment run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.integration.es_server import es_server  # noqa: F401  (fixture)
from tests.integration.pg_server import postgres_server  # noqa: F401  (fixture)
from tests.integration.prefect_server import PrefectServer, prefect_server  # noqa: F401  (fixture)
from tests.integration.s3_server import TEST_KEY, TEST_SECRET, s3_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _wait_for_flow_run(server: PrefectServer, flow_run_id: str, timeout: float = 420) -> dict:
    return server.wait_for_flow_run(flow_run_id, timeout=timeout)


def _deployed_project(server: PrefectServer, tmp_path: Path) -> Path:
    """A copy of the repository's prefect.yaml and job files, deployed to the server."""
    return server.deploy_project(tmp_path / "project")


def test_deploy_all_and_run_demo_nightly_through_a_worker(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    project = _deployed_project(prefect_server, tmp_path)

    with prefect_server.api() as api:
        deployments = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}
    assert {"demo-nightly", "migrate-job", "pg-archive-nightly", "pg-to-index-hourly"} <= set(deployments)
    scheduled = {name for name, d in deployments.items() if d["schedules"]}
    assert len(deployments) >= 4 and len(scheduled) >= 3, scheduled
    assert {"demo-nightly", "pg-archive-nightly", "pg-to-index-hourly"} <= scheduled
    assert {d["entrypoint"] for d in deployments.values()} == {"ferry.flows.migrate:migrate"}
    crons = {name: [s["schedule"]["cron"] for s in deployments[name]["schedules"]] for name in scheduled}
    assert crons["pg-to-index-hourly"] == ["0 * * * *"]

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


def _start_a_big_replace(server: PrefectServer, tmp_path: Path) -> tuple[Path, subprocess.Popen, str]:
    """A deployment run of a replace far too big to finish, once it has written its first file.

    Returns the project folder, the worker and the flow run's id.
    """
    project = _deployed_project(server, tmp_path)
    (project / "big.yaml").write_text(
        "name: big-cancel\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 500000000}}\n"
        "target: {backend: local, url: ./out, dataset: orders}\n"
        "mode: replace\n"
        "verify: false\n"
        "stream: {batch_size: 8192, parallel: 1}\n"
    )
    worker = server.start_worker("ferry-process", cwd=project)
    flow_run_id = server.run_deployment("ferry-migrate/migrate-job", "job=big.yaml", cwd=project)
    output = project / "out"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(output.rglob("*.parquet")):
        time.sleep(0.5)
    assert list(output.rglob("*.parquet")), "the run never started writing"
    return project, worker, flow_run_id


def _assert_nothing_left(project: Path) -> None:
    """The stopped replace left nothing behind: no staged files, no unpublished version."""
    assert not list((project / "out").rglob("*.parquet"))
    assert not (project / "out" / "orders" / "_ferry" / "CURRENT").exists()


def test_cancelling_a_running_deployment_run_cleans_up(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    project, worker, flow_run_id = _start_a_big_replace(prefect_server, tmp_path)

    prefect_server.cli("flow-run", "cancel", flow_run_id)
    run = _wait_for_flow_run(prefect_server, flow_run_id, timeout=180)
    # The worker runs the flow's on_cancellation hook after the flow process is gone.
    _wait_for_hook(prefect_server, worker)
    prefect_server.stop_worker(worker)
    assert run["state_type"] == "CANCELLED", run["state"]
    # Cleaned up by the flow itself (a graceful cancel) or by the worker's hook (a hard one).
    _assert_nothing_left(project)
    with prefect_server.api() as api:
        artifacts = api.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        ).json()
    stopped = [a for a in artifacts if a["key"] == "ferry-big-cancel-summary"]
    if stopped:  # only a graceful cancel lets the flow publish its own summary
        assert "Committed partitions**: none" in stopped[0]["data"]


def test_a_flow_process_killed_mid_load_is_cleaned_up_by_the_worker(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    project, worker, flow_run_id = _start_a_big_replace(prefect_server, tmp_path)
    with prefect_server.api() as api:
        infrastructure_pid = api.get(f"/flow_runs/{flow_run_id}").json()["infrastructure_pid"]
    os.kill(int(str(infrastructure_pid).rsplit(":", 1)[-1]), signal.SIGKILL)  # no chance to clean up itself

    run = _wait_for_flow_run(prefect_server, flow_run_id, timeout=180)
    assert run["state_type"] == "CRASHED", run["state"]
    output = _wait_for_hook(prefect_server, worker)
    prefect_server.stop_worker(worker)
    assert re.search(r"run \S+: removed unpublished replace version", output), output[-3000:]
    _assert_nothing_left(project)


def _wait_for_hook(server: PrefectServer, worker: subprocess.Popen, timeout: float = 60) -> str:
    """The worker's output once it ran the flow's clean-up hook."""
    deadline = time.monotonic() + timeout
    done = re.compile(r"run \S+( left nothing to clean up on |: removed )")
    while not done.search(output := server.worker_output(worker)):
        assert time.monotonic() < deadline, f"the worker did not run the clean-up hook:\n{output[-4000:]}"
        time.sleep(0.5)
    return output


def test_blocks_register_and_a_saved_block_runs_a_job(prefect_server: PrefectServer, tmp_path):  # noqa: F811
    result = prefect_server.cli("block", "register", "-m", "ferry.backends")  # as the README says
    with prefect_server.api() as api:
        types = {b["slug"]: b for b in api.post("/block_types/filter", json={}).json()}
    ferry_types = {slug: b for slug, b in types.items() if slug.startswith("ferry-")}
    assert set(ferry_types) == {
        "ferry-memory", "ferry-object-store", "ferry-postgres", "ferry-elasticsearch", "ferry-opensearch"
    }, result.stdout
    for block_type in ferry_types.values():
        # What the UI shows for each block type: a logo, a docs link, a description and a code example.
        assert block_type["logo_url"].endswith(".png")
        assert block_type["documentation_url"].startswith("https://")
        assert block_type["description"] and 'load("BLOCK_NAME")' in block_type["code_example"]

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


def _readme_block_script() -> str:
    """The README's `save_blocks.py`: the python block that saves the blocks the deployments name."""
    readme = (REPO / "README.md").read_text()
    scripts = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if '.save("warehouse"' in s]
    assert len(scripts) == 1, "the README shows one script saving the `warehouse` block"
    return scripts[0]


def test_the_postgres_deployments_run_with_the_blocks_the_readme_saves(
    prefect_server: PrefectServer, postgres_server, s3_server, es_server, tmp_path  # noqa: F811
):
    """pg-archive-nightly and pg-to-index-hourly, run by a worker, with blocks saved as the README shows."""
    project = _deployed_project(prefect_server, tmp_path)
    # The table both jobs read: 20,000 generated orders loaded into PostgreSQL.
    pg = postgres_server.settings()
    (project / "load.yaml").write_text(
        "name: load-orders\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 20000, seed: 7}}\n"
        f"target: {{backend: postgres, host: {pg['host']}, port: {pg['port']}, user: {pg['user']}, "
        f"database: {pg['database']}, dataset: orders}}\n"
        "mode: replace\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-m", "ferry.flows.cli", "run", "load.yaml"],
        cwd=project, env=prefect_server.env, capture_output=True, text=True, timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr

    bucket = s3_server.new_bucket("archive")
    env = prefect_server.env
    env.update(
        PGHOST=pg["host"], PGPORT=str(pg["port"]), PGDATABASE=pg["database"], PGUSER=pg["user"],
        PGPASSWORD="not-checked-by-trust-auth",
        ARCHIVE_URL=f"s3://{bucket}/ferry", AWS_ACCESS_KEY_ID=TEST_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
        S3_ENDPOINT_URL=s3_server.endpoint_url, ES_HOSTS=es_server,
    )
    (project / "save_blocks.py").write_text(_readme_block_script())
    saved = subprocess.run(
        [sys.executable, "save_blocks.py"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert saved.returncode == 0, saved.stderr

    worker = prefect_server.start_worker("ferry-process", cwd=project)
    runs = {}
    for name in ("pg-archive-nightly", "pg-to-index-hourly"):
        started = prefect_server.cli("deployment", "run", f"ferry-migrate/{name}", cwd=project)
        runs[name] = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    finished = {name: _wait_for_flow_run(prefect_server, run_id) for name, run_id in runs.items()}
    prefect_server.stop_worker(worker)
    for name, run in finished.items():
        assert run["state_type"] == "COMPLETED", (name, run["state"], prefect_server.worker_output(worker)[-3000:])

    # Parquet on S3: one published version holding every row.
    keys = s3_server.keys(bucket, "ferry/orders/")
    assert "ferry/orders/_ferry/CURRENT" in keys
    assert any(k.endswith(".parquet") for k in keys)
    # The Elasticsearch alias `orders` answers with every row.
    assert httpx.get(f"{es_server}/orders/_count", timeout=30).json()["count"] == 20_000
    with prefect_server.api() as api:
        for name, run_id in runs.items():
            artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
            summary = next(a for a in artifacts if a["key"] == f"ferry-{name}-summary")
            assert "Verification**: passed" in summary["data"], summary["data"]
            assert "**Rows**: 20,000 read, 20,000 written" in summary["data"], summary["data"]
