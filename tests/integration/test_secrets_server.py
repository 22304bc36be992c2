"""A block's secret stays out of everything a standalone Prefect server and its worker keep or print.

A PostgreSQL block is saved with a password; a deployment run through a
process worker writes to it. Afterwards the password must not appear in the
server's output, the worker's output (which includes the flow run's own
output), the artifacts, the flow-run parameters, the run's logs, or the names
and states of its task runs, all read back through the server's API. The
detector is then shown to find a value planted in those same places, so the
test fails if the secret ever leaks there.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.integration.pg_server import postgres_server  # noqa: F401  (fixture)
from tests.integration.prefect_server import PrefectServer, prefect_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

BLOCK = "ferry-postgres/secret-check"


def leaks(secret: str, sources: dict[str, str]) -> list[str]:
    """Names of the sources holding ``secret``, as is or base64-encoded (how a careless dump might carry it)."""
    forms = [secret, base64.b64encode(secret.encode()).decode()]
    return sorted(name for name, text in sources.items() if any(form in text for form in forms))


def _all_pages(api: httpx.Client, path: str, body: dict) -> list[dict]:
    """Every row of a `/…/filter` endpoint (the server pages at 200)."""
    rows: list[dict] = []
    while True:
        page = api.post(path, json={**body, "offset": len(rows), "limit": 200})
        page.raise_for_status()
        batch = page.json()
        rows.extend(batch)
        if len(batch) < 200:
            return rows


def stored_about_runs(server: PrefectServer, flow_run_ids: list[str]) -> dict[str, str]:
    """What the server keeps about these flow runs, one text per kind, read through its API."""
    with server.api() as api:
        runs = _all_pages(api, "/flow_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})
        task_runs = _all_pages(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})
        logs = _all_pages(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}})
        artifacts = _all_pages(api, "/artifacts/filter", {})
    return {
        "flow-run parameters": json.dumps([r["parameters"] for r in runs]),
        "flow runs": json.dumps(runs),
        "task-run names": json.dumps([t["name"] for t in task_runs]),
        "task runs": json.dumps(task_runs),
        "logs": json.dumps([log["message"] for log in logs]),
        "artifacts": json.dumps([[a["key"], a["description"], a["data"]] for a in artifacts]),
    }


def test_a_saved_postgres_password_never_shows_in_server_worker_or_api(
    prefect_server: PrefectServer, postgres_server, tmp_path  # noqa: F811
):
    secret = f"pw-{uuid.uuid4().hex}"
    project = prefect_server.deploy_project(tmp_path / "project")

    # Save the block as a user would; the password reaches the script through its environment only.
    pg = postgres_server.settings()
    (project / "save_block.py").write_text(
        "import os\n"
        "from ferry.backends.postgres import PostgresBackend\n"
        f"PostgresBackend(host={pg['host']!r}, port={pg['port']}, user={pg['user']!r}, database={pg['database']!r},\n"
        "                password=os.environ['WAREHOUSE_PASSWORD']).save('secret-check', overwrite=True)\n"
    )
    saved = subprocess.run(
        [sys.executable, "save_block.py"], cwd=project, env={**prefect_server.env, "WAREHOUSE_PASSWORD": secret},
        capture_output=True, text=True, timeout=120,
    )
    assert saved.returncode == 0, saved.stderr
    (project / "secret-job.yaml").write_text(
        "name: secret-server-check\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 3000}}\n"
        f"target: {{block: {BLOCK}, dataset: secret_orders}}\n"
        "mode: replace\n"
        "key: [order_id]\n"
    )

    worker = prefect_server.start_worker("ferry-process", cwd=project)
    flow_run_id = prefect_server.run_deployment("ferry-migrate/migrate-job", "job=secret-job.yaml", cwd=project)
    run = prefect_server.wait_for_flow_run(flow_run_id)
    prefect_server.stop_worker(worker)
    worker_output = prefect_server.worker_output(worker)
    assert run["state_type"] == "COMPLETED", (run["state"], worker_output[-3000:])

    sources = stored_about_runs(prefect_server, [flow_run_id])
    sources["server output"] = prefect_server.server_output()
    sources["worker output"] = worker_output
    # These really are this run's records: the job's task runs, its artifacts, the worker's hand-off.
    assert "plan secret-server-check" in sources["task-run names"]
    assert "ferry-secret-server-check-summary" in sources["artifacts"]
    assert flow_run_id in sources["worker output"]
    assert sources["server output"].strip()
    assert leaks(secret, sources) == []

    with prefect_server.api() as api:
        block = api.get("/block_types/slug/ferry-postgres/block_documents/name/secret-check")
        revealed = api.get(
            "/block_types/slug/ferry-postgres/block_documents/name/secret-check", params={"include_secrets": True}
        )
    # The server hands the block out masked; only an explicit request for secrets returns the password.
    assert leaks(secret, {"block": block.text}) == []
    assert revealed.json()["data"]["password"] == secret

    # The detector finds the value wherever it is planted in the places checked above.
    with prefect_server.api() as api:
        flow_id = run["flow_id"]
        planted = api.post("/flow_runs/", json={"flow_id": flow_id, "parameters": {"job": secret}, "name": "planted"})
        planted.raise_for_status()
        planted_id = planted.json()["id"]
        api.post("/logs/", json=[{
            "name": "planted", "level": 20, "message": f"connecting with {secret}",
            "timestamp": run["start_time"], "flow_run_id": planted_id,
        }]).raise_for_status()
        api.post("/artifacts/", json={
            "key": "planted", "type": "markdown", "data": f"password {secret}", "flow_run_id": planted_id,
        }).raise_for_status()
        api.post("/task_runs/", json={
            "name": f"write {secret}", "task_key": "planted", "dynamic_key": "0", "flow_run_id": planted_id,
        }).raise_for_status()
    found = leaks(secret, stored_about_runs(prefect_server, [planted_id]))
    assert {"flow-run parameters", "logs", "artifacts", "task-run names"} <= set(found), found
    assert leaks(secret, {"worker output": f"... {base64.b64encode(secret.encode()).decode()} ..."}) == ["worker output"]
