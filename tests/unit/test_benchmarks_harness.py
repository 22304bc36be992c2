"""The benchmark harness on synthetic numbers: medians, JSON lines, the plot. No flow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    BaselineRun,
    FerryRun,
    RssSampler,
    Startup,
    build_record,
    is_prefect_server,
    json_line,
    median,
)

REQUIRED_FIELDS = {
    "route", "rows", "seconds", "rows_per_s", "baseline", "baseline_seconds", "baseline_rows_per_s",
    "ratio", "peak_rss_bytes", "baseline_peak_rss_bytes", "prefect_server_rss_bytes", "startup_seconds",
    "end_to_end_seconds", "repeat", "parallel", "batch_size", "python", "pyarrow", "prefect",
    "cpu_count", "timestamp",
}  # fmt: skip

ENV = {"python": "3.11.0", "pyarrow": "17.0.0", "prefect": "3.9.1", "ferry": "0.1.0", "cpu_count": 2}


def test_median_odd_even_and_empty():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    assert median([7]) == 7.0
    with pytest.raises(ValueError):
        median([])


def _record(**overrides):
    ferry = [
        FerryRun(rows=1_000_000, data_seconds=s, end_to_end_seconds=s + 0.5, peak_rss_bytes=m,
                 rss_start_bytes=100, prefect_server_rss_bytes=p, files=2)
        for s, m, p in [(2.0, 300, 50), (1.0, 100, 70), (4.0, 200, 60)]
    ]  # fmt: skip
    baseline = [
        BaselineRun(rows=1_000_000, seconds=s, end_to_end_seconds=s + 0.01, peak_rss_bytes=m, rss_start_bytes=90)
        for s, m in [(0.5, 150), (0.25, 120), (1.0, 130)]
    ]
    kwargs = dict(
        route="memory-to-parquet",
        baseline="pyarrow-parquetwriter",
        rows=1_000_000,
        ferry_runs=ferry,
        baseline_runs=baseline,
        startup=Startup(startup_seconds=9.5, process_startup_seconds=11.25, first_flow_end_to_end_seconds=9.6),
        repeat=3,
        parallel=2,
        batch_size=65_536,
        environment=ENV,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    )
    kwargs.update(overrides)
    return build_record(**kwargs)


def test_record_uses_medians_and_has_every_field():
    record = _record()
    assert REQUIRED_FIELDS <= set(record)
    assert record["seconds"] == 2.0  # median of 2, 1, 4
    assert record["rows_per_s"] == 500_000
    assert record["baseline_seconds"] == 0.5
    assert record["baseline_rows_per_s"] == 2_000_000
    assert record["ratio"] == 0.25
    assert record["peak_rss_bytes"] == 200
    assert record["baseline_peak_rss_bytes"] == 130
    assert record["prefect_server_rss_bytes"] == 70  # the server's peak is a max
    assert record["end_to_end_seconds"] == 2.5
    assert record["overhead_seconds"] == 0.5
    assert record["startup_seconds"] == 9.5
    assert record["process_startup_seconds"] == 11.25
    assert record["files"] == 2
    assert record["timestamp"] == "2026-01-02T03:04:05+00:00"
    assert record["runs"]["seconds"] == [2.0, 1.0, 4.0]
    assert (record["python"], record["pyarrow"], record["prefect"], record["cpu_count"]) == ("3.11.0", "17.0.0", "3.9.1", 2)


def test_json_line_is_one_line_that_round_trips():
    record = _record(route="parquet-to-memory", baseline="pyarrow-dataset")
    line = json_line(record)
    assert "\n" not in line
    assert json.loads(line) == record


def test_record_needs_runs_and_rejects_nan():
    with pytest.raises(ValueError):
        _record(ferry_runs=[])
    record = _record()
    record["seconds"] = float("nan")
    with pytest.raises(ValueError):
        json_line(record)


def test_zero_seconds_gives_no_rate_instead_of_dividing_by_zero():
    run = FerryRun(rows=10, data_seconds=0.0, end_to_end_seconds=0.1, peak_rss_bytes=1, rss_start_bytes=1,
                   prefect_server_rss_bytes=0)  # fmt: skip
    record = _record(ferry_runs=[run])
    assert record["rows_per_s"] is None and record["ratio"] is None
    json.loads(json_line(record))


def test_prefect_server_identification():
    ephemeral = [
        "/venv/bin/python", "-m", "uvicorn", "--app-dir", "/venv/lib/python3.11/site-packages",
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", "8591",
    ]  # fmt: skip
    assert is_prefect_server(ephemeral)
    assert is_prefect_server(["/venv/bin/prefect", "server", "start"])
    assert not is_prefect_server(["/venv/bin/python", "-m", "benchmarks", "memory-to-parquet"])
    assert not is_prefect_server(["postgres", "-D", "/tmp/server/data"])


def test_rss_sampler_sees_this_process():
    with RssSampler(interval=0.01) as sampler:
        blob = bytearray(32 * 2**20)  # noqa: F841 -- held while sampling
    peaks = sampler.peaks
    assert peaks.samples >= 2
    assert peaks.own >= peaks.start_own > 0
    # Earlier tests of the session may have started Prefect's test server as a child.
    import psutil

    from benchmarks.harness import is_prefect_server

    server_children = [
        c for c in psutil.Process().children(recursive=True) if is_prefect_server(c.cmdline())
    ]
    if server_children:
        assert peaks.prefect_server > 0
    else:
        assert peaks.prefect_server == 0


def _results_file(tmp_path: Path) -> Path:
    lines = [
        _record(),
        _record(rows=10_000_000, timestamp=datetime(2026, 1, 2, tzinfo=timezone.utc)),
        # A newer result for the same measurement replaces the older one in the chart.
        _record(rows=10_000_000, ferry_runs=[
            FerryRun(rows=10_000_000, data_seconds=5.0, end_to_end_seconds=5.5, peak_rss_bytes=1,
                     rss_start_bytes=1, prefect_server_rss_bytes=1)
        ], timestamp=datetime(2026, 1, 3, tzinfo=timezone.utc)),
        _record(route="parquet-to-memory", baseline="pyarrow-dataset"),
    ]  # fmt: skip
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json_line(r) for r in lines) + "\n\nnot json\n", encoding="utf-8")
    return path


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot import latest, load_results, plot_results

    records = load_results(_results_file(tmp_path))
    assert len(records) == 4
    kept = latest(records)
    assert [(r["route"], r["rows"]) for r in kept] == [
        ("memory-to-parquet", 1_000_000),
        ("memory-to-parquet", 10_000_000),
        ("parquet-to-memory", 1_000_000),
    ]
    assert kept[1]["seconds"] == 5.0
    out = plot_results(records, tmp_path / "charts" / "benchmarks.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot", str(_results_file(tmp_path)), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_routes_import_and_list_without_starting_prefect():
    code = (
        "import sys, benchmarks.routes as r, benchmarks.harness, benchmarks.plot\n"
        "assert 'prefect' not in sys.modules and 'ferry.flows.migrate' not in sys.modules, sorted(sys.modules)\n"
        "assert {'memory-to-parquet', 'parquet-to-memory'} <= set(r.ROUTES)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert listed.returncode == 0, listed.stderr
    assert "memory-to-parquet" in listed.stdout and "pyarrow-dataset" in listed.stdout


def test_row_counts_parse():
    from benchmarks.__main__ import parse_rows

    assert parse_rows("200000") == 200_000
    assert parse_rows("200_000") == 200_000
    assert parse_rows("200k") == 200_000
    assert parse_rows("10M") == 10_000_000
    assert parse_rows("1e6") == 1_000_000
    for bad in ("0", "-5", "1.5", "lots"):
        with pytest.raises(Exception):
            parse_rows(bad)
