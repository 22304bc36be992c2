"""The ``records`` benchmark route: its lines have the documented fields (memory only, tiny)."""

from __future__ import annotations

import asyncio

from benchmarks.records_routes import ROUTE, run_records
from benchmarks.routes import ROUTES, RunContext


def test_records_route_lines(tmp_path):
    assert ROUTES[ROUTE].run is run_records
    lines = asyncio.run(run_records(RunContext(workdir=tmp_path), 300, 1))
    memory = [line for line in lines if line["backend"] == "memory"]
    assert [line["method"] for line in memory] == [
        "create", "batch_100", "batch_500", "stream_write", "create_batch", "read_batch", "search"
    ]
    for line in memory:
        assert line["route"] == "records" and line["rows_per_s"] > 0
        assert line["baseline"] is None and line["baseline_rows_per_s"] is None and line["ratio"] is None
        assert "no baseline driver" in line["note"]
    by_method = {line["method"]: line for line in memory}
    assert by_method["create"]["rows"] == 300 and by_method["search"]["rows"] == 100
    assert by_method["search"]["search_ms"] > 0 and by_method["create_batch"]["search_ms"] is None
