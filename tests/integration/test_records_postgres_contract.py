"""The record contract suite (tests/unit/test_records_contract.py) on a real PostgreSQL.

The suite's tests are imported as they are; this module only adds the
``postgres`` factory to ``STORE_FACTORIES`` and a ``store`` fixture that runs
them on it. The unit run of the suite stays server-free: its own ``store``
fixture was parametrized when that module was imported, before this module
adds its factory.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

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


@pytest.fixture(params=["postgres"])
def store(request):  # noqa: F811  (replaces the suite's fixture: this module runs Postgres only)
    """A function running ``body(db)`` on a fresh, empty PostgreSQL store."""
    factory = contract.STORE_FACTORIES[request.param]

    def run(body: Callable[[AsyncDatabase], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = await factory(request)
            try:
                await db.clear()
                return await body(db)
            finally:
                await db.clear()
                await db.close()

        return asyncio.run(main())

    return run
