"""The record contract suite (tests/unit/test_records_contract.py) on the moto S3 server.

The suite's tests are imported as they are; this module only adds the ``s3``
factory to ``STORE_FACTORIES`` (a fresh bucket per test) and a ``store``
fixture that runs them on it. The unit run of the suite stays server-free:
its own ``store`` fixture was parametrized when that module was imported,
before this module adds its factory.
"""

from __future__ import annotations

from typing import Awaitable

import pytest

from ferry.backends.records import AsyncDatabase
from tests.integration.s3_server import s3_server  # noqa: F401
from tests.unit import test_records_contract as contract
from tests.unit.test_records_contract import *  # noqa: F401,F403  (the suite's tests)


def s3_store(request: pytest.FixtureRequest) -> Awaitable[AsyncDatabase]:
    """An S3 record store in a fresh bucket of the session's moto server."""
    server = request.getfixturevalue("s3_server")
    return AsyncDatabase.create("s3", server.settings(server.new_bucket("records"), prefix="app"))


contract.STORE_FACTORIES["s3"] = s3_store

store = contract.store_fixture("s3")  # noqa: F811  (this module runs the suite on S3 only)
