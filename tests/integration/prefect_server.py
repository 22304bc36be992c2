"""A real Prefect server (and workers) on 127.0.0.1 for end-to-end tests.

Started with its own PREFECT_HOME and stopped by process id at the end, so a
test never touches a user's Prefect profile and leaves nothing running.
``prefect_server`` serves the API only; ``prefect_server_ui`` serves the web
UI too (for the browser tests).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

PREFECT = str(Path(sys.executable).parent / "prefect")
REPO = Path(__file__).resolve().parents[2]


class RetryBusyTransport(httpx.HTTPTransport):
    """Send a request again when the server answers 503.

    The server answers 503 when its SQLite database was busy (a retryable
    error, which Prefect's own client retries too); on a loaded machine that
    happens now and then.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(6):
            response = self._send(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(0.25 * 2**attempt)
        return self._send(request)

    def _send(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        return response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrefectServer:
    """A running `prefect server start` and the environment that points at it."""

    url: str
    home: str
    process: subprocess.Popen
    log_path: Path
    children: list[subprocess.Popen] = field(default_factory=list)
    #: Output file of each worker started here, by process id.
    worker_logs: dict[int, Path] = field(default_factory=dict)

    @property
    def ui_url(self) -> str:
        """The web UI's address (served only by a server started with its UI)."""
        return self.url.removesuffix("/api")

    @property
    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            PREFECT_HOME=self.home,
            PREFECT_API_URL=self.url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        return env

    def _env_in(self, cwd: Path | str | None) -> dict[str, str]:
        env = self.env
        if cwd is not None:
            # prefect.yaml's `{{ $PWD }}` reads the variable, not the process's folder.
            env["PWD"] = str(cwd)
        return env

    def cli(self, *args: str, cwd: Path | str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run a `prefect` command against this server; fails the test on a non-zero exit."""
        result = subprocess.run(
            [PREFECT, *args], cwd=cwd, env=self._env_in(cwd), capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def start_worker(self, pool: str, cwd: Path | str) -> subprocess.Popen:
        """Start `prefect worker start --pool POOL`; stopped with the server."""
        log_path = Path(self.home) / f"worker-{pool}-{len(self.children)}.log"
        log = open(log_path, "w")
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool],
            cwd=cwd,
            env=self._env_in(cwd),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the worker holds its own copy of the file descriptor
        self.children.append(worker)
        self.worker_logs[worker.pid] = log_path
        return worker

    def worker_output(self, worker: subprocess.Popen) -> str:
        """Everything a worker (and the flow runs it started) printed so far."""
        return self.worker_logs[worker.pid].read_text(errors="replace")

    def server_output(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop_worker(self, worker: subprocess.Popen) -> None:
        """A worker needs a second SIGINT to stop."""
        for _ in range(2):
            if worker.poll() is not None:
                break
            worker.send_signal(signal.SIGINT)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)

    def api(self) -> httpx.Client:
        """An HTTP client of the server's REST API (503 answers are retried)."""
        return httpx.Client(base_url=self.url, timeout=30, transport=RetryBusyTransport())

    def wait_for_flow_run(self, flow_run_id: str, timeout: float = 420) -> dict:
        """The flow run once it reached a final state; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.api() as api:
            while time.monotonic() < deadline:
                run = api.get(f"/flow_runs/{flow_run_id}").json()
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    return run
                time.sleep(1)
        pytest.fail(f"flow run {flow_run_id} did not finish in {timeout} s")

    def deploy_project(self, project: Path) -> Path:
        """Copy the repository's prefect.yaml and job files to ``project`` and deploy them all."""
        (project / "configs").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
        for job_file in (REPO / "configs").glob("*.yaml"):
            shutil.copy(job_file, project / "configs" / job_file.name)
        with self.api() as api:
            if api.get("/work_pools/ferry-process").status_code == 404:
                self.cli("work-pool", "create", "ferry-process", "--type", "process")
        self.cli("--no-prompt", "deploy", "--all", cwd=project)
        return project

    def run_deployment(self, name: str, *params: str, cwd: Path) -> str:
        """`prefect deployment run NAME --param ...`; returns the new flow run's id."""
        args = [arg for param in params for arg in ("--param", param)]
        started = self.cli("deployment", "run", name, *args, cwd=cwd)
        match = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
        assert match, started.stdout
        return match.group(1)


def start_prefect_server(*, ui: bool = False, settings: dict[str, str] | None = None) -> PrefectServer:
    """Start `prefect server start` on a free local port in a fresh PREFECT_HOME; returns once healthy.

    ``settings`` are extra PREFECT_* environment settings of the server process.
    """
    home = tempfile.mkdtemp(prefix="ferry-e2e-prefect-")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(home) / "server.log"
    env = os.environ.copy()
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=url, **(settings or {}))
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not ui:
        command.append("--no-ui")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = PrefectServer(url=url, home=home, process=process, log_path=log_path)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            pytest.fail(f"prefect server did not start in 120 s:\n{log_path.read_text()}")
        time.sleep(0.5)


def stop_prefect_server(server: PrefectServer) -> None:
    """Stop the server's workers, then the server, by process id; remove its PREFECT_HOME."""
    for child in server.children:
        if child.poll() is None:
            server.stop_worker(child)
    process = server.process
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    shutil.rmtree(server.home, ignore_errors=True)


#: The tests start every run themselves: with the scheduler on, an hourly deployment's
#: run would start whenever a test crosses the hour, and the outcome would depend on the clock.
NO_SCHEDULER = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server on a free local port (no UI; no scheduler, see NO_SCHEDULER)."""
    server = start_prefect_server(ui=False, settings=NO_SCHEDULER)
    try:
        yield server
    finally:
        stop_prefect_server(server)


@pytest.fixture(scope="session")
def prefect_server_ui():
    """A real Prefect server with its web UI on a free local port (no scheduler, see NO_SCHEDULER)."""
    server = start_prefect_server(ui=True, settings=NO_SCHEDULER)
    try:
        yield server
    finally:
        stop_prefect_server(server)
