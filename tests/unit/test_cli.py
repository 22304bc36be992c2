"""The `ferry` command as a user runs it: exit codes, one-line errors, plan, interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FERRY = [sys.executable, "-m", "ferry.flows.cli"]


def _ferry(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*FERRY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = """
name: small
source: {backend: memory, dataset: orders, generate: {rows: 20000}}
target: {backend: local, url: ./out, dataset: orders}
mode: replace
"""


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_validate_accepts_a_good_job(tmp_path):
    job = _write(tmp_path / "job.yaml", GOOD)
    result = _ferry("validate", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid job 'small'" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("source: {backend: memory\n  dataset: [", "malformed YAML"),
        (GOOD.replace("backend: local", "backend: mongo"), "target.backend: unknown backend 'mongo'"),
        (GOOD.replace("mode: replace", "mode: replace\ncolour: blue"), "colour: unknown key"),
        ("name: x\nsource: {backend: memory, dataset: a}\n", "target: required field is missing"),
        (GOOD + "stream: {parallel: many}\n", "stream.parallel"),
        (GOOD.replace("url: ./out", "url: ./out, speed: 3"), "target.speed"),
        (GOOD + "transforms:\n  - explode: [a]\n", "transforms[0]"),
        (GOOD + "transforms:\n  - derive: {x: 'order_id +* 2'}\n", "derive"),
        (GOOD.replace("{rows: 20000}", "{rows: -5}"), "rows"),
    ],
)
def test_bad_jobs_give_one_clear_line_and_exit_2(tmp_path, text, expected):
    job = _write(tmp_path / "bad.yaml", text)
    result = _ferry("validate", str(job), cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line_error(result)
    assert str(job) in line
    assert expected in line


def test_debug_shows_the_traceback(tmp_path):
    job = _write(tmp_path / "bad.yaml", "source: [")
    result = _ferry("validate", str(job), "--debug", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_plan_writes_nothing(tmp_path):
    job = _write(tmp_path / "job.yaml", GOOD)
    result = _ferry("plan", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "partitions: 2 (parallel 2" in result.stdout
    assert "amount" in result.stdout and "decimal128(12, 2)" in result.stdout
    assert "Target does not exist yet" in result.stdout
    assert not (tmp_path / "out").exists()


def test_plan_reports_a_missing_source_dataset(tmp_path):
    job = _write(tmp_path / "job.yaml", GOOD.replace("source: {backend: memory, dataset: orders, generate: {rows: 20000}}", "source: {backend: local, url: ./nowhere, dataset: orders}"))
    result = _ferry("plan", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert "no Parquet files found for dataset 'orders'" in _one_line_error(result)


def test_run_failure_exits_1_with_the_column(tmp_path):
    job = _write(tmp_path / "job.yaml", GOOD + "transforms:\n  - cast: {status: int64}\n")
    result = _ferry("run", str(job), cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ferry: DataError") and "status" in last
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_ctrl_c_mid_run_cleans_up_and_exits_130(tmp_path):
    job = _write(
        tmp_path / "job.yaml",
        GOOD.replace("rows: 20000", "rows: 6000000").replace("mode: replace", "mode: replace\nstream: {batch_size: 8192, parallel: 1}\nverify: false"),
    )
    process = subprocess.Popen([*FERRY, "run", str(job)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = tmp_path / "out"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(output.rglob("*.parquet")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    assert list(output.rglob("*.parquet")), "the run never started writing"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Committed partitions: none" in stderr
    # Nothing half-written stays: no staging files, no unpublished version.
    assert not list((tmp_path / "out").rglob("*.parquet"))
    assert not (tmp_path / "out" / "orders" / "_ferry" / "CURRENT").exists()


def test_sigterm_keeps_committed_append_partitions_only(tmp_path):
    job = _write(
        tmp_path / "job.yaml",
        GOOD.replace("rows: 20000", "rows: 6000000")
        .replace("mode: replace", "mode: append\nstream: {batch_size: 8192, parallel: 2}\nverify: false"),
    )
    process = subprocess.Popen([*FERRY, "run", str(job)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = tmp_path / "out" / "orders" / "_ferry" / "commits"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(commits.rglob("*.json")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    committed = sorted(p.stem for p in commits.rglob("*.json"))
    assert committed and f"Committed partitions: {', '.join(committed)}" in stderr
    # Exactly the committed partitions' files remain; nothing staged or half-moved.
    files = sorted(p.name for p in (tmp_path / "out").rglob("*.parquet"))
    assert len(files) == len(committed)
    assert all(any(f"-{c}-" in name for name in files) for c in committed)


def test_the_summary_lists_unreadable_files_with_the_rows_loaded_before_each_failure():
    from ferry.flows.cli import render_summary

    summary = {
        "run_id": "r1", "job": "lake", "mode": "replace", "source": "objectstore /lake", "target": "objectstore /out",
        "output": "/out/orders", "rows_read": 31_500, "rows_written": 31_500, "rows_rejected": 0,
        "rows_per_s": 100_000, "data_seconds": 0.3, "end_to_end_seconds": 1.0, "partitions": ["p"] * 5, "files": 4,
        "verification": {"status": "passed", "method": "row count"}, "rejects_files": [],
        "unreadable_files": [
            {"object": "/lake/orders/b.parquet", "step": "plan", "rows_read": 0, "reason": "magic bytes\nnot found"},
            {"object": "/lake/orders/d.parquet", "step": "read", "rows_read": 1_500, "reason": "bad page"},
        ],
        "unreadable_report": "/rejects/lake/r1/unreadable-files.jsonl",
    }
    printed = render_summary(summary).splitlines()
    assert "  not read      2 source file(s) could not be read and were left out (on_error: collect):" in printed
    assert "                /lake/orders/b.parquet (plan): magic bytes not found" in printed
    assert "                /lake/orders/d.parquet (read; 1,500 of its rows loaded before the failure): bad page" in printed
    assert "                listed in /rejects/lake/r1/unreadable-files.jsonl" in printed
