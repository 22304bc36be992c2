"""PerformanceMonitor, the slow-operation log, database and flow-stage instrumentation, the pool report."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from ferry.backends.monitor import PerformanceMonitor, mask_values, redact
from ferry.backends.pools import PoolManager, pool_manager
from ferry.backends.records import AsyncDatabase, Query, Record
from ferry.tasks.pipeline import pop_stage_timings, stage_monitor
from ferry.tasks.report import stage_markdown, summary_markdown


def _run(coro):
    return asyncio.run(coro)


# -- figures -------------------------------------------------------------------------------------


def test_percentiles_are_exact_while_every_sample_fits_the_reservoir():
    monitor = PerformanceMonitor()
    for ms in range(1, 101):
        monitor.record("op", ms / 1000)
    figures = monitor.report_dict()["operations"]["op"]
    assert figures["count"] == 100 and figures["sampled"] == 100
    assert figures["min_ms"] == 1.0 and figures["max_ms"] == 100.0
    assert figures["avg_ms"] == pytest.approx(50.5)
    # Linear interpolation between closest ranks, as numpy's default.
    assert figures["p50_ms"] == pytest.approx(50.5)
    assert figures["p95_ms"] == pytest.approx(95.05)
    assert figures["p99_ms"] == pytest.approx(99.01)
    assert monitor.stats("op").exact_percentiles


def test_memory_is_bounded_by_the_reservoir_and_extremes_stay_exact():
    monitor = PerformanceMonitor(reservoir_size=64, seed=1)
    for i in range(20_000):
        monitor.record("op", (i % 1000) / 1000)  # uniform over 0..0.999 s
    stats = monitor.stats("op")
    assert stats.count == 20_000
    assert len(stats.reservoir) == 64
    assert not stats.exact_percentiles
    assert stats.min_seconds == 0.0 and stats.max_seconds == pytest.approx(0.999)
    assert stats.avg_seconds == pytest.approx(0.4995)
    # A uniform sample of 64 of a uniform distribution: the median is in the middle half.
    assert 0.25 < stats.percentile(50) < 0.75


def test_measure_works_with_async_with_and_with_and_counts_errors():
    monitor = PerformanceMonitor()

    async def main():
        async with monitor.measure("create"):
            await asyncio.sleep(0)
        with pytest.raises(ValueError):
            async with monitor.measure("create"):
                raise ValueError("boom")

    _run(main())
    with monitor.measure("transform"):
        pass
    assert monitor.count("create") == 2
    assert monitor.stats("create").errors == 1
    assert monitor.count("transform") == 1
    assert monitor.operations() == ["create", "transform"]
    assert monitor.count("never") == 0 and monitor.stats("never").to_dict()["p95_ms"] == 0.0


def test_report_text_and_dict_name_every_figure():
    monitor = PerformanceMonitor()
    assert monitor.report() == "no operations measured"
    monitor.record("search", 0.002)
    monitor.record("search", 0.004)
    text = monitor.report()
    header, row = text.splitlines()
    assert header.split() == ["operation", "count", "errors", "avg", "ms", "min", "ms", "max", "ms", "p50", "ms", "p95", "ms", "p99", "ms"]
    assert row.split()[:4] == ["search", "2", "0", "3.000"]
    figures = monitor.report_dict()["operations"]["search"]
    assert set(figures) == {
        "count", "errors", "total_seconds", "avg_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms", "sampled"
    }
    monitor.reset()
    assert monitor.operations() == []


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reservoir_size"):
        PerformanceMonitor(reservoir_size=0)
    with pytest.raises(ValueError, match="slow_ms"):
        PerformanceMonitor(slow_ms=-1)


# -- the slow-operation log ----------------------------------------------------------------------


def test_slow_log_logs_above_the_threshold_only_with_the_description(caplog):
    monitor = PerformanceMonitor(slow_ms=50)
    with caplog.at_level(logging.WARNING, logger="ferry.slow"):
        monitor.record("fast", 0.010, detail="SELECT 1")
        monitor.record("slow", 0.080, detail=lambda: "SELECT * FROM t WHERE id = $1", values=["42"])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "slow operation slow took 80.0 ms (threshold 50 ms)" in message
    assert "SELECT * FROM t WHERE id = $1" in message
    assert "42" not in message  # bound values stay out unless asked
    assert [entry["operation"] for entry in monitor.slow_operations] == ["slow"]


def test_slow_log_shows_values_when_asked_and_never_shows_secrets(caplog):
    monitor = PerformanceMonitor(slow_ms=0, log_values=True)
    with caplog.at_level(logging.WARNING, logger="ferry.slow"):
        monitor.record(
            "connect", 0.001, detail="postgresql://app:s3cret@db:5432/x password=hunter2", values={"id": "42"}
        )
    message = caplog.records[0].getMessage()
    assert "'42'" in message
    assert "s3cret" not in message and "hunter2" not in message
    assert "postgresql://app:***@db:5432/x" in message


def test_redact_and_mask_values():
    assert redact("dsn=postgres://u:p%40ss@h/db token: abc") == "dsn=postgres://u:***@h/db token: ***"
    assert redact("SELECT password FROM users") == "SELECT password FROM users"
    canonical = Query({"age": {"between": [18, 65]}}).sort("age").limit(5).to_dict()
    masked = mask_values(canonical)
    assert masked["filter"] == {"column": "age", "op": "between", "value": "?"}
    assert masked["limit"] == 5 and masked["sort"] == [{"field": "age", "order": "asc"}]


# -- every database call ---------------------------------------------------------------------------


def test_instrumented_store_times_every_call_and_slow_logs_the_query_shape(caplog):
    monitor = PerformanceMonitor(slow_ms=0)

    async def main():
        db = await AsyncDatabase.create("memory", {}, monitor=monitor)
        assert db.monitor is monitor
        await db.create_batch([Record({"id": i, "name": f"n{i}"}) for i in range(10)])
        await db.read_batch(str(i) for i in range(3))  # a generator of ids works
        await db.update("1", Record({"id": 1, "name": "x"}))
        await db.search(Query({"name": {"neq": "very-private-value"}}))
        await db.count()
        await db.exists("2")
        await db.delete("2")
        await db.clear()
        await db.close()

    with caplog.at_level(logging.WARNING, logger="ferry.slow"):
        _run(main())
    assert {name: monitor.count(name) for name in monitor.operations()} == {
        "memory.create_batch": 1,
        "memory.read_batch": 1,
        "memory.update_batch": 1,
        "memory.search": 1,
        "memory.read_batches": 1,  # the search's one batch
        "memory.count": 1,
        "memory.exists": 1,
        "memory.delete_batch": 1,
        "memory.clear": 1,
    }
    text = caplog.text
    assert "read_batch of 3 id(s)" in text
    assert "create_batch of 10 record(s)" in text
    assert '"op": "neq", "value": "?"' in text
    assert "very-private-value" not in text


def test_instrument_none_removes_every_layer():
    monitor = PerformanceMonitor()

    async def main():
        db = await AsyncDatabase.create("memory", {})
        plain = set(vars(db))
        db.instrument(monitor, prefix="app")
        await db.create(Record({"id": 1}))
        assert monitor.count("app.create_batch") == 1
        db.instrument(None)
        assert set(vars(db)) - {"_monitor", "_monitor_prefix"} == plain
        await db.create(Record({"id": 2}))
        assert monitor.count("app.create_batch") == 1

    _run(main())


# -- the pool report -----------------------------------------------------------------------------------


class _CountingPool:
    def __init__(self, size: int, idle: int) -> None:
        self.size, self.idle = size, idle

    def close(self) -> None:
        pass


def test_pool_report_has_utilisation_and_the_monitor_shows_it():
    async def main():
        key = "test-utilisation"
        await pool_manager.acquire(
            "fake",
            key,
            lambda: _CountingPool(size=8, idle=2),
            closer=lambda p: p.close(),
            stats=lambda p: {"size": p.size, "idle": p.idle, "in_use": p.size - p.idle, "waiters": 3},
            limits={"max_size": 10},
        )
        try:
            row = next(r for r in pool_manager.get_pool_info().values() if r["config_hash"] == key)
            assert (row["size"], row["idle"], row["in_use"], row["waiters"]) == (8, 2, 6, 3)
            assert row["max_size"] == 10 and row["utilisation"] == 0.6
            monitor = PerformanceMonitor()
            assert "pools" in monitor.report_dict(pools=True)
            text = monitor.report(pools=True)
            assert "in_use 6, max_size 10, waiters 3, utilisation 60%" in text
        finally:
            await pool_manager.release("fake", key)

    _run(main())


def test_pool_count_warning_is_configurable_and_logged_once_per_crossing(caplog):
    manager = PoolManager(pool_count_warning=2)

    async def main():
        for i in range(5):
            await manager.acquire("fake", f"cfg{i}", lambda: _CountingPool(1, 1))
        assert len([r for r in caplog.records if "High pool count" in r.getMessage()]) == 1
        for i in range(3):
            await manager.release("fake", f"cfg{i}")  # back to 2: the warning re-arms
        await manager.acquire("fake", "again", lambda: _CountingPool(1, 1))
        for key in ("cfg3", "cfg4", "again"):
            await manager.release("fake", key)

    with caplog.at_level(logging.WARNING, logger="ferry.pools"):
        _run(main())
    warnings = [r.getMessage() for r in caplog.records if "High pool count" in r.getMessage()]
    assert len(warnings) == 2
    assert "3 pools are open (more than 2)" in warnings[0]


# -- flow stages -----------------------------------------------------------------------------------------


def test_stage_timings_are_taken_once_and_render_as_markdown():
    monitor = stage_monitor("run-x")
    assert stage_monitor("run-x") is monitor
    for seconds in (0.001, 0.002, 0.003):
        monitor.record("write", seconds)
        monitor.record("read", seconds / 2)
    stages = pop_stage_timings("run-x")
    assert pop_stage_timings("run-x") == {}
    assert stages["write"]["count"] == 3 and stages["write"]["avg_ms"] == pytest.approx(2.0)
    lines = stage_markdown(stages)
    assert lines[1] == "## Stage batch times"
    assert [line.split("|")[1].strip() for line in lines[5:]] == ["read", "write"]  # pipeline order
    assert stage_markdown({}) == []


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_puts_batch_times_per_stage_in_its_summary_and_artifact(tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict

    job = {
        "name": "stage-times",
        "source": {"backend": "memory", "dataset": "orders", "generate": {"rows": 20_000, "seed": 3}},
        "target": {"backend": "local", "url": str(tmp_path / "out"), "dataset": "orders"},
        "mode": "replace",
        "rejects_dir": str(tmp_path / "rejects"),
        "transforms": [{"rename": {"customer_name": "customer"}}],
        "stream": {"batch_size": 2000, "parallel": 2},
    }
    summary = asyncio.run(migrate(job=job_from_dict(job)))
    stages = summary["stages"]
    assert set(stages) == {"read", "transform", "write", "commit"}
    assert stages["read"]["count"] >= 10  # 20,000 rows in batches of at most 2,000
    # Every batch read is transformed and handed to the writer (nothing is rejected here).
    assert stages["transform"]["count"] == stages["write"]["count"] >= 10
    assert stages["commit"]["count"] == len(summary["partitions"])
    for figures in stages.values():
        assert figures["min_ms"] <= figures["p50_ms"] <= figures["p95_ms"] <= figures["max_ms"]
    assert "## Stage batch times" in summary_markdown(summary)

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ferry-stage-times-summary"]))
            )

    markdown = str(asyncio.run(read())[0].data)
    assert "## Stage batch times" in markdown
    assert "| transform |" in markdown and "| write |" in markdown
