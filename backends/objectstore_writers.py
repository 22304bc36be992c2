"""Writers of the object-store backend: files that roll at a row or byte limit, Hive layouts.

A :class:`RollingWriter` writes one sequence of files ``<stem>-<n><suffix>``
in one folder and starts a new file once the open one holds
``file_max_rows`` rows or ``file_max_bytes`` bytes, whichever comes first
(one format writer per open file, rolled by the bytes it has written).

A :class:`DatasetWriter` sends each batch either to one rolling writer or,
with ``partition_by``, splits it by the partition columns' values into
``<col>=<value>/`` folders (Hive layout; the partition columns are not
stored inside the files, as Hive readers expect). At most ``max_open_files``
files are open at once: past that the least recently used one is finished
and a later batch for its folder starts a new numbered file.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from collections import OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigurationError
from .objectstore_formats import FileWriter

#: Folder name of a null partition value (the Hive and pyarrow convention).
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def check_partition_columns(schema: pa.Schema, partition_by: list[str]) -> pa.Schema:
    """The schema of the partition columns; refuses missing or unsuitable columns."""
    fields = []
    for name in partition_by:
        index = schema.get_field_index(name)
        if index < 0:
            raise ConfigurationError(
                f"partition_by column {name!r} is not in the written data; columns: {', '.join(schema.names)}",
                path="target.partition_by",
            )
        t = schema.field(index).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_date(t) or pa.types.is_boolean(t)):
            raise ConfigurationError(
                f"partition_by column {name!r} has type {t}; partition by integer, string, date or boolean "
                "columns (derive one, e.g. `year(created_at)`)",
                path="target.partition_by",
            )
        fields.append(schema.field(index))
    return pa.schema(fields)


def hive_folder(names: list[str], values: list[str | None]) -> str:
    """``a=1/b=x`` for partition values given as text (None is the null folder)."""
    parts = []
    for name, value in zip(names, values):
        text = HIVE_NULL if value is None else urllib.parse.quote(value, safe="")
        parts.append(f"{name}={text}")
    return "/".join(parts)


def parse_hive_values(relative: str, partition_schema: pa.Schema) -> dict[str, str | None]:
    """Partition values (as text) of a file's path relative to the dataset root."""
    values: dict[str, str | None] = {}
    for segment in relative.split("/")[:-1]:
        name, sep, text = segment.partition("=")
        if sep and partition_schema.get_field_index(name) >= 0:
            values[name] = None if text == HIVE_NULL else urllib.parse.unquote(text)
    return values


class RollingWriter:
    """Numbered files in one folder, rolled at a row or a byte limit."""

    def __init__(
        self,
        folder: str,
        stem: str,
        suffix: str,
        open_file: Callable[[str], FileWriter],
        *,
        file_max_rows: int,
        file_max_bytes: int,
    ) -> None:
        self.folder = folder
        self.stem = stem
        self.suffix = suffix
        self.open_file = open_file
        self.file_max_rows = file_max_rows
        self.file_max_bytes = file_max_bytes
        self.rows = 0
        self.bytes_written = 0
        #: (path, rows) of every finished file.
        self.files: list[tuple[str, int]] = []
        self._current: FileWriter | None = None
        self._file_rows = 0
        self._count = 0

    @property
    def is_open(self) -> bool:
        return self._current is not None

    def _open(self) -> None:
        path = posixpath.join(self.folder, f"{self.stem}-{self._count:04d}{self.suffix}")
        self._count += 1
        self._current = self.open_file(path)
        self._file_rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        offset = 0
        while offset < batch.num_rows:
            if self._current is None:
                self._open()
            room = self.file_max_rows - self._file_rows
            piece = batch.slice(offset, room) if batch.num_rows - offset > room else batch.slice(offset)
            self._current.write(piece)
            self._file_rows += piece.num_rows
            self.rows += piece.num_rows
            offset += piece.num_rows
            if self._file_rows >= self.file_max_rows or self._current.bytes_written >= self.file_max_bytes:
                self.finish_file()

    def finish_file(self) -> None:
        """Close the open file (if any) and record it."""
        if self._current is None:
            return
        current, self._current = self._current, None
        self.bytes_written += current.close()
        self.files.append((current.path, self._file_rows))

    def ensure_one_file(self) -> None:
        """An empty partition still writes one (empty) file, so the schema is kept."""
        if not self.files and self._current is None:
            self._open()
            self.finish_file()

    def discard(self) -> list[str]:
        """Abandon the open file; returns every path this writer created (for removal)."""
        paths = [p for p, _ in self.files]
        if self._current is not None:
            self._current.discard()
            paths.append(self._current.path)
            self._current = None
        return paths


