"""A real Prefect server (and workers) on 127.0.0.1 for end-to-end tests.

Started with its own PREFECT_HOME and stopped by process id at the end, so a
test never touches a user's Prefect profile and leaves nothing running.
"""

from __future__ import annotations

import os
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
        log = open(Path(self.home) / f"worker-{pool}.log", "w")
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool],
            cwd=cwd,
            env=self._env_in(cwd),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(worker)
        return worker

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
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server on a free local port (no UI)."""
    home = tempfile.mkdtemp(prefix="ferry-e2e-prefect-")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(home) / "server.log"
    env = os.environ.copy()
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=url)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = PrefectServer(url=url, home=home, process=process, log_path=log_path)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"prefect server did not start in 120 s:\n{log_path.read_text()}")
        time.sleep(0.5)
    try:
        yield server
    finally:
        for child in server.children:
            if child.poll() is None:
                server.stop_worker(child)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
