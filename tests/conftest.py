"""Test set-up shared by unit and integration tests.

Prefect gets its own temporary home and no analytics, set before Prefect is
imported anywhere, so tests never touch a user's Prefect profile or API.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="ferry-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
os.environ.pop("PREFECT_API_URL", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test API for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _fresh_memory_store():
    """Every test starts with an empty in-process memory store."""
    from ferry.backends.memory import memory_store

    memory_store.clear()
    yield
    memory_store.clear()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
