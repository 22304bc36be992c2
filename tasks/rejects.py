"""The rejects file: rows that could not be transformed or written are kept, never dropped.

With ``on_error: collect`` every rejected row lands in a local Parquet file,
one per run and partition: ``<rejects_dir>/<job>/<run>/<partition>.parquet``
with the partition, the row key, the column, the offending value, the reason,
the error class and the whole original row as JSON. Source files left out
because they could not be read are listed, one JSON object a line, in
``<rejects_dir>/<job>/<run>/unreadable-files.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REJECTS_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("row_key", pa.string()),
        ("column", pa.string()),
        ("value", pa.string()),
        ("reason", pa.string()),
        ("error_class", pa.string()),
        ("step", pa.string()),
        ("record", pa.string()),
    ]
)


class RejectsSink:
    """Collects rejected rows of one partition and writes them to its rejects file."""

    def __init__(self, folder: str, partition_id: str, key: list[str] | tuple[str, ...]) -> None:
        self.folder = folder
        self.partition_id = partition_id
        self.key = list(key)
        self.rows = 0
        self.rows_seen = 0  # offset of the next input batch within the partition
        self._tables: list[pa.Table] = []

    @property
    def path(self) -> str:
        return os.path.join(self.folder, f"{self.partition_id}.parquet")

    def add(self, source_batch: pa.RecordBatch, rejects: pa.Table) -> int:
        """Record ``rejects`` (with ``row_index`` into ``source_batch``); returns how many."""
        if rejects is None or rejects.num_rows == 0:
            return 0
        indices = rejects.column("row_index")
        if isinstance(indices, pa.ChunkedArray):
            indices = indices.combine_chunks()
        originals = source_batch.take(indices)
        records = [json.dumps(row, default=str, ensure_ascii=False) for row in originals.to_pylist()]
        if self.key and all(source_batch.schema.get_field_index(k) >= 0 for k in self.key):
            keys = originals.select(self.key).to_pylist()
            row_keys = [json.dumps([row[k] for k in self.key], default=str, ensure_ascii=False) for row in keys]
        else:
            positions = pc.add(indices, self.rows_seen).to_pylist()
            row_keys = [f"row {p}" for p in positions]
        count = rejects.num_rows
        table = pa.table(
            {
                "partition": pa.array([self.partition_id] * count, pa.string()),
                "row_key": pa.array(row_keys, pa.string()),
                "column": _strings(rejects, "column"),
                "value": _strings(rejects, "value"),
                "reason": _strings(rejects, "reason"),
                "error_class": _strings(rejects, "error_class"),
                "step": _strings(rejects, "step"),
                "record": pa.array(records, pa.string()),
            },
            schema=REJECTS_SCHEMA,
        )
        self._tables.append(table)
        self.rows += count
        return count

    def advance(self, rows: int) -> None:
        """Move the row offset past an input batch (for row keys without key columns)."""
        self.rows_seen += rows

    def flush(self, *, append: bool = False) -> str | None:
        """Write the rejects file (if any row was rejected) and return its path.

        ``append`` keeps the rows already in the file (the write stage adds the
        target's rejects to the transform stage's file of the same partition).
        """
        if not self._tables:
            return None
        os.makedirs(self.folder, exist_ok=True)
        tables = list(self._tables)
        if append and os.path.exists(self.path):
            tables.insert(0, pq.read_table(self.path))
        table = pa.concat_tables(tables)
        temporary = self.path + ".tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, self.path)
        self._tables.clear()
        return self.path

    def discard(self) -> None:
        """Forget collected rows (a retried attempt collects them again)."""
        self._tables.clear()
        self.rows = 0
        self.rows_seen = 0


def _strings(table: pa.Table, name: str) -> pa.Array:
    if table.schema.get_field_index(name) < 0:
        return pa.nulls(table.num_rows, pa.string())
    column = table.column(name)
    if column.type != pa.string():
        column = column.cast(pa.string())
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def read_rejects(path: str) -> list[dict[str, Any]]:
    """Rows of a rejects file as dictionaries (for tests and small files)."""
    return pq.read_table(path).to_pylist()


#: The run's file-level rejects: source objects left out of the read (on_error: collect).
UNREADABLE_FILES = "unreadable-files.jsonl"


def write_unreadable_files(folder: str, entries: list[dict[str, Any]]) -> str | None:
    """Write the run's unreadable source objects, one JSON object a line, and return the path.

    Each entry names the ``object``, the ``step`` that met the error (``plan``
    or ``read``), the ``partition``, the ``reason``, the ``error_class`` and
    ``rows_read``: rows of it passed on, and so loaded, before the failure.
    The file is rewritten whole, so a retried partition is never listed twice.
    """
    if not entries:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, UNREADABLE_FILES)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    os.replace(temporary, path)
    return path


def read_unreadable_files(path: str) -> list[dict[str, Any]]:
    """Entries of an unreadable-files report as dictionaries."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
