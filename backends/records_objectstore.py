"""The object-store record store: records as Parquet files in a local folder or on S3.

* Same code for both (``AsyncDatabase.create("s3", {...})`` or ``"local"``):
  the configuration is an :class:`~ferry.backends.objectstore.ObjectStoreBackend`
  (a dict of its fields, a saved block, or a settings file's ``databases.s3``
  section) plus ``dataset``, the folder holding the records, and the other
  record settings (:mod:`ferry.backends.records_objectstore_settings`). Filesystems come
  from the migration backend's pool (one s3fs / local pair per configuration
  and process), so a store and a migration with the same settings share them.
* Layout (:mod:`ferry.backends.records_objectstore_layout`): every batch
  written -- a create, update, upsert or delete of any number of records --
  is **one new immutable Parquet file** named by its stamp (time and writer
  id); updates are new versions and deletes tombstones. Nothing is ever
  rewritten in place, so writers need no locks: a reader takes, per id, the
  version with the largest stamp. ``compact()`` merges the files into few.
* Rows (:mod:`ferry.backends.records_objectstore_codec`): the record as exact
  JSON text plus typed copies of the top-level fields that filters are pushed
  down to (:mod:`ferry.backends.records_objectstore_pushdown`); the reference
  evaluator checks every row that comes back, so results are exact.
* No index on the store: each operation lists the folder and reads the key
  columns (id, stamp, tombstone) of files it has not seen yet -- files are
  immutable, so what was read once is kept -- and knows from them which file
  holds the newest version of every id. ``read_batch`` then reads only the
  files holding the wanted ids; queries scan the files holding live versions
  (with the filter pushed down) and keep the newest versions. Small files
  are fetched whole and kept in a bounded cache (``file_cache_bytes``).
* Concurrency: last writer wins per id, by (stamp time, writer id). A
  create is refused when the id is live in what the writer sees (its
  listing, plus its own writes in flight); two processes creating the same
  id at the same moment both succeed and the larger stamp wins. Within one
  store object, operations are ordered by their stamps and checked against
  each other's writes in flight. docs/object-stores.md states the guarantee.
"""

from __future__ import annotations

import functools
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, ClassVar, Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads

from .errors import ConfigurationError, FerryError, TransientBackendError
from .objectstore import ObjectStoreBackend
from .objectstore_fs import translate_error
from .records import AsyncDatabase, coerce_ids
from .records_model import BatchResult, Record, RecordError, normalize_id
from .records_objectstore_codec import (
    DELETED,
    FIELDS,
    ID,
    METADATA,
    STAMP,
    UNSHREDDED,
    build_table,
    prepare_record,
    record_from_row,
    typed_columns,
)
from .records_objectstore_layout import (
    FileKeys,
    FileReader,
    RecordIndex,
    StampClock,
    encode_record_file,
    list_record_files,
    merge_versions,
    read_many,
    stamp_before,
    vanished,
    write_record_file,
)
from .records_objectstore_pushdown import prefilter
from .records_objectstore_settings import ObjectStoreRecordSettings, split_config
from .records_query import Query
from .records_reference import PageWindow, compile_filter, ordered_batches, project
from .stream import thread_call

__all__ = ["ObjectStoreRecordStore", "ObjectStoreRecordSettings", "CompactionResult"]

#: Times an operation starts again when a file it listed was removed meanwhile (by a compaction).
ATTEMPTS = 5
#: Rows per Arrow batch of a scan.
SCAN_ROWS = 8192
#: Files fetched at once ahead of a scan.
SCAN_PREFETCH_FILES = 16


@dataclass
class CompactionResult:
    """What ``compact()`` did."""

    files_read: int = 0
    files_written: int = 0
    rows_read: int = 0
    #: Newest versions written (live records plus the tombstones kept).
    rows_written: int = 0
    tombstones_kept: int = 0


