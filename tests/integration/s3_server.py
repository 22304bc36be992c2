"""A real S3 API for the tests: ``moto_server`` started as an HTTP server process on 127.0.0.1.

The session-scoped :func:`s3_server` fixture starts ``moto_server -H 127.0.0.1
-p PORT`` on a free port once, waits until it answers, and stops it by process
id at the end of the session. It sets ``AWS_DEFAULT_REGION=us-east-1`` and
dummy credentials in the environment (moto accepts any key and secret; s3fs
must not get ``region_name`` in ``client_kwargs``, see docs/object-stores.md).

Tests get an :class:`S3Server` with the endpoint URL, a helper that creates a
fresh bucket per test and the backend settings that reach it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

#: Credentials moto accepts (any value works); never real ones.
TEST_KEY = "ferry-test-key"
TEST_SECRET = "ferry-test-secret"


def moto_server_binary() -> str:
    """The ``moto_server`` script next to this interpreter, or on PATH; fails with how to install it."""
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found:
        return found
    pytest.fail(
        "moto_server is not installed: run `.venv/bin/pip install 'moto[server]'` "
        "(or `pip install -e '.[test]'`, which includes it)",
        pytrace=False,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(binary: str, *, env: dict[str, str] | None = None, timeout_seconds: float = 60.0):
    """Start ``moto_server`` on a free port; returns (process, endpoint URL) once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {process.returncode} before answering on {endpoint}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return process, endpoint
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                stop_moto(process)
                raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout_seconds:.0f}s")
            time.sleep(0.2)


def stop_moto(process: subprocess.Popen) -> None:
    """Stop the server by its process id (SIGTERM, then SIGKILL)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class S3Server:
    """A running moto server and helpers to use it."""

    endpoint_url: str
    pid: int

    def client(self):
        """A boto3 S3 client for test set-up and inspection (not Ferry's code path)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_KEY,
            aws_secret_access_key=TEST_SECRET,
            region_name="us-east-1",
        )

    def new_bucket(self, prefix: str = "ferry") -> str:
        """Create a fresh, uniquely named bucket (names need at least 3 characters)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``, sorted."""
        client = self.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def settings(self, bucket: str, prefix: str = "data", **extra: Any) -> dict[str, Any]:
        """Object-store backend settings that reach this server."""
        return {
            "url": f"s3://{bucket}/{prefix}".rstrip("/"),
            "endpoint_url": self.endpoint_url,
            "path_style": True,
            "key": TEST_KEY,
            "secret": TEST_SECRET,
            **extra,
        }


def _set_test_environment() -> None:
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", TEST_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    # Never read a developer's ~/.aws files during tests.
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


class _SharedServer:
    """One moto server per test session, started on first use and stopped by pid at the end.

    The contract suite's factories take only ``tmp_path``, so they cannot
    request a fixture; they and the ``s3_server`` fixture share this server.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self.server: S3Server | None = None

    def start(self) -> S3Server:
        if self.server is None:
            _set_test_environment()
            self._process, endpoint = start_moto(moto_server_binary())
            self.server = S3Server(endpoint_url=endpoint, pid=self._process.pid)
            atexit.register(self.stop)
        return self.server

    def stop(self) -> None:
        if self._process is not None:
            process, self._process, self.server = self._process, None, None
            stop_moto(process)


shared_server = _SharedServer()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The moto S3 server of this test session (stopped at the end of the session)."""
    server = shared_server.start()
    yield server
    shared_server.stop()


def contract_backend(tmp_path):
    """The contract suite's factory: an S3 object store in a fresh bucket of the shared server."""
    from ferry.backends import ObjectStoreBackend

    server = shared_server.start()
    return ObjectStoreBackend(**server.settings(server.new_bucket("contract")))
