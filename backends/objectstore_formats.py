"""File formats of the object-store backend: Parquet, JSON Lines and CSV (optionally gzip).

Writers share one small interface (:class:`FileWriter`: ``write(batch)``,
``bytes_written``, ``close()``) so the rolling and Hive-partitioned writers of
:mod:`ferry.backends.objectstore` do not care which format they write.

JSON Lines and CSV are text: a read has one stable schema, either declared by
the job (``read_schema``) or inferred from a sample of the first files and
then fixed for the run. Types the text formats cannot carry as such are
encoded so that the round trip stays exact where it can:

* binary -> base64 text (both formats); dates -> ``YYYY-MM-DD`` text (JSON);
  timestamps -> ISO-8601 text; decimals -> their exact text;
* CSV has no lists or structs: writing them is refused with a message;
  JSON cannot hold Infinity or NaN: writing them is refused with a message.

A gzip file cannot be split, so every text file is one partition.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.json as pjson
import pyarrow.parquet as pq

from .errors import ConfigurationError, DataError, PermanentBackendError

#: Formats and their file-name suffixes (before ``.gz``).
SUFFIXES = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}
TEXT_FORMATS = ("jsonl", "csv")
#: Suffixes a read accepts per format.
READ_SUFFIXES = {
    "parquet": (".parquet", ".parq"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
    "csv": (".csv", ".csv.gz"),
}


def file_suffix(fmt: str, gzip: bool) -> str:
    """The suffix Ferry gives the files it writes."""
    return SUFFIXES[fmt] + (".gz" if gzip and fmt in TEXT_FORMATS else "")


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


# -- writing ------------------------------------------------------------------------


class FileWriter:
    """One output file being written."""

    def __init__(self, arrow_fs: pafs.FileSystem, path: str) -> None:
        self.path = path
        self.arrow_fs = arrow_fs
        if isinstance(arrow_fs, pafs.LocalFileSystem):
            # Hive folders must exist locally; object stores have no folders.
            arrow_fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # compression=None: Arrow would otherwise gzip a `.gz` name itself ('detect').
        self._raw = arrow_fs.open_output_stream(path, compression=None)

    @property
    def bytes_written(self) -> int:
        """Bytes sent to the store so far (compressed size for gzip)."""
        return self._raw.tell()

    def write(self, batch: pa.RecordBatch) -> None:
        raise NotImplementedError

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        raise NotImplementedError

    def discard(self) -> None:
        """Close without caring about the result (the caller deletes the file)."""
        try:
            self._raw.close()
        except Exception:
            pass


#: A Parquet row group is also cut once this many bytes of Arrow data wait for it.
ROW_GROUP_MAX_BUFFER_BYTES = 64 * 1024 * 1024


class ParquetFileWriter(FileWriter):
    """A Parquet file: one ``ParquetWriter`` per open file.

    Incoming batches are usually smaller than a row group; they are buffered
    until ``row_group_rows`` rows (or 64 MiB of Arrow data) wait, so the file
    gets row groups of the configured size rather than one per batch.
    """

    def __init__(self, arrow_fs, path, schema: pa.Schema, *, compression: str, row_group_rows: int) -> None:
        super().__init__(arrow_fs, path)
        self.schema = schema
        self.row_group_rows = row_group_rows
        self._writer = pq.ParquetWriter(self._raw, schema, compression=compression)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        if self._pending_rows >= self.row_group_rows or self._pending_bytes >= ROW_GROUP_MAX_BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        self._writer.write_table(table, row_group_size=self.row_group_rows)

    def close(self) -> int:
        self._flush()
        self._writer.close()
        size = self._raw.tell()
        self._raw.close()
        return size

    def discard(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
        super().discard()


class _TextFileWriter(FileWriter):
    def __init__(self, arrow_fs, path, schema: pa.Schema, *, gzip: bool) -> None:
        super().__init__(arrow_fs, path)
        self.schema = schema
        self._sink = pa.CompressedOutputStream(self._raw, "gzip") if gzip else self._raw

    def close(self) -> int:
        if self._sink is not self._raw:
            # Closing the gzip stream writes its trailer and closes the raw
            # stream too, so the final size is asked of the store.
            self._sink.close()
            return self.arrow_fs.get_file_info(self.path).size
        size = self._raw.tell()
        self._raw.close()
        return size

    _last_size = 0

    def _track(self) -> None:
        self._last_size = self._raw.tell()


class CsvFileWriter(_TextFileWriter):
    """A CSV file with a header row; binary columns as base64."""

    def __init__(self, arrow_fs, path, schema: pa.Schema, *, gzip: bool) -> None:
        check_text_schema(schema, "csv")
        super().__init__(arrow_fs, path, schema, gzip=gzip)
        self._writer = pcsv.CSVWriter(self._sink, _csv_transport_schema(schema))

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(encode_binary(batch))
        self._track()

    def close(self) -> int:
        self._writer.close()
        return super().close()


class JsonLinesFileWriter(_TextFileWriter):
    """One JSON object per line; dates, timestamps, decimals and binary as text."""

    def write(self, batch: pa.RecordBatch) -> None:
        encoded = _json_ready(batch)
        lines = []
        for row in encoded.to_pylist():
            try:
                lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False, default=_json_default))
            except ValueError:
                column = _non_finite_column(batch)
                raise DataError(
                    "JSON Lines cannot hold Infinity or NaN; filter those rows, cast the column to string "
                    "or write Parquet",
                    column=column,
                ) from None
        if lines:
            self._sink.write(("\n".join(lines) + "\n").encode("utf-8"))
        self._track()


def make_writer(fmt: str, arrow_fs, path: str, schema: pa.Schema, *, compression: str, row_group_rows: int) -> FileWriter:
    """Open a writer for one output file of ``fmt``."""
    if fmt == "parquet":
        return ParquetFileWriter(arrow_fs, path, schema, compression=compression, row_group_rows=row_group_rows)
    gzip = compression == "gzip"
    if fmt == "csv":
        return CsvFileWriter(arrow_fs, path, schema, gzip=gzip)
    return JsonLinesFileWriter(arrow_fs, path, schema, gzip=gzip)


def check_text_schema(schema: pa.Schema, fmt: str) -> None:
    """Refuse, before writing, columns ``fmt`` cannot hold."""
    if fmt != "csv":
        return
    nested = [f.name for f in schema if pa.types.is_nested(f.type)]
    if nested:
        raise ConfigurationError(
            f"CSV cannot hold list, struct or map columns ({', '.join(nested)}); write JSON Lines or Parquet, "
            "or drop those columns with a `select` transform",
            path="target.format",
        )


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _csv_transport_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string()) if _is_binary(f.type) else f for f in schema])


def encode_binary(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Binary columns as base64 text (text formats cannot hold raw bytes)."""
    if not any(_is_binary(f.type) for f in batch.schema):
        return batch
    arrays = []
    fields = []
    for f, column in zip(batch.schema, batch.columns):
        if _is_binary(f.type):
            values = [None if v is None else base64.b64encode(v).decode("ascii") for v in column.to_pylist()]
            column = pa.array(values, pa.string())
            f = pa.field(f.name, pa.string())
        arrays.append(column)
        fields.append(f)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _json_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Top-level temporal columns as ISO text (exact, any unit); binary as base64."""
    batch = encode_binary(batch)
    arrays, fields = [], []
    for f, column in zip(batch.schema, batch.columns):
        if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type) or pa.types.is_time(f.type):
            column = column.cast(pa.string())
            f = pa.field(f.name, pa.string())
        arrays.append(column)
        fields.append(f)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _json_default(value: Any) -> Any:
    import datetime as dt
    from decimal import Decimal

    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot write a {type(value).__name__} value to JSON")


def _non_finite_column(batch: pa.RecordBatch) -> str | None:
    for f, column in zip(batch.schema, batch.columns):
        if pa.types.is_floating(f.type):
            finite = pc.is_finite(column)
            if not pc.all(pc.or_kleene(finite, pc.is_null(column))).as_py():
                return f.name
    return None


# -- reading ------------------------------------------------------------------------


def _json_transport_type(t: pa.DataType) -> pa.DataType:
    if _is_binary(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return pa.string()
    return t


def _decode(batch: pa.RecordBatch, schema: pa.Schema, path: str) -> pa.RecordBatch:
    """Turn transport columns (text) back into the read schema's types."""
    arrays = []
    for f in schema:
        column = batch.column(batch.schema.get_field_index(f.name))
        if column.type != f.type:
            try:
                if _is_binary(f.type):
                    values = [None if v is None else base64.b64decode(v, validate=True) for v in column.to_pylist()]
                    column = pa.array(values, f.type)
                else:
                    column = column.cast(f.type)
            except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(
                    f"{path}: a value of column {f.name!r} does not fit {f.type}: {exc}; declare `read_schema` "
                    "or fix the file",
                    column=f.name,
                ) from None
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@dataclass
class TextReadOptions:
    """How text files are parsed."""

    fmt: str
    delimiter: str = ","
    block_size: int = 8 * 1024 * 1024


