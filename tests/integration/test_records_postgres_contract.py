"""The record contract suite (tests/unit/test_records_contract.py) on a real PostgreSQL.

The suite's tests are imported as they are; this module only adds the
``postgres`` factory to ``STORE_FACTORIES`` and a ``store`` fixture that runs
them on it. The unit run of the suite stays server-free: its own ``store``
fixture was parametrized when that module was imported, before this module
adds its factory.
"""

from __future__ import annotations

from typing import Awaitable

import pytest

from ferry.backends.records import AsyncDatabase
from tests.integration.pg_server import postgres_server  # noqa: F401
from tests.unit import test_records_contract as contract
from tests.unit.test_records_contract import *  # noqa: F401,F403  (the suite's tests)

SCHEMA = "records_contract"


def postgres_store(request: pytest.FixtureRequest) -> Awaitable[AsyncDatabase]:
    """A PostgreSQL record store on the session's cluster (its own schema)."""
    server = request.getfixturevalue("postgres_server")
    return AsyncDatabase.create("postgres", server.settings(schema=SCHEMA, sslmode="disable"))


contract.STORE_FACTORIES["postgres"] = postgres_store

store = contract.store_fixture("postgres")  # noqa: F811  (this module runs the suite on PostgreSQL only)
