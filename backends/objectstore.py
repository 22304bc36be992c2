"""The object-store backend: Parquet datasets in a folder, through fsspec.

A dataset is a folder ``<url>/<dataset>/``. Layout::

    <dataset>/<run>-<partition>-<n>.parquet         appended data
    <dataset>/_ferry/CURRENT                         pointer to the published version (replace)
    <dataset>/_ferry/versions/<run>/...parquet       data of a replace run
    <dataset>/_ferry/staging/<run>/<partition>/      files being written (never read)
    <dataset>/_ferry/commits/<run>/<partition>.json  commit markers (retry ledger)

Readers (Ferry's) read the version that ``CURRENT`` names when it exists, or
else the dataset folder itself; names starting with ``_`` or ``.`` are never
data. A partition's files are written under ``staging`` and moved into place
when the partition commits, then its commit marker is written: a retried
partition finds the marker and is skipped, or removes what its failed attempt
left. A replace publishes by atomically replacing the ``CURRENT`` pointer, so a
reader sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import posixpath
import time
import uuid
from typing import Any, AsyncIterable, AsyncIterator, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from .base import Backend, Capabilities, Partition, WriteContext, WriteMode, WriteResult
from .errors import ConfigurationError, PermanentBackendError
from .filters import And, Comparison, Filter, Or, filter_batch
from .pools import pool_manager

META_DIR = "_ferry"


class ObjectStoreBackend(Backend):
    """Parquet datasets in a local folder (and, through fsspec, object stores)."""

    _block_type_name = "Ferry Object Store"
    _block_type_slug = "ferry-object-store"
    _description = "Parquet datasets in a folder or an object store, written with atomic publishing."

    kind: ClassVar[str] = "objectstore"
    capabilities: ClassVar[Capabilities] = Capabilities(
        write_modes=frozenset({WriteMode.APPEND, WriteMode.REPLACE}),
        pushdown_columns=True,
        pushdown_filters=True,
    )

    url: str = Field(..., description="Folder holding the datasets: a local path or a file:// URL.")
    format: str = Field("parquet", description="File format of the datasets; `parquet`.")
    compression: str = Field("snappy", description="Parquet compression codec (snappy, zstd, gzip, lz4, none).")
    row_group_rows: int = Field(
        1_048_576, ge=1, description="Largest number of rows in one Parquet row group."
    )
    file_max_rows: int = Field(10_000_000, ge=1, description="A new file is started after this many rows.")
    file_max_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="A new file is started once a file holds this many bytes."
    )
    keep_versions: int = Field(
        0, ge=0, description="Previous versions kept after a replace publishes (0 removes them all)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra fsspec filesystem options."
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "parquet":
            raise ValueError("only `parquet` is supported by this backend")
        return value

    @field_validator("compression")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        codecs = {"snappy", "zstd", "gzip", "lz4", "brotli", "none"}
        if value.lower() not in codecs:
            raise ValueError(f"unknown compression {value!r}; use one of {', '.join(sorted(codecs))}")
        return value.lower()

    def describe(self) -> str:
        return f"objectstore {self.url} ({self.format}, {self.compression})"

    def describe_target_schema(self, schema: pa.Schema) -> str:
        """The Parquet schema the files will have."""
        sink = pa.BufferOutputStream()
        pq.write_table(schema.empty_table(), sink)
        text = str(pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema).strip()
        # The first line is the Python object's repr, not part of the schema.
        return "\n".join(line for line in text.splitlines() if not line.startswith("<pyarrow"))

    def location(self, dataset: str) -> str:
        return self.data_path(dataset) if "filesystems" in self._live else self.dataset_path(dataset)

    def partitions_written_by(self, run_id: str, partitions: list[Partition]) -> list[Partition] | None:
        return [p for p in partitions if posixpath.basename(p.spec["relative"]).startswith(f"{run_id}-")]

    # -- filesystems -----------------------------------------------------------
    def _protocol_and_root(self) -> tuple[str, str]:
        protocol, path = fsspec.core.split_protocol(self.url)
        protocol = protocol or "file"
        if protocol in ("file", "local"):
            import os

            return "file", os.path.abspath(os.path.expanduser(path))
        raise ConfigurationError(
            f"url {self.url!r}: the {protocol!r} protocol is not supported yet; use a local folder",
            path="url",
        )

    def _filesystems(self) -> tuple[fsspec.AbstractFileSystem, pafs.FileSystem]:
        fs = self._live.get("filesystems")
        if fs is None:
            raise RuntimeError("the backend is not open: use `async with backend:`")
        return fs

    async def open(self) -> None:
        if "filesystems" in self._live:
            return
        protocol, _ = self._protocol_and_root()

        def make() -> tuple[fsspec.AbstractFileSystem, pafs.FileSystem]:
            fs = fsspec.filesystem(protocol, **self.storage_options)
            # Local files go through Arrow's native filesystem for data I/O:
            # fsspec wraps the same calls in Python and is measurably slower.
            arrow_fs = pafs.LocalFileSystem() if protocol == "file" else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
            return fs, arrow_fs

        pair = await pool_manager.acquire(
            f"objectstore-{protocol}",
            self._filesystem_key(),
            make,
            per_loop=False,
            limits={"protocol": protocol},
        )
        self._live["filesystems"] = pair

    async def close(self) -> None:
        if self._live.pop("filesystems", None) is None:
            return
        protocol, _ = self._protocol_and_root()
        await pool_manager.release(f"objectstore-{protocol}", self._filesystem_key(), per_loop=False)

    def _filesystem_key(self) -> str:
        """Blocks that differ only in folder or file settings share one filesystem client."""
        import hashlib

        protocol, _ = self._protocol_and_root()
        canonical = json.dumps({"protocol": protocol, "options": self.storage_options}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # -- paths -----------------------------------------------------------------
    def dataset_path(self, dataset: str) -> str:
        """Absolute path of the dataset folder."""
        _, root = self._protocol_and_root()
        clean = dataset.strip("/")
        if not clean or ".." in clean.split("/"):
            raise ConfigurationError(f"invalid dataset name {dataset!r}", path="dataset")
        return posixpath.join(root, clean)

    def _meta(self, dataset: str, *parts: str) -> str:
        return posixpath.join(self.dataset_path(dataset), META_DIR, *parts)

    def current_version(self, dataset: str) -> str | None:
        """The run id of the published replace version, or None for a plain folder."""
        fs, _ = self._filesystems()
        pointer = self._meta(dataset, "CURRENT")
        try:
            with fs.open(pointer, "rb") as handle:
                return json.loads(handle.read())["version"]
        except FileNotFoundError:
            return None

    def data_path(self, dataset: str, version: str | None = None) -> str:
        """Folder holding the readable files of ``dataset`` (or of ``version``)."""
        version = version if version is not None else self.current_version(dataset)
        if version is None:
            return self.dataset_path(dataset)
        return self._meta(dataset, "versions", version)

    def data_files(self, dataset: str) -> list[str]:
        """The data files a read sees, in a fixed, sorted order."""
        fs, _ = self._filesystems()
        root = self.data_path(dataset)
        if not fs.exists(root):
            return []
        files = []
        for path in fs.find(root):
            relative = posixpath.relpath(path, root)
            if any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue
            if path.endswith(".parquet"):
                files.append(path)
        return sorted(files)

    # -- reading ---------------------------------------------------------------
    async def exists(self, dataset: str) -> bool:
        return bool(await asyncio.to_thread(self.data_files, dataset))

    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        files = await asyncio.to_thread(self.data_files, dataset)
        if not files:
            raise ConfigurationError(
                f"no Parquet files found for dataset {dataset!r} under {self.data_path(dataset)}; "
                "check `url` and `dataset`"
            )
        schema = await asyncio.to_thread(self._unified_schema, files)
        if columns is None:
            return schema
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ConfigurationError(
                f"dataset {dataset!r} has no column(s) {', '.join(map(repr, missing))}; "
                f"available: {', '.join(schema.names)}",
                path="source.columns",
            )
        return pa.schema([schema.field(c) for c in columns])

    def _unified_schema(self, files: list[str]) -> pa.Schema:
        _, arrow_fs = self._filesystems()
        schemas = []
        for path in files:
            try:
                schemas.append(pq.read_schema(path, filesystem=arrow_fs))
            except (pa.ArrowInvalid, OSError) as exc:
                raise PermanentBackendError(f"cannot read Parquet file {path}: {exc}") from exc
        try:
            return pa.unify_schemas(schemas)
        except pa.ArrowInvalid as exc:
            raise PermanentBackendError(
                f"the files of this dataset have incompatible schemas: {exc}"
            ) from exc

    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        files = await asyncio.to_thread(self.data_files, dataset)
        if not files:
            raise ConfigurationError(f"no Parquet files found for dataset {dataset!r} under {self.data_path(dataset)}")
        schema = await asyncio.to_thread(self._unified_schema, files)
        encoded = base64.b64encode(schema.serialize().to_pybytes()).decode()
        root = self.data_path(dataset)
        parts = []
        for index, path in enumerate(files):
            relative = posixpath.relpath(path, root)
            parts.append(
                Partition(
                    id=f"file-{index:05d}",
                    dataset=dataset,
                    spec={"files": [path], "relative": relative, "schema": encoded},
                )
            )
        return parts

    async def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        _, arrow_fs = self._filesystems()
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(partition.spec["schema"])))
        needed = None
        if columns is not None:
            extra = [c for c in sorted(where.columns()) if c not in columns] if where is not None else []
            needed = list(columns) + [c for c in extra if schema.get_field_index(c) >= 0]
        prefilter = _to_arrow_prefilter(where, schema) if where is not None else None
        try:
            dataset = pads.dataset(partition.spec["files"], schema=schema, format="parquet", filesystem=arrow_fs)
            scanner = dataset.scanner(columns=needed, filter=prefilter, batch_size=batch_rows, use_threads=True)
        except (pa.ArrowInvalid, OSError) as exc:
            raise PermanentBackendError(f"cannot read {partition.spec['files'][0]}: {exc}") from exc
        iterator = iter(scanner.to_batches())
        sentinel = object()
        while True:
            try:
                batch = await asyncio.to_thread(next, iterator, sentinel)
            except (pa.ArrowInvalid, OSError) as exc:
                raise PermanentBackendError(
                    f"cannot read {partition.spec['files'][0]} (corrupt or truncated?): {exc}"
                ) from exc
            if batch is sentinel:
                return
            if where is not None:
                # The pushed-down filter only prunes; the exact semantics come from the evaluator.
                batch = filter_batch(batch, where)
            if columns is not None and needed != columns:
                batch = batch.select(columns)
            if batch.num_rows:
                yield batch

    # -- writing ---------------------------------------------------------------
    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        fs, _ = self._filesystems()
        if ctx.mode is WriteMode.REPLACE:
            target = self._meta(dataset, "versions", ctx.run_id)
        else:
            target = self.data_path(dataset)
        ctx.state["objectstore_data_path"] = target
        await asyncio.to_thread(fs.makedirs, target, exist_ok=True)
        await asyncio.to_thread(fs.makedirs, self._meta(dataset, "staging", ctx.run_id), exist_ok=True)

    async def write(
        self,
        dataset: str,
        partition_id: str,
        batches: AsyncIterable[pa.RecordBatch],
        ctx: WriteContext,
    ) -> WriteResult:
        started = time.perf_counter()
        fs, arrow_fs = self._filesystems()
        marker = self._meta(dataset, "commits", ctx.run_id, f"{partition_id}.json")
        if await asyncio.to_thread(fs.exists, marker):
            async for _ in batches:
                pass
            return WriteResult(partition_id, skipped=True)
        data_path = ctx.state.get("objectstore_data_path") or self.data_path(dataset)
        staging = self._meta(dataset, "staging", ctx.run_id, partition_id)
        await asyncio.to_thread(self._remove_partition_leftovers, data_path, staging, ctx.run_id, partition_id)
        await asyncio.to_thread(fs.makedirs, staging, exist_ok=True)

        writer = _RollingParquetWriter(
            arrow_fs,
            staging,
            f"{ctx.run_id}-{partition_id}",
            ctx.schema,
            compression=self.compression,
            row_group_rows=self.row_group_rows,
            file_max_rows=self.file_max_rows,
            file_max_bytes=self.file_max_bytes,
        )
        try:
            async for batch in batches:
                await asyncio.to_thread(writer.write, batch)
            staged_files = await asyncio.to_thread(writer.close)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(writer.discard))
            await asyncio.shield(asyncio.to_thread(_rm, fs, staging))
            raise
        final_files = await asyncio.to_thread(self._commit_partition, fs, staged_files, data_path, staging, marker)
        return WriteResult(
            partition_id,
            rows_written=writer.rows,
            bytes_written=writer.bytes_written,
            duration_seconds=time.perf_counter() - started,
            files=final_files,
        )

    def _remove_partition_leftovers(self, data_path: str, staging: str, run_id: str, partition_id: str) -> None:
        fs, _ = self._filesystems()
        _rm(fs, staging)
        prefix = f"{run_id}-{partition_id}-"
        if fs.exists(data_path):
            for path in fs.ls(data_path, detail=False):
                if posixpath.basename(path).startswith(prefix):
                    fs.rm(path)

    def _commit_partition(
        self,
        fs: fsspec.AbstractFileSystem,
        staged_files: list[tuple[str, int]],
        data_path: str,
        staging: str,
        marker: str,
    ) -> list[str]:
        final = []
        for path, _rows in staged_files:
            destination = posixpath.join(data_path, posixpath.basename(path))
            fs.mv(path, destination)
            final.append(destination)
        fs.makedirs(posixpath.dirname(marker), exist_ok=True)
        record = {"files": [posixpath.basename(p) for p in final], "rows": sum(r for _, r in staged_files)}
        _atomic_write(fs, marker, json.dumps(record).encode())
        _rm(fs, staging)
        return final

    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        fs, _ = self._filesystems()
        await asyncio.to_thread(_rm, fs, self._meta(dataset, "staging", ctx.run_id))
        if ctx.mode is not WriteMode.REPLACE:
            return
        previous = await asyncio.to_thread(self.current_version, dataset)
        pointer = self._meta(dataset, "CURRENT")
        body = json.dumps({"version": ctx.run_id, "published_at": time.time()}).encode()
        await asyncio.to_thread(_atomic_write, fs, pointer, body)
        await asyncio.to_thread(self._prune_versions, dataset, ctx.run_id, previous)

    def _prune_versions(self, dataset: str, current: str, previous: str | None) -> None:
        fs, _ = self._filesystems()
        if previous is None:
            # First replace of a plain folder: the files at the top are now the old version.
            for path in self._top_level_data(dataset):
                fs.rm(path, recursive=True)
        versions_dir = self._meta(dataset, "versions")
        if not fs.exists(versions_dir):
            return
        entries = [p for p in fs.ls(versions_dir, detail=True) if posixpath.basename(p["name"]) != current]
        entries.sort(key=lambda e: e.get("mtime") or e.get("created") or 0, reverse=True)
        for entry in entries[self.keep_versions :]:
            fs.rm(entry["name"], recursive=True)
            _rm(fs, self._meta(dataset, "commits", posixpath.basename(entry["name"])))

    def _top_level_data(self, dataset: str) -> list[str]:
        fs, _ = self._filesystems()
        root = self.dataset_path(dataset)
        if not fs.exists(root):
            return []
        return [p for p in fs.ls(root, detail=False) if not posixpath.basename(p).startswith(("_", "."))]

    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        fs, _ = self._filesystems()

        def clean() -> None:
            _rm(fs, self._meta(dataset, "staging", ctx.run_id))
            if ctx.mode is WriteMode.REPLACE:
                _rm(fs, self._meta(dataset, "versions", ctx.run_id))
                _rm(fs, self._meta(dataset, "commits", ctx.run_id))
                return
            # Append: committed partitions stay; files moved in place by a partition
            # whose marker was never written are unfinished and go.
            data_path = ctx.state.get("objectstore_data_path") or self.data_path(dataset)
            commits = self._meta(dataset, "commits", ctx.run_id)
            kept: set[str] = set()
            if fs.exists(commits):
                for path in fs.ls(commits, detail=False):
                    with fs.open(path, "rb") as handle:
                        kept.update(json.loads(handle.read())["files"])
            if fs.exists(data_path):
                for path in fs.ls(data_path, detail=False):
                    name = posixpath.basename(path)
                    if name.startswith(f"{ctx.run_id}-") and name not in kept:
                        fs.rm(path)

        await asyncio.shield(asyncio.to_thread(clean))


class _RollingParquetWriter:
    """Writes batches to numbered Parquet files, starting a new one at a row or byte limit."""

    def __init__(
        self,
        arrow_fs: pafs.FileSystem,
        folder: str,
        stem: str,
        schema: pa.Schema,
        *,
        compression: str,
        row_group_rows: int,
        file_max_rows: int,
        file_max_bytes: int,
    ) -> None:
        self.arrow_fs = arrow_fs
        self.folder = folder
        self.stem = stem
        self.schema = schema
        self.compression = compression
        self.row_group_rows = row_group_rows
        self.file_max_rows = file_max_rows
        self.file_max_bytes = file_max_bytes
        self.rows = 0
        self.bytes_written = 0
        self.files: list[tuple[str, int]] = []
        self._stream = None
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._path = ""

    def _open(self) -> None:
        self._path = posixpath.join(self.folder, f"{self.stem}-{len(self.files):04d}.parquet")
        self._stream = self.arrow_fs.open_output_stream(self._path)
        self._writer = pq.ParquetWriter(self._stream, self.schema, compression=self.compression)
        self._file_rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        offset = 0
        while offset < batch.num_rows:
            if self._writer is None:
                self._open()
            room = self.file_max_rows - self._file_rows
            piece = batch.slice(offset, room) if batch.num_rows - offset > room else batch.slice(offset)
            self._writer.write_batch(piece, row_group_size=self.row_group_rows)
            self._file_rows += piece.num_rows
            self.rows += piece.num_rows
            offset += piece.num_rows
            if self._file_rows >= self.file_max_rows or self._stream.tell() >= self.file_max_bytes:
                self._finish_file()

    def _finish_file(self) -> None:
        assert self._writer is not None and self._stream is not None
        self._writer.close()
        size = self._stream.tell()
        self._stream.close()
        self.bytes_written += size
        self.files.append((self._path, self._file_rows))
        self._writer = self._stream = None

    def close(self) -> list[tuple[str, int]]:
        """Finish the open file; return (path, rows) of every file written."""
        if self._writer is not None:
            self._finish_file()
        if not self.files:
            # An empty partition still writes one file, so the schema is kept.
            self._open()
            self._finish_file()
        return self.files

    def discard(self) -> None:
        """Close without keeping anything (the caller removes the folder)."""
        try:
            if self._writer is not None:
                self._writer.close()
            if self._stream is not None:
                self._stream.close()
        except Exception:
            pass
        self._writer = self._stream = None


def _rm(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> None:
    """Write ``body`` to a temporary name and rename it over ``path``.

    On a local folder the rename is atomic (os.replace), so readers see the
    old file or the new one.
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(temporary, "wb") as handle:
        handle.write(body)
    fs.mv(temporary, path)


