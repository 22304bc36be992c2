"""A throwaway PostgreSQL 15 cluster for the tests (and the benchmarks).

``start_postgres()`` runs ``initdb`` and ``pg_ctl`` as the ``postgres`` user
(``runuser -u postgres --`` when running as root) into a fresh temporary
folder, listening on 127.0.0.1 and a free port, with ``fsync=off`` and the
socket in the temporary folder. ``stop()`` stops it with ``pg_ctl stop`` and
removes the folder. The session-scoped ``postgres_server`` fixture starts one
cluster for the whole test session.

A missing server binary is an error that says how to install it, never a
skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Where Debian's postgresql package puts the version 15 binaries.
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
INSTALL_HINT = (
    "PostgreSQL 15 server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/15/bin "
    "or on PATH; install them with `apt-get update && apt-get install -y postgresql` (.ci/run does this)"
)


@dataclass
class PostgresServer:
    """A running throwaway cluster: where it listens and how to stop it."""

    host: str
    port: int
    user: str
    database: str
    folder: Path
    bindir: Path
    pid: int | None = None

    @property
    def dsn(self) -> str:
        """A libpq URI for this cluster (trust authentication, no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def settings(self, **extra) -> dict:
        """Backend settings for this cluster (job-file / block fields)."""
        return {"host": self.host, "port": self.port, "user": self.user, "database": self.database, **extra}

    def stop(self) -> None:
        """Stop the cluster (pg_ctl stop, fast mode) and remove its folder."""
        data = self.folder / "data"
        if data.exists():
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(self.folder, ignore_errors=True)


def find_bindir() -> Path:
    """The folder holding PostgreSQL 15's initdb and pg_ctl, or a RuntimeError saying how to install them."""
    if (PG15_BIN / "pg_ctl").exists() and (PG15_BIN / "initdb").exists():
        return PG15_BIN
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        folder = Path(os.path.realpath(pg_ctl)).parent
        if (folder / "initdb").exists():
            return folder
    # Another Debian major version (the tests need nothing specific to 15).
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "pg_ctl").exists() and (folder / "initdb").exists():
            return folder
    raise RuntimeError(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    # The server refuses to run as root: run it as the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _allow_traverse(folder: Path) -> None:
    """Give others o+x on ``folder`` and its parents, so the postgres user can reach it."""
    for path in [folder, *folder.parents]:
        try:
            mode = path.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(path, mode | stat.S_IXOTH)
        except PermissionError:
            pass


def start_postgres(parent: str | os.PathLike | None = None, *, settings: dict[str, str] | None = None) -> PostgresServer:
    """initdb + pg_ctl start a fresh cluster on 127.0.0.1 and a free port; returns it running."""
    bindir = find_bindir()
    folder = Path(tempfile.mkdtemp(prefix="ferry-pg-", dir=parent))
    _allow_traverse(folder)
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, user="postgres")
    user = "postgres"
    init = subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "-E", "UTF8", "--no-sync"]),
        capture_output=True,
        text=True,
    )
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr.strip() or init.stdout.strip()}")
    options = {
        "listen_addresses": "127.0.0.1",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        **(settings or {}),
    }
    last_error = ""
    for _ in range(3):  # a free port can be taken between the probe and the start
        port = _free_port()
        opts = " ".join(f"-c {k}={v}" for k, v in options.items()) + f" -p {port} -k {folder}"
        started = subprocess.run(
            _as_postgres(
                [str(bindir / "pg_ctl"), "start", "-D", str(data), "-w", "-t", "60", "-l", str(folder / "server.log"), "-o", opts]
            ),
            capture_output=True,
            text=True,
        )
        if started.returncode == 0:
            server = PostgresServer("127.0.0.1", port, user, "postgres", folder, bindir)
            pid_file = data / "postmaster.pid"
            if pid_file.exists():
                server.pid = int(pid_file.read_text().splitlines()[0])
            _wait_ready(server)
            return server
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        last_error = (started.stderr or started.stdout or "").strip() + "\n" + log[-2000:]
    shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"pg_ctl start failed three times: {last_error}")


def _wait_ready(server: PostgresServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((server.host, server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not accept connections on {server.host}:{server.port} within {timeout}s")


class _SharedServer:
    """The session's one cluster, started on first use, stopped by the fixture or at exit."""

    def __init__(self) -> None:
        self.server: PostgresServer | None = None

    def start(self) -> PostgresServer:
        if self.server is None:
            try:
                self.server = start_postgres()
            except RuntimeError as exc:
                pytest.fail(str(exc), pytrace=False)
            atexit.register(self.stop)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


shared_server = _SharedServer()


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL 15 cluster for the whole test session (stopped at the end)."""
    server = shared_server.start()
    try:
        yield server
    finally:
        shared_server.stop()


def contract_backend(tmp_path):
    """The contract suite's factory: a PostgresBackend on the shared cluster, in a fresh schema per test."""
    from ferry.backends.postgres import PostgresBackend

    server = shared_server.start()
    schema = "contract_" + uuid.uuid4().hex[:10]
    return PostgresBackend(**server.settings(schema=schema, sslmode="disable"))
