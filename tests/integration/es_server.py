"""A session-scoped osmem-server (an in-memory OpenSearch-compatible server) for the tests.

``es_server`` starts the ``osmem-server`` binary bundled in the PyPI wheel of
the same name on 127.0.0.1 and a free port, reads the JSON line it prints
when ready, yields its URL and stops it by process id at the end of the
session. Import the fixture into the modules that need it::

    from tests.integration.es_server import es_server  # noqa: F401
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest

START_TIMEOUT_SECONDS = 30.0


@contextmanager
def running_osmem_server() -> Iterator[dict]:
    """Start osmem-server, yield its ready line (``url``, ``pid``, ``version``), stop it by pid."""
    try:
        from osmem_server import resolve_binary
    except ImportError:
        raise RuntimeError(
            "osmem-server is not installed: run `.venv/bin/pip install osmem-server` "
            "(or `pip install -e .[test]`), which bundles the test server binary"
        ) from None
    binary = resolve_binary()
    process = subprocess.Popen(
        [binary, "--addr", "127.0.0.1:0", "--no-stdin-watch"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _ready_line(process)
        yield ready
    finally:
        _stop(process)


def _ready_line(process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    buffer = b""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"osmem-server exited with code {process.returncode} before it was ready")
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            chunk = os.read(fd, 4096)
            buffer += chunk
            if b"\n" in buffer:
                line = buffer.split(b"\n", 1)[0]
                return json.loads(line)
    raise RuntimeError(f"osmem-server did not print its ready line within {START_TIMEOUT_SECONDS:.0f}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


class _SharedServer:
    """One osmem-server per test session, started on first use and stopped by pid at exit.

    The contract suite's factories take only ``tmp_path``, so they cannot
    request a fixture; they and the ``es_server`` fixture share this server.
    """

    def __init__(self) -> None:
        self._context = None
        self.url: str | None = None

    def start(self) -> str:
        if self.url is None:
            self._context = running_osmem_server()
            self.url = self._context.__enter__()["url"]
            atexit.register(self.stop)
        return self.url

    def stop(self) -> None:
        if self._context is not None:
            context, self._context, self.url = self._context, None, None
            context.__exit__(None, None, None)


shared_server = _SharedServer()


def wipe(url: str) -> None:
    """Delete every index and alias of the test server (a clean slate for one test)."""
    request = urllib.request.Request(f"{url}/_all", method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def contract_backend(tmp_path):
    """The contract suite's factory: an ElasticsearchBackend on a wiped shared server."""
    from ferry.backends.elasticsearch import ElasticsearchBackend

    url = shared_server.start()
    wipe(url)
    return ElasticsearchBackend(hosts=[url], initial_backoff_seconds=0.05)


@pytest.fixture(scope="session")
def es_server() -> Iterator[str]:
    """URL of the running osmem-server of this test session."""
    url = shared_server.start()
    yield url
    shared_server.stop()