class ObjectStoreRecordStore(AsyncDatabase):
    """Records as immutable Parquet files in a folder or on S3 (see the module docstring)."""

    backend: ClassVar[str] = "objectstore"

    def __init__(self, block: ObjectStoreBackend, settings: ObjectStoreRecordSettings) -> None:
        self.block = block
        self.settings = settings
        location = block.location_info()
        self.local = location.protocol == "file"
        #: Folder of the record files (``bucket/prefix/dataset`` on S3, an absolute path locally).
        self.folder = block.dataset_path(settings.dataset)
        self._clock = StampClock()
        # Guards the index and the writes in flight; held while listing, never while writing a file.
        self._lock = threading.Lock()
        self._index = RecordIndex()
        #: id -> (stamp, live afterwards) of this store's newest write in flight on that id.
        self._pending: dict[str, tuple[str, bool]] = {}
        self._pair: Any = None
        self._reader: FileReader | None = None
        #: time.monotonic() when the listing the index holds was started; None: list before the next use.
        self._listed_at: float | None = None

    @classmethod
    async def open(cls, config: Any) -> "ObjectStoreRecordStore":
        """Take the pooled filesystems (S3: fails fast when the bucket is missing or refused)."""
        block, settings = split_config(config)
        store = cls(block, settings)
        await block.open()
        store._pair = block._filesystems()
        store._reader = FileReader(store._pair.fs, store._pair.arrow_fs, settings.file_cache_bytes)
        return store

    async def close(self) -> None:
        """Give the filesystems back to the pool (the last user closes them)."""
        if self._pair is not None:
            self._pair = self._reader = None
            await self.block.close()

    @property
    def writer_id(self) -> str:
        """This store's writer id (the second part of the stamps it writes)."""
        return self._clock.writer

    def display(self, path: str | None = None) -> str:
        """A path as users write it (``s3://...`` or a local path); the folder by default."""
        return self.block.location_info().display(path or self.folder)

    async def _call(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work in a worker thread; store errors become Ferry errors naming ``what``."""
        if self._pair is None:
            raise ConfigurationError("this record store is closed; open a new one with AsyncDatabase.create")
        try:
            return await thread_call(functools.partial(function, *args))
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(
                exc, f"{what} in {self.display()}", self.block.location_info(), self.block.endpoint_url
            ) from None

    # -- the index ---------------------------------------------------------------------

    def _refresh(self, *, fresh: bool = False) -> None:
        """Bring the index up to the folder's listing (caller holds the lock).

        A listing younger than ``listing_max_age_seconds`` is reused unless
        ``fresh`` is asked for (compaction) or a listed file vanished since.
        """
        max_age = self.settings.listing_max_age_seconds
        if not fresh and max_age and self._listed_at is not None and time.monotonic() - self._listed_at < max_age:
            return
        reader = self._reader
        for _ in range(ATTEMPTS):
            started = time.monotonic()
            listed = list_record_files(self._pair.fs, self.folder)
            reader.sizes.update(listed)
            new = [path for path in listed if path not in self._index.files]
            try:
                keys = read_many(reader.read_keys, new)
            except Exception as exc:
                if vanished(exc):
                    continue  # compacted meanwhile: list again
                raise
            reader.forget([path for path in self._index.files if path not in listed])
            self._index.keep_only(listed)
            for path in new:
                self._index.add(path, keys[path])
            self._listed_at = started
            return
        raise _busy("listing")

    def _listing_outdated(self) -> None:
        """The next operation lists again (a listed file is gone, or the folder was cleared)."""
        self._listed_at = None

    def _live_after(self, record_id: str) -> bool:
        """Whether ``record_id`` is live once this store's writes in flight land (caller holds the lock)."""
        pending = self._pending.get(record_id)
        return pending[1] if pending is not None else self._index.is_live(record_id)

    def _write(self, rows: list[tuple[str, Any, Any, Any]], stamp: str) -> None:
        """Write one file of rows and take it into the index; then the writes are no longer in flight."""
        try:
            if rows:
                path = posixpath.join(self.folder, f"{stamp}.parquet")
                body = encode_record_file(build_table(rows, stamp, self.settings.max_typed_fields), self.block.compression)
                write_record_file(self._pair.fs, self.local, path, body)
                self._reader.remember(path, body)
                keys = FileKeys([row[0] for row in rows], [stamp] * len(rows), [row[1] is None for row in rows])
                with self._lock:
                    self._index.add(path, keys)
        finally:
            with self._lock:
                for row in rows:
                    if self._pending.get(row[0], ("",))[0] == stamp:
                        del self._pending[row[0]]

    # -- writes ------------------------------------------------------------------------

    async def create_batch(self, records: Iterable[Record]) -> BatchResult:
        items = records if isinstance(records, list) else list(records)
        return await self._call("writing records", self._create, items)

    def _create(self, items: list[Any]) -> BatchResult:
        prepared = [prepare_record(index, item, pairs=False) for index, item in enumerate(items)]
        ids: list[str | None] = [None] * len(items)
        errors = [item for item in prepared if isinstance(item, RecordError)]
        rows = []
        with self._lock:
            self._refresh()
            stamp = self._clock.next()
            seen: set[str] = set()
            for item in prepared:
                if isinstance(item, RecordError):
                    continue
                index, record_id, fields, text, metadata = item
                if record_id is None:
                    record_id = uuid.uuid4().hex
                elif record_id in seen:
                    errors.append(
                        RecordError(index, f"a record with id {record_id!r} already exists (earlier in this batch)", record_id)
                    )
                    continue
                elif self._live_after(record_id):
                    errors.append(RecordError(index, f"a record with id {record_id!r} already exists", record_id))
                    continue
                seen.add(record_id)
                self._pending[record_id] = (stamp, True)
                rows.append((record_id, fields, text, metadata))
                ids[index] = record_id
        self._write(rows, stamp)
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def update_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        items = items if isinstance(items, list) else list(items)
        return await self._call("updating records", self._replace, items, False)

    async def upsert_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        items = items if isinstance(items, list) else list(items)
        return await self._call("upserting records", self._replace, items, True)

    def _replace(self, items: list[Any], insert: bool) -> BatchResult:
        prepared = [prepare_record(index, item, pairs=True) for index, item in enumerate(items)]
        ids: list[str | None] = [None] * len(items)
        errors = [item for item in prepared if isinstance(item, RecordError)]
        latest: dict[str, tuple[str, Any, Any, Any]] = {}  # the last item for an id wins
        with self._lock:
            if not insert:
                self._refresh()
            stamp = self._clock.next()
            for item in prepared:
                if isinstance(item, RecordError):
                    continue
                index, record_id, fields, text, metadata = item
                if record_id is None:
                    if not insert:
                        errors.append(RecordError(index, "an update needs the record's id: pass (id, record)"))
                        continue
                    record_id = uuid.uuid4().hex
                elif not insert and record_id not in latest and not self._live_after(record_id):
                    errors.append(RecordError(index, f"no record with id {record_id!r} to update", record_id))
                    continue
                latest.pop(record_id, None)
                latest[record_id] = (record_id, fields, text, metadata)
                self._pending[record_id] = (stamp, True)
                ids[index] = record_id
        self._write(list(latest.values()), stamp)
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def delete_batch(self, ids: Iterable[str | int]) -> list[bool]:
        keys = coerce_ids(ids)
        if not keys:
            return []
        return await self._call("deleting records", self._delete, keys)

    def _delete(self, keys: list[str]) -> list[bool]:
        result = []
        rows = []
        with self._lock:
            self._refresh()
            stamp = self._clock.next()
            for key in keys:  # a repeated id is deleted once: True the first time only
                if self._live_after(key):
                    self._pending[key] = (stamp, False)
                    rows.append((key, None, None, None))
                    result.append(True)
                else:
                    result.append(False)
        self._write(rows, stamp)
        return result

    async def clear(self) -> None:
        """Remove every record file (and the folder); writes landing afterwards stay."""
        await self._call("clearing records", self._clear)

    def _clear(self) -> None:
        fs = self._pair.fs
        with self._lock:
            try:
                if fs.exists(self.folder):
                    fs.rm(self.folder, recursive=True)
            except FileNotFoundError:
                pass
            self._reader.forget(list(self._index.files))
            self._index = RecordIndex()
            self._listing_outdated()

    # -- reads -------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, str]:
        with self._lock:
            self._refresh()
            return self._index.live()

    async def read_batch(self, ids: Iterable[str | int]) -> list[Record | None]:
        keys = coerce_ids(ids)
        if not keys:
            return []
        return await self._call("reading records", self._read_ids, keys)

    def _read_ids(self, keys: list[str]) -> list[Record | None]:
        for _ in range(ATTEMPTS):
            live = self._snapshot()
            wanted = sorted({key for key in keys if key in live})
            if not wanted:
                return [None] * len(keys)
            files = sorted({live[key] for key in wanted})
            found: dict[str, tuple[str, str | None]] = {}
            try:
                for path, batch in self._scan(files, set(), pads.field(ID).isin(wanted), SCAN_ROWS):
                    for record_id, fields, metadata in zip(*(column.to_pylist() for column in batch.columns)):
                        if live.get(record_id) == path:
                            found[record_id] = (fields, metadata)
            except Exception as exc:
                if vanished(exc):
                    self._listing_outdated()
                    continue
                raise
            # One Record per position: a repeated id gives independent copies.
            return [None if (row := found.get(key)) is None else record_from_row(key, row[0], row[1]) for key in keys]
        raise _busy("reading records")

    async def exists(self, id: str | int) -> bool:
        key = normalize_id(id)
        return await self._call("reading records", lambda: key in self._snapshot())

    async def count(self, query: Query | None = None) -> int:
        query = query or Query()
        if query.filter_spec is None:
            total = await self._call("counting records", lambda: len(self._snapshot()))
            total = max(0, total - query.offset_value)
            return total if query.limit_value is None else min(total, query.limit_value)
        total = 0
        async for batch in self._read_batches(query, 10_000):
            total += len(batch)
        return total

    async def data_files(self) -> list[str]:
        """The record files a read sees now, in name (stamp) order, as users write paths."""
        files = await self._call("listing records", lambda: list_record_files(self._pair.fs, self.folder))
        return [self.display(path) for path in files]

    def _scan(
        self, files: list[str], fields: set[str], expression: pads.Expression, batch_rows: int
    ) -> Iterator[tuple[str, pa.RecordBatch]]:
        """``(file, batch)`` of ``id, fields, metadata`` for the rows of ``files`` the expression keeps, in file order.

        Reads use one schema: the fixed columns and the typed columns of
        ``fields`` (a file without one of them reads it as null). Small files
        are fetched a group at a time, in parallel, before they are scanned.
        """
        columns = [
            pa.field(ID, pa.string()),
            pa.field(STAMP, pa.string()),
            pa.field(DELETED, pa.bool_()),
            pa.field(FIELDS, pa.string()),
            pa.field(METADATA, pa.string()),
            pa.field(UNSHREDDED, pa.bool_()),
        ]
        for name in sorted(fields):
            columns.extend(pa.field(column, kind) for column, kind in typed_columns(name).items())
        schema = pa.schema(columns)
        parquet = pads.ParquetFileFormat()
        reader = self._reader
        for start in range(0, len(files), SCAN_PREFETCH_FILES):
            group = files[start : start + SCAN_PREFETCH_FILES]
            fetched = reader.fetch(group)
            for path in group:
                source, filesystem = reader.source(path, fetched)
                fragment = parquet.make_fragment(source, filesystem=filesystem)
                for batch in fragment.to_batches(
                    schema=schema, columns=[ID, FIELDS, METADATA], filter=expression, batch_size=batch_rows
                ):
                    if batch.num_rows:
                        yield path, batch

    def _matches(self, query: Query, batch_rows: int) -> Iterator[list[Record]]:
        """The newest versions matching the filter, in file order, as lists of Records (runs in a thread).

        The listing is fixed when the scan starts. If a compaction removes a
        file under it, the scan lists again and goes on with the records it
        has not returned yet.
        """
        predicate = compile_filter(query.filter_spec)
        expression = prefilter(query.filter_spec)
        live_rows = pads.field(DELETED) == False  # noqa: E712 (an Arrow expression)
        expression = live_rows if expression is None else live_rows & expression
        fields = query.filter_spec.columns() if query.filter_spec is not None else set()
        returned: set[str] = set()
        for _ in range(ATTEMPTS):
            live = self._snapshot()
            files = sorted(set(live.values()))
            if not files:
                return
            try:
                for path, batch in self._scan(files, fields, expression, batch_rows):
                    found = []
                    for record_id, text, metadata in zip(*(column.to_pylist() for column in batch.columns)):
                        if live.get(record_id) != path or record_id in returned:
                            continue  # an older version, or a duplicate left by a compaction in progress
                        record = record_from_row(record_id, text, metadata)
                        if predicate(record.fields):
                            returned.add(record_id)
                            found.append(record)
                    if found:
                        yield found
                return
            except Exception as exc:
                if vanished(exc):
                    self._listing_outdated()
                    continue
                raise
        raise _busy("reading records")

    async def _read_batches(self, query: Query, batch_size: int) -> AsyncIterator[list[Record]]:
        compile_filter(query.filter_spec)  # refuses a bad regex before anything is read
        select = query.select_fields
        offset, limit = query.offset_value, query.limit_value
        if limit == 0:
            return
        source = self._matches(query, max(batch_size, 1024) if query.sort_keys else SCAN_ROWS)
        if query.sort_keys:
            matches: list[Record] = await self._call("searching records", _drain, source)
            for batch in ordered_batches({record.id: record for record in matches}, query, batch_size):
                yield batch
            return
        window = PageWindow(offset, limit, batch_size)
        done = object()
        try:
            while not window.full:
                found = await self._call("searching records", next, source, done)
                if found is done:
                    break
                for record in found:
                    if window.skips():
                        continue
                    if select is not None:
                        record.fields = project(record.fields, select)
                    batch = window.add(record)
                    if batch:
                        yield batch
                    if window.full:
                        break
            batch = window.rest()
            if batch:
                yield batch
        finally:
            await thread_call(source.close)

    # -- compaction --------------------------------------------------------------------

    async def compact(self) -> CompactionResult:
        """Merge every record file into few (``compact_file_rows`` rows each), keeping the newest versions.

        Reads every file into memory, writes the merged files, and only then
        removes the files it read: a reader or writer meanwhile sees each
        record once (readers drop the duplicates of a compaction in
        progress), and files written meanwhile are left alone. Tombstones
        younger than ``tombstone_retention_seconds`` are kept.
        """
        return await self._call("compacting records", self._compact)

    def _compact(self) -> CompactionResult:
        for _ in range(ATTEMPTS):
            with self._lock:
                self._refresh(fresh=True)
                if not self._index.needs_compaction():
                    return CompactionResult(files_read=len(self._index.files))
                files = sorted(self._index.files)
            try:
                tables = read_many(self._reader.read_table, files)
            except Exception as exc:
                if vanished(exc):
                    continue  # another compaction removed some: start again
                raise
            merged = merge_versions([tables[path] for path in files], stamp_before(self.settings.tombstone_retention_seconds))
            result = CompactionResult(files_read=len(files), rows_read=sum(t.num_rows for t in tables.values()))
            del tables
            stamp = self._clock.next()
            written: dict[str, FileKeys] = {}
            step = self.settings.compact_file_rows
            for part, start in enumerate(range(0, merged.num_rows, step)):
                chunk = merged.slice(start, step)
                path = posixpath.join(self.folder, f"{stamp}-{part:04d}.parquet")
                body = encode_record_file(chunk, self.block.compression)
                write_record_file(self._pair.fs, self.local, path, body)
                self._reader.remember(path, body)
                written[path] = FileKeys(chunk[ID].to_pylist(), chunk[STAMP].to_pylist(), chunk[DELETED].to_pylist())
            # Only now, with the merged files in place, do the files read go.
            for path in files:
                try:
                    self._pair.fs.rm_file(path)
                except FileNotFoundError:
                    pass
            self._reader.forget(files)
            with self._lock:
                self._index.keep_only(set(self._index.files) - set(files))
                for path, keys in written.items():
                    self._index.add(path, keys)
            result.files_written = len(written)
            result.rows_written = merged.num_rows
            result.tombstones_kept = sum(merged[DELETED].to_pylist())
            return result
        raise _busy("compacting")


def _drain(source: Iterator[list[Record]]) -> list[Record]:
    found: list[Record] = []
    for batch in source:
        found.extend(batch)
    return found


def _busy(what: str) -> TransientBackendError:
    return TransientBackendError(
        f"{what}: record files kept disappearing while being read ({ATTEMPTS} attempts; compactions or clear "
        "running at the same time?); try again"
    )
