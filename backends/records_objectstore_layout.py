"""Files of the object-store record store: names, stamps, listing, the id index, writing and merging.

Layout of a store (``<root>/<dataset>/``, one flat folder)::

    <stamp>.parquet          one written batch (creates, updates, upserts or deletes)
    <stamp>-<part>.parquet   a file written by compaction (``part``: 0000, 0001, ...)

``stamp`` is ``<20-digit nanoseconds since the epoch>-<writer id>``: each
opened store is a writer with a random 16-hex-digit id and a clock that never
repeats a value, so names never collide and ``(time, writer)`` orders every
version of an id. Files are immutable: written once under a new name (a
rename of a hidden temporary file on a local folder, one upload on S3) and only
ever removed by compaction or ``clear``. Anything else in the folder (names
starting with ``.`` or ``_``, other files) is ignored.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .records_objectstore_codec import DELETED, FILE_METADATA, ID, STAMP

__all__ = [
    "FileKeys",
    "RecordIndex",
    "StampClock",
    "is_record_file",
    "FileReader",
    "list_record_files",
    "read_many",
    "encode_record_file",
    "write_record_file",
    "merge_versions",
    "vanished",
]

_NAME = re.compile(r"^\d{20}-[0-9a-f]{16}(?:-\d{4})?\.parquet$")
#: Files read at once (key columns, compaction).
READ_THREADS = 8


def is_record_file(name: str) -> bool:
    """Whether a file name is one of the store's record files."""
    return _NAME.match(name) is not None


class StampClock:
    """Stamps ``<nanoseconds>-<writer>`` of one writer, strictly increasing even when the wall clock is not."""

    def __init__(self) -> None:
        self.writer = uuid.uuid4().hex[:16]
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return f"{self._last:020d}-{self.writer}"


def stamp_before(seconds: float) -> str:
    """The smallest stamp of ``seconds`` ago: every stamp written later sorts after it."""
    return f"{max(0, time.time_ns() - int(seconds * 1e9)):020d}"


def vanished(exc: BaseException) -> bool:
    """Whether an error says a listed file is gone (compaction or clear removed it meanwhile)."""
    if isinstance(exc, FileNotFoundError):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and ("No such file" in text or "NoSuchKey" in text or "does not exist" in text)


def list_record_files(fs: Any, folder: str) -> dict[str, int]:
    """The record files in ``folder`` and their sizes, sorted by name (stamp order); {} when there is no folder."""
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    found = {
        entry["name"]: int(entry.get("size") or 0)
        for entry in entries
        if entry.get("type") != "directory" and is_record_file(posixpath.basename(entry["name"].rstrip("/")))
    }
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class FileKeys:
    """The key columns of one record file: per row its id, stamp and whether it is a tombstone."""

    ids: list[str]
    stamps: list[str]
    deleted: list[bool]


class FileReader:
    """Opens record files for reading; files are immutable, so what was read once can be kept.

    A file up to ``whole_file_bytes`` is fetched whole in one request (on S3
    one GET instead of a HEAD and ranged reads per column) and kept in a
    least-recently-used cache of at most ``cache_bytes``; the store also puts
    the files it writes there. Larger files are read through the Arrow
    filesystem, only the columns needed. Thread safe.
    """

    def __init__(self, fs: Any, arrow_fs: Any, cache_bytes: int, whole_file_bytes: int = 16 * 1024 * 1024) -> None:
        self.fs = fs
        self.arrow_fs = arrow_fs
        self.cache_bytes = cache_bytes
        self.whole_file_bytes = whole_file_bytes
        self.sizes: dict[str, int] = {}
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def remember(self, path: str, body: bytes) -> None:
        """Keep a file's bytes (a file this store wrote, or one it fetched)."""
        self.sizes[path] = len(body)
        if len(body) > self.cache_bytes:
            return
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return
            self._cache[path] = body
            self._cached_bytes += len(body)
            while self._cached_bytes > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= len(dropped)

    def forget(self, paths: Iterable[str]) -> None:
        """Drop removed files."""
        with self._lock:
            for path in paths:
                body = self._cache.pop(path, None)
                if body is not None:
                    self._cached_bytes -= len(body)
                self.sizes.pop(path, None)

    def _cached(self, path: str) -> bytes | None:
        with self._lock:
            body = self._cache.get(path)
            if body is not None:
                self._cache.move_to_end(path)
            return body

    def fetch(self, paths: list[str]) -> dict[str, bytes]:
        """The bytes of the small files among ``paths`` (cached, or fetched a few at once)."""
        found: dict[str, bytes] = {}
        missing = []
        for path in paths:
            if self.sizes.get(path, 0) > self.whole_file_bytes:
                continue
            body = self._cached(path)
            if body is None:
                missing.append(path)
            else:
                found[path] = body
        for path, body in read_many(self.fs.cat_file, missing).items():
            self.remember(path, body)
            found[path] = body
        return found

    def source(self, path: str, fetched: dict[str, bytes] | None = None) -> tuple[Any, Any]:
        """``(source, filesystem)`` to open ``path`` with (a buffer for a small file)."""
        body = (fetched or {}).get(path) or self._cached(path)
        if body is None and self.sizes.get(path, 0) <= self.whole_file_bytes:
            body = self.fetch([path]).get(path)
        if body is not None:
            return pa.BufferReader(body), None
        return path, self.arrow_fs

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        source, filesystem = self.source(path)
        return pq.read_table(source, columns=columns, filesystem=filesystem)

    def read_keys(self, path: str) -> FileKeys:
        """Only the key columns of a record file."""
        table = self.read_table(path, [ID, STAMP, DELETED])
        return FileKeys(table[ID].to_pylist(), table[STAMP].to_pylist(), table[DELETED].to_pylist())


