"""A secret given to a job never shows up in what Prefect stores about the run."""

from __future__ import annotations

import asyncio
import json

import pytest

from ferry.flows.migrate import migrate
from tests.integration.pg_server import postgres_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

SECRET = "s3cr3t-Ferry-Pa55word-7f1c"


def test_a_password_from_the_environment_stays_out_of_parameters_logs_and_artifacts(
    postgres_server, tmp_path, monkeypatch  # noqa: F811
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    monkeypatch.setenv("FERRY_TEST_PG_PASSWORD", SECRET)
    settings = postgres_server.settings()
    job = tmp_path / "secret-job.yaml"
    job.write_text(
        "name: secret-check\n"
        "source: {backend: memory, dataset: orders, generate: {rows: 3000}}\n"
        "target:\n"
        "  backend: postgres\n"
        f"  host: {settings['host']}\n"
        f"  port: {settings['port']}\n"
        f"  user: {settings['user']}\n"
        f"  database: {settings['database']}\n"
        '  password: "${FERRY_TEST_PG_PASSWORD}"\n'
        "  dataset: secret_orders\n"
        "mode: replace\n"
        "key: [order_id]\n"
    )
    summary = asyncio.run(migrate(job=str(job)))
    assert summary["verification"]["status"] == "passed"
    assert SECRET not in json.dumps(summary, default=str)

    async def stored() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            run = next(r for r in runs if r.parameters.get("job") == str(job))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            artifacts = await client.read_artifacts()
            return json.dumps(
                {
                    "parameters": run.parameters,
                    "logs": [log.message for log in logs],
                    "task_runs": [t.name for t in tasks],
                    "artifacts": [a.data for a in artifacts],
                },
                default=str,
            )

    everything = asyncio.run(stored())
    assert "secret-check" in everything or "secret_orders" in everything  # the run really was read back
    assert SECRET not in everything