class DatasetWriter:
    """One partition's output: a single rolling writer, or one per Hive folder."""

    def __init__(
        self,
        folder: str,
        stem: str,
        suffix: str,
        schema: pa.Schema,
        make_file: Callable[[str, pa.Schema], FileWriter],
        *,
        partition_by: list[str],
        file_max_rows: int,
        file_max_bytes: int,
        max_open_files: int,
    ) -> None:
        self.folder = folder
        self.stem = stem
        self.suffix = suffix
        self.partition_by = list(partition_by)
        self.file_schema = pa.schema([f for f in schema if f.name not in self.partition_by])
        self.make_file = make_file
        self.file_max_rows = file_max_rows
        self.file_max_bytes = file_max_bytes
        self.max_open_files = max(1, max_open_files)
        self._writers: OrderedDict[str, RollingWriter] = OrderedDict()

    def _writer(self, relative_folder: str) -> RollingWriter:
        writer = self._writers.get(relative_folder)
        if writer is None:
            writer = RollingWriter(
                posixpath.join(self.folder, relative_folder) if relative_folder else self.folder,
                self.stem,
                self.suffix,
                lambda path: self.make_file(path, self.file_schema),
                file_max_rows=self.file_max_rows,
                file_max_bytes=self.file_max_bytes,
            )
            self._writers[relative_folder] = writer
        self._writers.move_to_end(relative_folder)
        if not writer.is_open:
            open_now = [w for w in self._writers.values() if w.is_open]
            if len(open_now) >= self.max_open_files:
                open_now[0].finish_file()  # least recently used first
        return writer

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if not self.partition_by:
            self._writer("").write(batch)
            return
        for relative_folder, piece in self._split(batch):
            self._writer(relative_folder).write(piece.select(self.file_schema.names))

    def _split(self, batch: pa.RecordBatch):
        texts = []
        for name in self.partition_by:
            column = batch.column(batch.schema.get_field_index(name))
            texts.append(column.cast(pa.string()))
        if len(texts) == 1:
            combined = pc.fill_null(texts[0], "\x00")
        else:
            combined = pc.binary_join_element_wise(*[pc.fill_null(t, "\x00") for t in texts], "\x1f")
        encoded = combined.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        bounds = np.flatnonzero(np.diff(ordered)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(ordered)]))
        for start, end in zip(starts, ends):
            rows = pa.array(order[start:end])
            first = int(order[start])
            values = [t[first].as_py() for t in texts]
            yield hive_folder(self.partition_by, values), batch.take(rows)

    def close(self) -> list[tuple[str, int]]:
        """Finish every open file; returns (path, rows) of every file written."""
        if not self._writers:
            self._writer("")
        for writer in self._writers.values():
            writer.finish_file()
        if not self.partition_by:
            self._writers[""].ensure_one_file()
        return [item for writer in self._writers.values() for item in writer.files]

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self._writers.values())

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self._writers.values())

    def discard(self) -> list[str]:
        """Abandon everything; returns the paths created (the caller removes them)."""
        paths: list[str] = []
        for writer in self._writers.values():
            paths.extend(writer.discard())
        return paths