def read_text_batches(
    arrow_fs: pafs.FileSystem,
    path: str,
    schema: pa.Schema,
    options: TextReadOptions,
    *,
    columns: list[str] | None,
    display: str,
) -> Iterator[pa.RecordBatch]:
    """Stream one JSON Lines or CSV file (gzip or not) with the run's fixed ``schema``."""
    wanted = pa.schema([schema.field(c) for c in columns]) if columns is not None else schema
    stream = arrow_fs.open_input_stream(path, compression="gzip" if is_gzip(path) else None)
    try:
        reader = _open_text_reader(stream, wanted, options, display)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as exc:
                raise _read_error(display, exc) from None
            yield _decode(batch, wanted, display)
    finally:
        stream.close()


def _open_text_reader(stream, wanted: pa.Schema, options: TextReadOptions, display: str):
    read_options_args = {"block_size": options.block_size}
    try:
        if options.fmt == "csv":
            transport = _csv_transport_schema(wanted)
            return pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(**read_options_args),
                parse_options=pcsv.ParseOptions(delimiter=options.delimiter),
                convert_options=pcsv.ConvertOptions(
                    column_types=transport,
                    include_columns=transport.names,
                    include_missing_columns=False,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        transport = pa.schema([pa.field(f.name, _json_transport_type(f.type)) for f in wanted])
        return pjson.open_json(
            stream,
            read_options=pjson.ReadOptions(**read_options_args),
            parse_options=pjson.ParseOptions(explicit_schema=transport, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise _read_error(display, exc) from None


def _read_error(display: str, exc: Exception) -> Exception:
    text = str(exc)
    if "column" in text.lower() and ("not found" in text.lower() or "missing" in text.lower()):
        return PermanentBackendError(f"{display}: {text}; the file's columns differ from the read schema")
    return PermanentBackendError(f"cannot read {display} (corrupt, truncated or not in the declared format?): {text}")


def infer_file_schema(
    arrow_fs: pafs.FileSystem, path: str, options: TextReadOptions, *, sample_bytes: int, display: str
) -> pa.Schema:
    """Infer the schema of one JSON Lines or CSV file from its first ``sample_bytes``."""
    stream = arrow_fs.open_input_stream(path, compression="gzip" if is_gzip(path) else None)
    try:
        head = stream.read(sample_bytes)
    except OSError as exc:
        raise _read_error(display, exc) from None
    finally:
        stream.close()
    if len(head) >= sample_bytes:
        # Cut at the last full line so inference never sees half a record.
        cut = head.rfind(b"\n")
        head = head[: cut + 1] if cut > 0 else head
    try:
        if options.fmt == "csv":
            table = pcsv.read_csv(
                pa.BufferReader(head),
                parse_options=pcsv.ParseOptions(delimiter=options.delimiter),
                convert_options=pcsv.ConvertOptions(strings_can_be_null=True, quoted_strings_can_be_null=False),
            )
        else:
            table = pjson.read_json(pa.BufferReader(head))
    except (pa.ArrowInvalid, OSError) as exc:
        raise _read_error(display, exc) from None
    return table.schema


def infer_text_schema(
    arrow_fs: pafs.FileSystem, paths: list[str], options: TextReadOptions, *, sample_bytes: int, displays: list[str]
) -> pa.Schema:
    """Infer one schema from the first ``sample_bytes`` of each sampled file, unified."""
    schemas = [
        infer_file_schema(arrow_fs, path, options, sample_bytes=sample_bytes, display=display)
        for path, display in zip(paths, displays)
    ]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise PermanentBackendError(
            f"the sampled files ({', '.join(displays)}) have incompatible columns: {exc}; declare `read_schema`"
        ) from None
