"""Setting sweeps of the benchmark command: --vary / --set parsing, settings in jobs, the sweep plots.

No flow runs and no server starts: the jobs are built and inspected, the
plots are drawn from a few synthetic JSON lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import build_parser, main  # noqa: E402
from benchmarks.harness import HarnessError  # noqa: E402
from benchmarks.routes import RunContext  # noqa: E402
from benchmarks.sweep import (  # noqa: E402
    Sweep,
    SweepContext,
    check_options,
    parse_set,
    parse_vary,
    setting,
    sweep_points,
)

PNG = b"\x89PNG\r\n\x1a\n"


# -- parsing ------------------------------------------------------------------------------


def test_vary_parses_values_in_order_with_suffixes():
    assert parse_vary("batch_size=8192,32k,131_072") == Sweep("batch_size", (8192, 32_000, 131_072))
    assert parse_vary("postgres.max_connections=8,2,4") == Sweep("postgres.max_connections", (8, 2, 4))
    assert parse_vary(" parallel = 1, 2 ,4 ") == Sweep("parallel", (1, 2, 4))
    assert parse_vary("s3.max_concurrency=1M") == Sweep("s3.max_concurrency", (1_000_000,))


@pytest.mark.parametrize(
    "text, message",
    [
        ("batchsize=1,2", "unknown setting 'batchsize'"),
        ("batch_size", "SETTING=VALUE"),
        ("batch_size=", "SETTING=VALUE"),
        ("=1,2", "SETTING=VALUE"),
        ("parallel=1,2,1", "repeats a value"),
        ("parallel=0,2", "at least 1"),
        ("parallel=two", "not a whole number"),
        ("buffer_size=1.5", "not a whole number"),
        ("parallel=,", "at least one value"),
    ],
)
def test_vary_refuses_bad_text(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_vary(text)


def test_set_parses_one_value_and_sends_stream_settings_to_their_options():
    assert parse_set("s3.max_connections=4") == ("s3.max_connections", 4)
    assert parse_set("buffer_size=8") == ("buffer_size", 8)
    with pytest.raises(argparse.ArgumentTypeError, match="--parallel"):
        parse_set("parallel=4")
    with pytest.raises(argparse.ArgumentTypeError, match="--batch-size"):
        parse_set("batch_size=8192")
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
        parse_set("buffer_size=2,4")


def test_options_conflicts_are_refused():
    check_options([Sweep("parallel", (1, 2)), Sweep("buffer_size", (1,))], [("s3.max_connections", 4)])
    with pytest.raises(ValueError, match="given twice"):
        check_options([Sweep("parallel", (1,)), Sweep("parallel", (2,))], [])
    with pytest.raises(ValueError, match="given twice"):
        check_options([], [("buffer_size", 1), ("buffer_size", 2)])
    with pytest.raises(ValueError, match="both --set and --vary"):
        check_options([Sweep("buffer_size", (1, 2))], [("buffer_size", 4)])


def test_command_line_options():
    args = build_parser().parse_args(
        ["memory-to-s3", "--rows", "1M", "--parallel", "4", "--vary", "s3.max_connections=1,10",
         "--vary", "batch_size=8192,65536", "--set", "buffer_size=2"]
    )  # fmt: skip
    assert args.vary == [Sweep("s3.max_connections", (1, 10)), Sweep("batch_size", (8192, 65536))]
    assert args.fixed == [("buffer_size", 2)]
    assert args.parallel == 4
    plain = build_parser().parse_args(["memory-to-s3", "--rows", "1000"])
    assert plain.vary == [] and plain.fixed == []


def test_command_line_refuses_a_conflict_before_starting_anything(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["memory-to-parquet", "--rows", "1000", "--vary", "buffer_size=1,2", "--set", "buffer_size=4"])
    assert exited.value.code == 2
    assert "both --set and --vary" in capsys.readouterr().err


def test_points_run_one_setting_at_a_time():
    sweeps = [Sweep("batch_size", (8192, 65536)), Sweep("parallel", (1, 4))]
    assert sweep_points(sweeps) == [("batch_size", 8192), ("batch_size", 65536), ("parallel", 1), ("parallel", 4)]
    assert sweep_points([]) == [None]


# -- settings reach the jobs ----------------------------------------------------------------

MEMORY = {"backend": "memory", "dataset": "orders", "generate": {"rows": 10, "seed": 42}}
POSTGRES = {"backend": "postgres", "dataset": "orders", "host": "127.0.0.1", "port": 5432}
S3 = {"backend": "s3", "url": "s3://bucket/x", "dataset": "orders", "pool": {"max_connections": 50}}


def test_stream_and_endpoint_settings_land_in_the_job(tmp_path):
    ctx = SweepContext(workdir=tmp_path, parallel=3, batch_size=4096)
    with ctx.point("buffer_size", 7):
        job = ctx.job("j", MEMORY, POSTGRES, key=["order_id"])
        assert job["stream"] == {"batch_size": 4096, "parallel": 3, "buffer_size": 7}
        assert job["key"] == ["order_id"] and job["target"] == POSTGRES
        ctx.check_applied("memory-to-postgres")
    with ctx.point("postgres.max_connections", 2):
        job = ctx.job("j", POSTGRES, {**POSTGRES, "min_connections": 5})
        assert job["source"]["max_connections"] == 2 and job["target"]["max_connections"] == 2
        assert job["target"]["min_connections"] == 2  # lowered so the endpoint stays valid
        assert "buffer_size" not in job["stream"]
    assert "max_connections" not in POSTGRES  # the routes' own dicts are not changed


def test_s3_settings_go_into_nested_sections_of_s3_endpoints_only(tmp_path):
    ctx = SweepContext(workdir=tmp_path, settings={"s3.max_concurrency": 3})
    with ctx.point("s3.max_connections", 4):
        job = ctx.job("j", MEMORY, S3)
        assert job["target"]["pool"] == {"max_connections": 4}
        assert job["target"]["transfer"] == {"max_concurrency": 3}
        assert job["source"] == MEMORY
        ctx.check_applied("memory-to-s3")
    assert S3["pool"] == {"max_connections": 50} and "transfer" not in S3
    local = {"backend": "local", "url": str(tmp_path), "dataset": "orders"}
    assert ctx.job("j", MEMORY, local)["target"] == local
    objectstore = {"backend": "objectstore", "url": "s3://bucket/y", "dataset": "orders"}
    assert ctx.job("j", MEMORY, objectstore)["target"]["transfer"] == {"max_concurrency": 3}


def test_a_setting_that_changes_nothing_is_an_error(tmp_path):
    ctx = SweepContext(workdir=tmp_path)
    with ctx.point("s3.max_connections", 4):
        ctx.job("j", MEMORY, {"backend": "local", "url": str(tmp_path), "dataset": "orders"})
        with pytest.raises(HarnessError, match="s3.max_connections changes nothing in route memory-to-parquet"):
            ctx.check_applied("memory-to-parquet")
    with ctx.point("parallel", 4):
        ctx.check_applied("records")  # the context's own settings are always in force
    fixed = SweepContext(workdir=tmp_path, settings={"postgres.max_connections": 4})
    with fixed.point():
        fixed.job("j", MEMORY, S3)
        with pytest.raises(HarnessError, match="--set postgres.max_connections changes nothing in route memory-to-s3"):
            fixed.check_applied("memory-to-s3")
    with fixed.point():  # a new route starts with nothing applied
        fixed.job("j", MEMORY, POSTGRES)
        fixed.check_applied("memory-to-postgres")


def test_point_restores_the_invocation_settings(tmp_path):
    ctx = SweepContext(workdir=tmp_path, parallel=2, batch_size=65536, settings={"buffer_size": 4})
    with ctx.point("parallel", 8):
        assert ctx.parallel == 8
    with ctx.point("buffer_size", 1):
        assert ctx.settings == {"buffer_size": 1}
    with ctx.point("s3.max_connections", 5):
        assert ctx.settings == {"buffer_size": 4, "s3.max_connections": 5}
    assert (ctx.parallel, ctx.batch_size, ctx.settings, ctx.current) == (2, 65536, {"buffer_size": 4}, None)


def test_routes_without_jobs_read_settings(tmp_path):
    ctx = SweepContext(workdir=tmp_path, parallel=6)
    assert setting(ctx, "postgres.max_connections", 10) == 10
    with ctx.point("postgres.max_connections", 3):
        assert setting(ctx, "postgres.max_connections", 10) == 3
        ctx.check_applied("records-pooling")
    assert setting(ctx, "parallel", 1) == 6
    assert setting(RunContext(workdir=tmp_path), "postgres.max_connections", 10) == 10


def test_records_carry_the_sweep_point(tmp_path):
    ctx = SweepContext(workdir=tmp_path, parallel=2, batch_size=65536, settings={"buffer_size": 2})
    plain = {"route": "memory-to-s3", "rows": 10, "parallel": 2, "batch_size": 65536, "timestamp": "T"}
    with ctx.point("parallel", 4):
        record = ctx.annotate(plain)
    assert record["sweep_setting"] == "parallel" and record["sweep_value"] == 4
    assert record["settings"] == {"buffer_size": 2, "parallel": 4}
    assert record["timestamp"] == "T" and "sweep_setting" not in plain
    unswept = SweepContext(workdir=tmp_path).annotate(plain)
    assert unswept == plain


# -- plots ----------------------------------------------------------------------------------


def _line(route, swept, value, rate, *, base=100_000, rows=1_000_000, parallel=2, stamp="2026-01-01T00:00:00+00:00", **extra):
    record = {
        "route": route, "rows": rows, "rows_per_s": rate, "seconds": rows / rate, "baseline": "bare",
        "baseline_rows_per_s": base, "ratio": rate / base, "parallel": value if swept == "parallel" else parallel,
        "batch_size": value if swept == "batch_size" else 65536, "settings": {swept: value},
        "sweep_setting": swept, "sweep_value": value, "timestamp": stamp, "cpu_count": 2,
        "runs": {"seconds": [rows / rate, rows / (rate * 1.1), rows / (rate * 0.9)]},
    }  # fmt: skip
    record.update(extra)
    return record


def _results(tmp_path):
    lines = [
        _line("memory-to-postgres", "batch_size", 8192, 200_000),
        _line("memory-to-postgres", "batch_size", 65536, 300_000),
        _line("memory-to-postgres", "batch_size", 65536, 310_000, stamp="2026-02-01T00:00:00+00:00"),
        _line("memory-to-postgres", "postgres.max_connections", 2, 150_000, parallel=4),
        _line("memory-to-postgres", "postgres.max_connections", 8, 320_000, parallel=4),
        _line("memory-to-s3", "parallel", 1, 500_000, base=900_000),
        _line("memory-to-s3", "parallel", 4, 1_100_000, base=950_000),
        _line("records-pooling", "postgres.max_connections", 4, 3_000, base=250, method="read", runs={"seconds": [1.0]}),
        _line("records-pooling", "parallel", 1, 2_000, base=60, method="read", baseline_settings=["parallel"]),
        _line("records-pooling", "parallel", 8, 3_000, base=200, method="read", baseline_settings=["parallel"]),
        {"route": "memory-to-s3", "rows": 10, "rows_per_s": 5, "baseline": "bare", "baseline_rows_per_s": 5},
        {"route": "memory-to-s3", "sweep_setting": "parallel", "rows": 10},
    ]
    path = tmp_path / "tuning.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\nnot json\n", encoding="utf-8")
    return path


def test_sweep_lines_are_grouped_per_route_and_setting(tmp_path, capsys):
    from benchmarks.plot_sweep import group_sweeps, load_sweeps, plot_filename

    records = load_sweeps(_results(tmp_path))
    assert len(records) == 10  # the plain line is left out silently, the broken ones with a warning
    assert "not JSON" in capsys.readouterr().err
    groups = group_sweeps(records)
    assert set(groups) == {
        ("memory-to-postgres", "batch_size"),
        ("memory-to-postgres", "postgres.max_connections"),
        ("memory-to-s3", "parallel"),
        ("records-pooling", "postgres.max_connections"),
        ("records-pooling", "parallel"),
    }
    (points,) = groups[("memory-to-postgres", "batch_size")].values()
    assert [(p["sweep_value"], p["rows_per_s"]) for p in points] == [(8192, 200_000), (65536, 310_000)]  # newest kept
    assert plot_filename("memory-to-s3", "s3.max_connections") == "tuning-memory-to-s3-s3-max-connections.png"


def test_the_baseline_follows_batch_size_unless_a_route_says_otherwise():
    from benchmarks.plot_sweep import baseline_settings

    assert baseline_settings({"route": "memory-to-s3"}) == ["batch_size"]
    assert baseline_settings({"route": "records-pooling", "baseline_settings": ["parallel"]}) == ["parallel"]


def test_plots_into_a_folder_or_one_file(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot_sweep import load_sweeps, plot_all

    records = load_sweeps(_results(tmp_path))
    paths = plot_all(records, tmp_path / "images")
    assert sorted(p.name for p in paths) == [
        "tuning-memory-to-postgres-batch-size.png",
        "tuning-memory-to-postgres-postgres-max-connections.png",
        "tuning-memory-to-s3-parallel.png",
        "tuning-records-pooling-parallel.png",
        "tuning-records-pooling-postgres-max-connections.png",
    ]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    with pytest.raises(ValueError, match="holds 5 sweeps"):
        plot_all(records, tmp_path / "one.png")
    (one,) = plot_all(records, tmp_path / "one.png", route="memory-to-s3", setting="parallel")
    assert one.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no sweep lines"):
        plot_all(records, tmp_path / "none", route="memory-to-es")


def test_plot_sweep_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    results = _results(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot_sweep", str(results), str(tmp_path / "out"), "--route", "memory-to-s3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "tuning-memory-to-s3-parallel.png").read_bytes()[:8] == PNG
    failed = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot_sweep", str(results), str(tmp_path / "x.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1 and "pick one with --route and --setting" in failed.stderr