def read_many(function: Any, paths: list[str]) -> dict[str, Any]:
    """``function(path)`` for every path, a few at once (object stores answer slowly but in parallel)."""
    if len(paths) <= 1:
        return {path: function(path) for path in paths}
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        return dict(zip(paths, pool.map(function, paths)))


class RecordIndex:
    """The newest version of every id in a set of record files (callers hold the store's lock).

    ``put``: id -> stamp of its newest put; ``dead``: id -> stamp of its
    newest tombstone; ``where``: id -> file holding that put. An id is live
    when its newest put is newer than its newest tombstone. The versions are
    merged by taking the largest stamp, which does not depend on the order
    files are seen in.
    """

    def __init__(self) -> None:
        self.files: dict[str, FileKeys] = {}
        self.put: dict[str, str] = {}
        self.where: dict[str, str] = {}
        self.dead: dict[str, str] = {}
        self._live: dict[str, str] | None = None

    def add(self, path: str, keys: FileKeys) -> None:
        """Take a file's versions into account (again: no effect)."""
        if path in self.files:
            return
        self.files[path] = keys
        put, where, dead = self.put, self.where, self.dead
        for record_id, stamp, deleted in zip(keys.ids, keys.stamps, keys.deleted):
            if deleted:
                if stamp > dead.get(record_id, ""):
                    dead[record_id] = stamp
            elif stamp > put.get(record_id, ""):
                put[record_id] = stamp
                where[record_id] = path
        self._live = None

    def keep_only(self, paths: Iterable[str]) -> None:
        """Forget every file not in ``paths`` (removed by compaction or clear) and rebuild from the rest."""
        kept = {path: self.files[path] for path in paths if path in self.files}
        if len(kept) == len(self.files):
            return
        self.files, self.put, self.where, self.dead = {}, {}, {}, {}
        for path in sorted(kept):
            self.add(path, kept[path])
        self._live = None

    def is_live(self, record_id: str) -> bool:
        stamp = self.put.get(record_id)
        return stamp is not None and stamp > self.dead.get(record_id, "")

    def live(self) -> dict[str, str]:
        """Live id -> the file holding its newest version (a snapshot; do not change it)."""
        if self._live is None:
            dead, where = self.dead, self.where
            if dead:
                self._live = {key: where[key] for key, stamp in self.put.items() if stamp > dead.get(key, "")}
            else:
                self._live = dict(where)
        return self._live

    def needs_compaction(self) -> bool:
        """Whether compaction would change anything: several files, a tombstone or a superseded version."""
        if len(self.files) > 1:
            return True
        return any(any(keys.deleted) or len(set(keys.ids)) != len(keys.ids) for keys in self.files.values())


def encode_record_file(table: pa.Table, compression: str) -> bytes:
    """The Parquet bytes of one record file."""
    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata(FILE_METADATA)
    pq.write_table(table, sink, compression=None if compression == "none" else compression)
    return sink.getvalue().to_pybytes()


def write_record_file(fs: Any, local: bool, path: str, body: bytes) -> None:
    """Write one immutable record file so that it appears whole or not at all.

    A local folder gets a hidden temporary file renamed into place (atomic);
    S3 gets one upload of the whole object (a PUT, multipart past s3fs's
    block size), visible only once complete. One batch is one file, encoded
    in memory first.
    """
    if not local:
        fs.pipe_file(path, body)
        return
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = posixpath.join(folder, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    with open(temporary, "wb") as handle:
        handle.write(body)
    os.replace(temporary, path)


def merge_versions(tables: list[pa.Table], drop_tombstones_before: str) -> pa.Table:
    """The newest version of every id in ``tables`` (concatenated in file order), in that order.

    Tombstones with a stamp before ``drop_tombstones_before`` are dropped
    (see the store's ``tombstone_retention_seconds``); newer ones are kept so
    that an older put still on its way cannot bring the record back.
    """
    table = pa.concat_tables(tables, promote_options="default")
    table = table.append_column("__position", pa.array(range(table.num_rows), pa.int64()))
    order = pc.sort_indices(table, sort_keys=[(ID, "ascending"), (STAMP, "descending")])
    ids = table[ID].take(order).combine_chunks()
    if len(ids) > 1:
        changed = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        first = pa.concat_arrays([pa.array([True]), changed])
    else:
        first = pa.array([True] * len(ids), pa.bool_())
    newest = table.take(order.filter(first))
    keep = pc.or_(pc.invert(newest[DELETED]), pc.greater(newest[STAMP], drop_tombstones_before))
    newest = newest.filter(keep)
    newest = newest.take(pc.sort_indices(newest["__position"]))
    return newest.drop_columns(["__position"])