_PUSHABLE = {"eq", "gt", "gte", "lt", "lte", "in", "between"}


def _to_arrow_prefilter(where: Filter, schema: pa.Schema) -> pads.Expression | None:
    """A pyarrow dataset expression that keeps a superset of the rows ``where`` keeps.

    Only operators whose null semantics agree with Ferry's (a null never
    matches) are pushed; anything else returns None for that branch, and the
    exact evaluator runs on the result anyway.
    """
    if isinstance(where, Comparison):
        if where.op not in _PUSHABLE or schema.get_field_index(where.column) < 0:
            return None
        field = pads.field(where.column)
        column_type = schema.field(where.column).type
        try:
            if where.op == "in":
                return field.isin(pa.array(where.value).cast(column_type))
            if where.op == "between":
                low, high = (pa.scalar(v).cast(column_type) for v in where.value)
                return (field >= low) & (field <= high)
            value = pa.scalar(where.value).cast(column_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
            return None
        return {
            "eq": field == value,
            "gt": field > value,
            "gte": field >= value,
            "lt": field < value,
            "lte": field <= value,
        }[where.op]
    if isinstance(where, And):
        parts = [p for p in (_to_arrow_prefilter(i, schema) for i in where.items) if p is not None]
        if not parts:
            return None
        expression = parts[0]
        for part in parts[1:]:
            expression = expression & part
        return expression
    if isinstance(where, Or):
        parts = [_to_arrow_prefilter(i, schema) for i in where.items]
        if any(p is None for p in parts) or not parts:
            return None
        expression = parts[0]
        for part in parts[1:]:
            expression = expression | part
        return expression
    return None
