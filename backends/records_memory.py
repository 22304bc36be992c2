"""The memory record store: records in a dict, queries by the reference evaluator.

* Thread safe: every read and write of the table holds one lock, and a stored
  row is never changed in place (an update replaces it), so a reader's
  snapshot stays consistent while others write.
* Pushes nothing down (there is nothing below it): filters are compiled once
  per query into a Python predicate (:func:`records_reference.compile_filter`)
  and evaluated while the records stream; a sort with a limit keeps only
  ``offset + limit`` records in a heap.
* ``AsyncDatabase.create("memory", {})`` makes a private store;
  ``{"name": "shared"}`` names a process-wide one that every store opened
  with the same name sees (until it is cleared).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, AsyncIterator, ClassVar, Iterable, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigurationError
from .records import AsyncDatabase, coerce_ids
from .records_model import BatchResult, Record, RecordError, batch_item, is_flat, normalize_id, private_copy
from .records_query import Query
from .records_reference import PageWindow, compile_filter, order_items, project

__all__ = ["MemoryRecordStore", "MemoryRecordSettings"]


class MemoryRecordSettings(BaseModel):
    """Settings of a memory record store."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description="Share the records with every memory store of this name in the process (None: private)."
    )


class _Table:
    """Rows ``id -> (fields, metadata, flat)`` in insertion order, under a lock.

    ``flat`` is true when every field value is an immutable scalar: reads then
    copy the fields with a plain ``dict()`` instead of a deep copy.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.rows: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {}


#: Rows looked up per lock acquisition while scanning.
_SCAN_CHUNK = 4096

_SHARED: dict[str, _Table] = {}
_SHARED_LOCK = threading.Lock()


class MemoryRecordStore(AsyncDatabase):
    """Records kept in this process (see the module docstring)."""

    backend: ClassVar[str] = "memory"

    def __init__(self, settings: MemoryRecordSettings | None = None) -> None:
        self.settings = settings or MemoryRecordSettings()
        if self.settings.name is None:
            self._table = _Table()
        else:
            with _SHARED_LOCK:
                self._table = _SHARED.setdefault(self.settings.name, _Table())
        self._closed = False

    @classmethod
    async def open(cls, config: Any) -> "MemoryRecordStore":
        """From ``{}`` / ``{"name": ...}``, a MemoryRecordSettings, or a memory Backend block (private store)."""
        if isinstance(config, MemoryRecordSettings):
            return cls(config)
        if getattr(config, "_block_type_slug", None) == "ferry-memory":
            # A saved memory block carries no record settings: a private store.
            return cls(MemoryRecordSettings())
        if isinstance(config, BaseModel):
            config = config.model_dump(exclude_none=True)
        if not isinstance(config, Mapping):
            raise ConfigurationError(
                f"memory store settings are a mapping such as {{}} or {{'name': 'shared'}}, "
                f"got {type(config).__name__}",
                path="config",
            )
        try:
            return cls(MemoryRecordSettings.model_validate(dict(config)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"invalid memory store settings: {problems} (keys: name)", path="config") from None

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("this record store is closed; open a new one with AsyncDatabase.create")

    # -- writes ------------------------------------------------------------------------

    async def create_batch(self, records: Iterable[Record]) -> BatchResult:
        self._check_open()
        prepared = _prepare(records)
        ids: list[str | None] = []
        errors: list[RecordError] = []
        with self._table.lock:
            rows = self._table.rows
            for index, item in enumerate(prepared):
                if isinstance(item, RecordError):
                    errors.append(item)
                    ids.append(None)
                    continue
                record_id, row = item
                if record_id is None:
                    record_id = uuid.uuid4().hex
                elif record_id in rows:
                    errors.append(RecordError(index, f"a record with id {record_id!r} already exists", record_id))
                    ids.append(None)
                    continue
                rows[record_id] = row
                ids.append(record_id)
        return BatchResult(ids, errors)

    async def update_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return self._replace(items, insert=False)

    async def upsert_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return self._replace(items, insert=True)

    def _replace(self, items: Iterable[Record | tuple[str | int, Record]], *, insert: bool) -> BatchResult:
        self._check_open()
        prepared = _prepare(items, pairs=True)
        ids: list[str | None] = []
        errors: list[RecordError] = []
        with self._table.lock:
            rows = self._table.rows
            for index, item in enumerate(prepared):
                if isinstance(item, RecordError):
                    errors.append(item)
                    ids.append(None)
                    continue
                record_id, row = item
                if record_id is None:
                    if not insert:
                        errors.append(RecordError(index, "an update needs the record's id: pass (id, record)"))
                        ids.append(None)
                        continue
                    record_id = uuid.uuid4().hex
                elif not insert and record_id not in rows:
                    errors.append(RecordError(index, f"no record with id {record_id!r} to update", record_id))
                    ids.append(None)
                    continue
                rows[record_id] = row
                ids.append(record_id)
        return BatchResult(ids, errors)

    async def delete_batch(self, ids: Iterable[str | int]) -> list[bool]:
        self._check_open()
        keys = coerce_ids(ids)
        with self._table.lock:
            rows = self._table.rows
            return [rows.pop(key, None) is not None for key in keys]

    async def clear(self) -> None:
        self._check_open()
        with self._table.lock:
            self._table.rows.clear()

    async def close(self) -> None:
        # A named table stays for other stores of that name; a private one goes with its store.
        if not self._closed and self.settings.name is None:
            self._table = _Table()
        self._closed = True

    # -- reads -------------------------------------------------------------------------

    async def read_batch(self, ids: Iterable[str | int]) -> list[Record | None]:
        self._check_open()
        keys = coerce_ids(ids)
        with self._table.lock:
            rows = self._table.rows
            found = [rows.get(key) for key in keys]
        return [None if row is None else _record(key, row, None) for key, row in zip(keys, found)]

    async def exists(self, id: str | int) -> bool:
        self._check_open()
        key = normalize_id(id)
        with self._table.lock:
            return key in self._table.rows

    async def count(self, query: Query | None = None) -> int:
        self._check_open()
        query = query or Query()
        if query.filter_spec is None:
            with self._table.lock:
                total = len(self._table.rows)
        else:
            predicate = compile_filter(query.filter_spec)
            total = sum(1 for _, row in self._scan() if predicate(row[0]))
        total = max(0, total - query.offset_value)
        return total if query.limit_value is None else min(total, query.limit_value)

    def _scan(self) -> Iterator[tuple[str, tuple[dict[str, Any], dict[str, Any], bool]]]:
        """Rows in insertion order, looked up in chunks under the lock.

        Only the key list is copied up front (copying 100k row tuples costs a
        garbage-collection pass); a row deleted meanwhile is skipped, a row
        replaced meanwhile is seen in its new state (rows never change in place).
        """
        with self._table.lock:
            keys = list(self._table.rows)
        rows = self._table.rows
        for start in range(0, len(keys), _SCAN_CHUNK):
            chunk = keys[start : start + _SCAN_CHUNK]
            with self._table.lock:
                found = [(key, rows.get(key)) for key in chunk]
            for key, row in found:
                if row is not None:
                    yield key, row

    async def _read_batches(self, query: Query, batch_size: int) -> AsyncIterator[list[Record]]:
        self._check_open()
        predicate = compile_filter(query.filter_spec)
        select = query.select_fields
        offset, limit = query.offset_value, query.limit_value
        if query.sort_keys:
            # Sorting needs every match; only references are kept, records are built per batch.
            matching = [(key, row) for key, row in self._scan() if predicate(row[0])]
            rows = dict(matching)
            ordered = order_items(
                [(key, row[0]) for key, row in matching], query.sort_keys, offset=offset, limit=limit
            )
            del matching
            for start in range(0, len(ordered), batch_size):
                chunk = ordered[start : start + batch_size]
                yield [_record(key, rows[key], select) for key, _fields in chunk]
                await asyncio.sleep(0)
            return
        window = PageWindow(offset, limit, batch_size)
        for scanned, (key, row) in enumerate(self._scan(), 1):
            if window.full:
                break
            if predicate(row[0]) and not window.skips():
                batch = window.add(_record(key, row, select))
                if batch:
                    yield batch
            if scanned % 10_000 == 0:
                await asyncio.sleep(0)  # a long scan must not starve the loop
        batch = window.rest()
        if batch:
            yield batch


def _record(key: str, row: tuple[dict[str, Any], dict[str, Any], bool], select: Any) -> Record:
    fields, metadata, flat = row
    record = Record.__new__(Record)
    record.id = key
    if select is not None:
        fields = project(fields, select)
    record.fields = dict(fields) if flat else private_copy(fields)
    record.metadata = private_copy(metadata) if metadata else {}
    return record


def _prepare(items: Iterable[Any], *, pairs: bool = False) -> list[Any]:
    """``(id or None, (private fields, private metadata, flat))`` per item, or a RecordError for a bad one.

    Runs outside the lock: copying is the expensive part of a write.
    """
    prepared: list[Any] = []
    for index, item in enumerate(items):
        try:
            record_id, record = batch_item(item, pairs=pairs)
            flat = is_flat(record.fields)
            fields = dict(record.fields) if flat else private_copy(record.fields)
            for name in fields:
                if type(name) is not str:
                    raise ConfigurationError(f"field names are strings, got {name!r}")
            metadata = private_copy(record.metadata) if record.metadata else {}
            prepared.append((record_id, (fields, metadata, flat)))
        except ConfigurationError as exc:
            prepared.append(RecordError(index, exc.message, None))
        except Exception as exc:  # a value that cannot be copied, for example
            prepared.append(RecordError(index, f"{type(exc).__name__}: {exc}", None))
    return prepared
