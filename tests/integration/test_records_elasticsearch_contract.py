"""The record contract suite (tests/unit/test_records_contract.py) on the Elasticsearch test server.

The suite's tests are imported as they are; this module only adds the
``elasticsearch`` factory to ``STORE_FACTORIES`` and a ``store`` fixture that
runs them on it (osmem-server, an OpenSearch-compatible server, started once
per session by tests/integration/es_server.py). The unit run of the suite
stays server-free: its own ``store`` fixture was parametrized when that
module was imported, before this module adds its factory.
"""

from __future__ import annotations

from typing import Awaitable

import pytest

from ferry.backends.records import AsyncDatabase
from tests.integration.es_server import es_server  # noqa: F401
from tests.unit import test_records_contract as contract
from tests.unit.test_records_contract import *  # noqa: F401,F403  (the suite's tests)

INDEX = "records-contract"


def elasticsearch_store(request: pytest.FixtureRequest) -> Awaitable[AsyncDatabase]:
    """An Elasticsearch record store on the session's test server (its own index)."""
    url = request.getfixturevalue("es_server")
    return AsyncDatabase.create("elasticsearch", {"hosts": [url], "index": INDEX, "initial_backoff_seconds": 0.05})


contract.STORE_FACTORIES["elasticsearch"] = elasticsearch_store

store = contract.store_fixture("elasticsearch")  # noqa: F811  (this module runs the suite on Elasticsearch only)
