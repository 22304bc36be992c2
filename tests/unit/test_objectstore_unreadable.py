"""Source files that cannot be read, on local folders: `on_error` decides whether the others go on.

With ``fail`` (the default) an unreadable file fails the read naming it. With
``collect`` it is left out, the other files are read, and the file is reported
(the backend's ``unreadable_inputs``, the run summary, the rejects folder and
the markdown artifact).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from ferry.backends import ObjectStoreBackend, memory_store
from ferry.backends.base import ReadPolicy
from ferry.backends.errors import PermanentBackendError

COLLECT = ReadPolicy(on_error="collect")
FAIL = ReadPolicy(on_error="fail")


def _ids(start: int, count: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + count), pa.int64()),
            "name": pa.array([f"name-{i:08d}" for i in range(start, start + count)], pa.string()),
        }
    )


def _parquet(path: Path, table: pa.Table, row_group_rows: int = 2_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Uncompressed, so that a damaged page header is met when that page is decoded.
    pq.write_table(table, path, row_group_size=row_group_rows, compression="none")
    return path


def _break_page(path: Path, row_group: int) -> None:
    """Overwrite the first page header of ``row_group`` (the footer stays readable)."""
    offset = pq.read_metadata(path).row_group(row_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _store(root: Path, policy: ReadPolicy | None = None, **settings) -> ObjectStoreBackend:
    store = ObjectStoreBackend(url=str(root), **settings)
    return store.set_read_policy(policy) if policy is not None else store


async def _read(store: ObjectStoreBackend, dataset: str, **options) -> tuple[list[int], list[str]]:
    """Every id the read yields, and the ids of the partitions it planned."""
    async with store:
        parts = await store.partitions(dataset, hint=1)
        ids: list[int] = []
        for part in parts:
            async for batch in store.read(part, batch_rows=options.get("batch_rows", 1_000)):
                ids.extend(batch.column("id").to_pylist())
        return ids, [p.id for p in parts]


def _read_sync(store, dataset, **options):
    return asyncio.run(_read(store, dataset, **options))


# -- Parquet: footers and schemas (planning) ------------------------------------------


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_parquet_file_with_an_unreadable_footer(tmp_path, damage):
    _parquet(tmp_path / "d" / "a.parquet", _ids(0, 100))
    bad = _parquet(tmp_path / "d" / "b.parquet", _ids(100, 100))
    _parquet(tmp_path / "d" / "c.parquet", _ids(200, 100))
    if damage == "junk":
        bad.write_bytes(b"this is not parquet at all")
    else:
        _truncate(bad)

    with pytest.raises(PermanentBackendError, match=r"d/b\.parquet \(corrupt or truncated\?\)"):
        _read_sync(_store(tmp_path), "d")
    with pytest.raises(PermanentBackendError, match=r"d/b\.parquet"):
        _read_sync(_store(tmp_path, FAIL), "d")

    store = _store(tmp_path, COLLECT, partition_min_bytes=0)
    ids, partition_ids = _read_sync(store, "d")
    assert sorted(ids) == list(range(0, 100)) + list(range(200, 300))
    # Partition ids keep the files' listing positions, so a rerun with --run-id finds the same ones.
    assert partition_ids == ["file-00000", "file-00002"]
    [entry] = store.unreadable_inputs()
    assert entry.object == str(bad)
    assert entry.step == "plan" and entry.rows_read == 0 and entry.partition is None
    assert "corrupt or truncated" in entry.reason and entry.error_class == "PermanentBackendError"


def test_every_file_unreadable_fails_even_when_collecting(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.parquet").write_bytes(b"nope")
    (tmp_path / "d" / "b.parquet").write_bytes(b"nope either")
    with pytest.raises(PermanentBackendError, match=r"none of the 2 Parquet files of dataset 'd' .* can be read; the first: .*a\.parquet"):
        _read_sync(_store(tmp_path, COLLECT), "d")


def test_a_schema_that_cannot_be_unified_is_left_out(tmp_path):
    # The odd file sorts first: the others must not be judged against it.
    odd = _parquet(tmp_path / "d" / "a.parquet", pa.table({"id": ["x", "y"], "name": ["p", "q"]}))
    _parquet(tmp_path / "d" / "b.parquet", _ids(0, 10))
    _parquet(tmp_path / "d" / "c.parquet", _ids(10, 10))

    with pytest.raises(PermanentBackendError, match=r"b\.parquet has a schema that differs from .*a\.parquet \(id: string vs int64\)"):
        _read_sync(_store(tmp_path), "d")

    store = _store(tmp_path, COLLECT)
    ids, _ = _read_sync(store, "d")
    assert sorted(ids) == list(range(20))
    [entry] = store.unreadable_inputs()
    assert entry.object == str(odd) and entry.step == "plan"
    assert "a.parquet has a schema that differs from" in entry.reason and "b.parquet" in entry.reason
    assert "string vs int64" in entry.reason or "int64 vs string" in entry.reason


def test_files_that_unify_keep_the_usual_column_order(tmp_path):
    # No conflict: collecting changes nothing, even when most files share another shape.
    _parquet(tmp_path / "d" / "a.parquet", pa.table({"name": ["a"], "id": pa.array([0], pa.int64())}))
    _parquet(tmp_path / "d" / "b.parquet", _ids(1, 1))
    _parquet(tmp_path / "d" / "c.parquet", _ids(2, 1))

    async def schema(store):
        async with store:
            return await store.schema("d")

    assert asyncio.run(schema(_store(tmp_path, COLLECT))).names == asyncio.run(schema(_store(tmp_path))).names == ["name", "id"]


# -- Parquet: data pages that fail while being read ------------------------------------


@pytest.mark.parametrize("row_group", [0, 3])
def test_a_parquet_file_failing_mid_read_in_a_packed_partition(tmp_path, row_group):
    """Small files share one scanner; a bad page is traced to its file, the other files load whole."""
    for number, name in enumerate("abcde"):
        _parquet(tmp_path / "d" / f"{name}.parquet", _ids(number * 10_000, 10_000))
    _break_page(tmp_path / "d" / "b.parquet", row_group)
    _break_page(tmp_path / "d" / "d.parquet", row_group)

    with pytest.raises(PermanentBackendError, match=r"cannot read Parquet file .*d/b\.parquet \(corrupt or truncated\?\)") as info:
        _read_sync(_store(tmp_path, partition_min_bytes=10**9), "d")
    assert "more)" not in str(info.value)  # the file itself, not the partition's first file

    store = _store(tmp_path, COLLECT, partition_min_bytes=10**9)
    ids, partition_ids = _read_sync(store, "d")
    assert partition_ids == ["files-00000"]
    assert len(ids) == len(set(ids)), "a file read again after a failure must not repeat rows"
    good = [i for i in ids if (i // 10_000) in (0, 2, 4)]
    assert sorted(good) == list(range(0, 10_000)) + list(range(20_000, 30_000)) + list(range(40_000, 50_000))
    entries = {Path(e.object).name: e for e in store.unreadable_inputs()}
    assert set(entries) == {"b.parquet", "d.parquet"}
    for name, first in (("b.parquet", 10_000), ("d.parquet", 30_000)):
        entry = entries[name]
        assert entry.step == "read" and entry.partition == "files-00000"
        loaded = sorted(i for i in ids if first <= i < first + 10_000)
        # What was passed on before the failure is reported, and it is the file's first rows.
        assert entry.rows_read == len(loaded)
        assert loaded == list(range(first, first + len(loaded)))
        assert len(loaded) <= row_group * 2_000


def test_a_parquet_file_failing_mid_read_in_its_own_partition(tmp_path):
    _parquet(tmp_path / "d" / "a.parquet", _ids(0, 10_000))
    _parquet(tmp_path / "d" / "b.parquet", _ids(10_000, 10_000))
    _break_page(tmp_path / "d" / "b.parquet", 2)

    with pytest.raises(PermanentBackendError, match=r"cannot read Parquet file .*d/b\.parquet"):
        _read_sync(_store(tmp_path, partition_min_bytes=0), "d")

    store = _store(tmp_path, COLLECT, partition_min_bytes=0)
    ids, _ = _read_sync(store, "d")
    [entry] = store.unreadable_inputs()
    assert entry.partition == "file-00001" and entry.step == "read"
    assert sorted(ids) == list(range(10_000 + entry.rows_read))


# -- JSON Lines and CSV -------------------------------------------------------------------


def _csv(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(table, path)
    return path


def _truncate_csv(path: Path) -> None:
    """Cut the file inside its last row, which loses its second column."""
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b",")])


def test_a_truncated_csv_file_is_left_out_when_read(tmp_path):
    _csv(tmp_path / "d" / "a.csv", _ids(0, 50))
    bad = _csv(tmp_path / "d" / "b.csv", _ids(50, 50))
    _truncate_csv(bad)
    _csv(tmp_path / "d" / "c.csv", _ids(100, 50))
    declared = {"read_schema": {"id": "int64", "name": "string"}, "format": "csv"}

    with pytest.raises(PermanentBackendError, match=r"cannot read .*d/b\.csv \(corrupt, truncated or not in the declared format\?\)"):
        _read_sync(_store(tmp_path, **declared), "d")

    store = _store(tmp_path, COLLECT, partition_min_bytes=10**9, **declared)
    ids, _ = _read_sync(store, "d")
    assert sorted(ids) == list(range(0, 50)) + list(range(100, 150))
    [entry] = store.unreadable_inputs()
    assert entry.object == str(bad) and entry.step == "read" and entry.rows_read == 0
    assert entry.partition == "files-00000"


def test_a_truncated_csv_file_in_the_inference_sample_is_left_out_at_planning(tmp_path):
    _csv(tmp_path / "d" / "a.csv", _ids(0, 50))
    bad = _csv(tmp_path / "d" / "b.csv", _ids(50, 50))
    _truncate_csv(bad)
    _csv(tmp_path / "d" / "c.csv", _ids(100, 50))

    with pytest.raises(PermanentBackendError, match=r"d/b\.csv"):
        _read_sync(_store(tmp_path, format="csv"), "d")

    store = _store(tmp_path, COLLECT, format="csv")
    ids, _ = _read_sync(store, "d")
    assert sorted(ids) == list(range(0, 50)) + list(range(100, 150))
    [entry] = store.unreadable_inputs()
    assert entry.object == str(bad) and entry.step == "plan"


def test_a_csv_value_that_does_not_fit_the_inferred_schema(tmp_path):
    _csv(tmp_path / "d" / "a.csv", _ids(0, 20))
    odd = tmp_path / "d" / "b.csv"
    odd.write_text("id,name\n20,ok\nnot-a-number,bad\n")
    _csv(tmp_path / "d" / "c.csv", _ids(30, 20))
    settings = {"format": "csv", "infer_sample_files": 1}  # b.csv is not in the sample

    with pytest.raises(PermanentBackendError, match=r"d/b\.csv"):
        _read_sync(_store(tmp_path, **settings), "d")

    store = _store(tmp_path, COLLECT, **settings)
    ids, _ = _read_sync(store, "d")
    assert sorted(ids) == list(range(0, 20)) + list(range(30, 50))
    [entry] = store.unreadable_inputs()
    assert entry.object == str(odd) and entry.step == "read"


def test_a_json_lines_file_with_a_broken_line_is_left_out(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(10)))
    bad = tmp_path / "d" / "b.jsonl"
    bad.write_text('{"id": 10, "name": "n10"}\n{"id": 11, "name": \n')
    (tmp_path / "d" / "c.jsonl").write_text("".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(20, 30)))
    settings = {"format": "jsonl", "infer_sample_files": 1}

    with pytest.raises(PermanentBackendError, match=r"cannot read .*d/b\.jsonl"):
        _read_sync(_store(tmp_path, **settings), "d")

    store = _store(tmp_path, COLLECT, **settings)
    ids, _ = _read_sync(store, "d")
    assert sorted(ids) == list(range(10)) + list(range(20, 30))
    [entry] = store.unreadable_inputs()
    assert entry.object == str(bad) and entry.step == "read" and entry.error_class == "PermanentBackendError"


def test_a_large_csv_file_failing_midway_reports_the_rows_it_passed_on(tmp_path):
    # Larger than the reader's 8 MiB block: the first block's rows are passed on before the failure.
    rows = 70_000
    wide = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "name": pa.array([f"{i:0>140}" for i in range(rows)], pa.string()),
        }
    )
    bad = _csv(tmp_path / "d" / "a.csv", wide)
    with open(bad, "a") as handle:
        handle.write("70000,one,too many\n")
    _csv(tmp_path / "d" / "b.csv", _ids(rows, 10))
    store = _store(tmp_path, COLLECT, format="csv", read_schema={"id": "int64", "name": "string"})
    ids, _ = _read_sync(store, "d", batch_rows=65_536)
    [entry] = store.unreadable_inputs()
    assert entry.object == str(bad) and entry.step == "read"
    assert 0 < entry.rows_read < rows
    assert sorted(ids) == list(range(entry.rows_read)) + list(range(rows, rows + 10))


# -- the policy itself ------------------------------------------------------------------


def test_the_read_policy_travels_with_copies_and_the_findings_do_not(tmp_path):
    _parquet(tmp_path / "d" / "a.parquet", _ids(0, 10))
    (tmp_path / "d" / "b.parquet").write_bytes(b"junk")
    store = _store(tmp_path, COLLECT)
    assert ObjectStoreBackend(url=str(tmp_path)).read_policy == FAIL
    _read_sync(store, "d")
    assert len(store.unreadable_inputs()) == 1
    for copy in (store.fresh(), pickle.loads(pickle.dumps(store))):
        assert copy.read_policy == COLLECT
        assert copy.unreadable_inputs() == []
    # Only the settings are hashed: the policy does not change which pool a block shares.
    assert store.config_hash() == ObjectStoreBackend(url=str(tmp_path)).config_hash()


# -- the migrate flow ---------------------------------------------------------------------


def _lake(tmp_path: Path) -> Path:
    """a, c and e load; b has a corrupt footer; d fails in its third row group."""
    root = tmp_path / "lake"
    for number, name in enumerate("abcde"):
        _parquet(root / "orders" / f"{name}.parquet", _ids(number * 10_000, 10_000))
    (root / "orders" / "b.parquet").write_bytes(b"PAR1 but nothing else")
    _break_page(root / "orders" / "d.parquet", 2)
    return root


def _job(tmp_path: Path, on_error: str) -> dict:
    return {
        "name": "bad-input",
        "source": {"backend": "local", "url": str(_lake(tmp_path)), "dataset": "orders", "partition_min_bytes": 0},
        "target": {"backend": "local", "url": str(tmp_path / "out"), "dataset": "orders"},
        "mode": "replace",
        "on_error": on_error,
        "rejects_dir": str(tmp_path / "rejects"),
        "stream": {"batch_size": 1_000, "parallel": 2},
    }


@pytest.mark.usefixtures("prefect_harness")
def test_collect_run_loads_the_readable_files_and_reports_the_others(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from ferry.flows.cli import render_summary
    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict
    from ferry.tasks.rejects import read_unreadable_files

    summary = asyncio.run(migrate(job=job_from_dict(_job(tmp_path, "collect"))))

    entries = {Path(e["object"]).name: e for e in summary["unreadable_files"]}
    assert set(entries) == {"b.parquet", "d.parquet"}
    assert entries["b.parquet"]["step"] == "plan" and entries["b.parquet"]["rows_read"] == 0
    assert entries["d.parquet"]["step"] == "read" and entries["d.parquet"]["partition"] == "file-00003"
    partial = entries["d.parquet"]["rows_read"]
    assert summary["rows_read"] == summary["rows_written"] == 30_000 + partial
    back = pq.read_table(summary["output"]).column("id").to_pylist()
    assert sorted(back) == (
        list(range(0, 10_000)) + list(range(20_000, 30_000)) + list(range(30_000, 30_000 + partial)) + list(range(40_000, 50_000))
    )
    # Verification compares what was read with what was written, and says files were left out.
    verification = summary["verification"]
    assert verification["status"] == "passed"
    assert "2 files of the source could not be read" in verification["note"]

    report = summary["unreadable_report"]
    assert report == str(tmp_path / "rejects" / "bad-input" / summary["run_id"] / "unreadable-files.jsonl")
    assert {Path(e["object"]).name for e in read_unreadable_files(report)} == {"b.parquet", "d.parquet"}
    assert summary["rejects_files"] == []  # no row was rejected

    printed = render_summary(summary)
    assert "not read      2 source file(s)" in printed
    assert "b.parquet (plan)" in printed
    # Arrow's read-ahead may meet the broken page before any batch of d.parquet
    # was handed on, so how many of its rows loaded first varies from run to run.
    if partial:
        assert f"d.parquet (read; {partial:,} of its rows loaded before the failure)" in printed
    else:
        assert "d.parquet (read):" in printed

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ferry-bad-input-summary"])))

    markdown = str(asyncio.run(artifacts())[-1].data)
    assert "Source files not read" in markdown and "b.parquet" in markdown and "d.parquet" in markdown
    assert "could not be read" in markdown


@pytest.mark.usefixtures("prefect_harness")
def test_fail_run_stops_naming_the_unreadable_file(tmp_path):
    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict

    with pytest.raises(PermanentBackendError, match=r"orders/b\.parquet \(corrupt or truncated\?\)"):
        asyncio.run(migrate(job=job_from_dict(_job(tmp_path, "fail"))))
    assert not list((tmp_path / "out").rglob("*.parquet"))
    assert not (tmp_path / "rejects").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_collect_run_into_memory_with_a_failing_text_file(tmp_path):
    from ferry.flows.migrate import migrate
    from ferry.flows.spec import job_from_dict

    _csv(tmp_path / "lake" / "rows" / "a.csv", _ids(0, 100))
    bad = _csv(tmp_path / "lake" / "rows" / "b.csv", _ids(100, 100))
    _truncate_csv(bad)
    job = {
        "name": "bad-csv",
        "source": {
            "backend": "local",
            "url": str(tmp_path / "lake"),
            "dataset": "rows",
            "format": "csv",
            "read_schema": {"id": "int64", "name": "string"},
        },
        "target": {"backend": "memory", "dataset": "rows"},
        "mode": "replace",
        "on_error": "collect",
        "rejects_dir": str(tmp_path / "rejects"),
    }
    summary = asyncio.run(migrate(job=job_from_dict(job)))
    assert [Path(e["object"]).name for e in summary["unreadable_files"]] == ["b.csv"]
    assert sorted(memory_store.table("rows").column("id").to_pylist()) == list(range(100))
    assert summary["verification"]["status"] == "passed"


def test_cli_run_with_unreadable_files_exits_0_and_prints_them(tmp_path):
    _lake(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: cli-bad-input\n"
        "source: {backend: local, url: ./lake, dataset: orders}\n"
        "target: {backend: local, url: ./out, dataset: orders}\n"
        "mode: replace\n"
        "on_error: collect\n"
        "rejects_dir: ./rejects\n"
    )
    command = [sys.executable, "-m", "ferry.flows.cli", "run", str(job), "--json"]
    # A busy machine can take longer than Prefect's default 20 s to start the ephemeral API.
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(Path(e["object"]).name for e in summary["unreadable_files"]) == ["b.parquet", "d.parquet"]
    assert summary["verification"]["status"] == "passed"
    assert (tmp_path / summary["unreadable_report"]).exists()  # rejects_dir is relative to the working folder
