"""Opt-in: the contract suite against a real Elasticsearch or OpenSearch cluster.

Set ``FERRY_TEST_ES_URL`` (e.g. ``http://127.0.0.1:9200``; add
``FERRY_TEST_ES_API_KEY`` or ``FERRY_TEST_ES_USERNAME``/``FERRY_TEST_ES_PASSWORD``
when the cluster needs them) to run it. Use a throwaway cluster: before each
test the indexes the contract tests use (``types``, ``empty``, ``modes``,
``up``, ``cover``, ``retry``, ``keep``, ``filt`` and their ``<name>-*``
replace versions) are deleted.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from ferry.backends.elasticsearch import ElasticsearchBackend
from tests.integration.test_contract import (  # noqa: F401  (collected here against the real cluster)
    test_append_adds_and_replace_swaps,
    test_empty_stream,
    test_interrupted_write_leaves_no_partial_partition,
    test_partitions_cover_every_row_exactly_once,
    test_retry_of_a_committed_partition_never_duplicates,
    test_round_trip_every_type,
    test_upsert_where_supported,
    test_where_and_columns_give_reference_results,
)

URL = os.environ.get("FERRY_TEST_ES_URL")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not URL,
        reason="FERRY_TEST_ES_URL is not set: set it to a throwaway Elasticsearch 8/9 or OpenSearch 2/3 "
        "cluster (e.g. http://127.0.0.1:9200) to run the contract suite against it",
    ),
]

CONTRACT_INDEXES = ("types", "empty", "modes", "up", "cover", "retry", "keep", "filt")


def _cluster_backend() -> ElasticsearchBackend:
    settings: dict = {"hosts": [URL], "number_of_replicas": 0}
    if os.environ.get("FERRY_TEST_ES_API_KEY"):
        settings["api_key"] = os.environ["FERRY_TEST_ES_API_KEY"]
    elif os.environ.get("FERRY_TEST_ES_USERNAME"):
        settings["username"] = os.environ["FERRY_TEST_ES_USERNAME"]
        settings["password"] = os.environ.get("FERRY_TEST_ES_PASSWORD", "")
    return ElasticsearchBackend(**settings)


async def _clean() -> None:
    async with _cluster_backend() as backend:
        client = backend._conn().client.options(ignore_status=404)
        for name in CONTRACT_INDEXES:
            # Versions first: an alias name cannot be deleted, the indexes behind it can.
            await client.indices.delete(index=f"{name}-*", expand_wildcards="all")
            await client.indices.delete(index=name)


@pytest.fixture
def backend():
    asyncio.run(_clean())
    return _cluster_backend()
