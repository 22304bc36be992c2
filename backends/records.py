"""The performance guide's record API: ``AsyncDatabase``, ``Record``, ``Query``, streams.

::

    from ferry.backends.records import AsyncDatabase, Query, Record, StreamConfig

    async with await AsyncDatabase.create("memory", {}) as db:
        ids = await db.create_batch([Record({"id": i, "data": f"test_{i}"}) for i in range(1000)])
        records = await db.read_batch(ids)
        page = await db.search(Query({"data": {"like": "test_1%"}}).sort("id").limit(100))
        result = await db.stream_write(generator(), config=StreamConfig(batch_size=500, parallel=True))

A store is a subclass of :class:`AsyncDatabase` registered under a backend
name (:func:`register_record_store`); it implements the batch primitives and
``_read_batches``, and inherits the single-record forms, ``search``, the
streams and the context manager from here. docs/records.md documents the API,
the query semantics (implemented by :mod:`ferry.backends.records_reference`)
and what each store pushes down.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, ClassVar, Iterable

from .errors import ConfigurationError, DataError
from .records_model import (
    DEFAULT_PARALLEL,
    BatchResult,
    Record,
    RecordError,
    StreamConfig,
    StreamResult,
    StreamWriteError,
    normalize_id,
)
from .records_query import Query, SortKey

__all__ = [
    "AsyncDatabase",
    "Record",
    "RecordError",
    "BatchResult",
    "Query",
    "SortKey",
    "StreamConfig",
    "StreamResult",
    "StreamWriteError",
    "DEFAULT_PARALLEL",
    "register_record_store",
    "record_store_names",
    "record_store_class",
]

#: Backend name -> store class, or "module:Class" imported on first use.
_STORES: dict[str, type["AsyncDatabase"] | str] = {
    "memory": "ferry.backends.records_memory:MemoryRecordStore",
    "postgres": "ferry.backends.records_postgres:PostgresRecordStore",
    "elasticsearch": "ferry.backends.records_elasticsearch:ElasticsearchRecordStore", "opensearch": "ferry.backends.records_elasticsearch:OpenSearchRecordStore",
    **dict.fromkeys(("objectstore", "local", "file", "s3"), "ferry.backends.records_objectstore:ObjectStoreRecordStore"),
}


def register_record_store(name: str, store: type["AsyncDatabase"] | str) -> None:
    """Register a record store class (or its ``"module:Class"`` path) under a backend name."""
    if not isinstance(name, str) or not name:
        raise ValueError("a record store needs a non-empty backend name")
    _STORES[name] = store


def record_store_names() -> list[str]:
    """Backend names ``AsyncDatabase.create`` accepts."""
    return sorted(_STORES)


def record_store_class(name: str) -> type["AsyncDatabase"]:
    """The store class registered as ``name`` (ConfigurationError listing the known names)."""
    try:
        target = _STORES[name]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"no record store {name!r}; record stores: {', '.join(record_store_names())}", path="backend"
        ) from None
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        target = getattr(importlib.import_module(module_name), class_name)
        _STORES[name] = target
    return target


class _ClassOrInstance:
    """The guide spells two things ``create``: the factory on the class, the insert on a store."""

    def __init__(self, on_class: Any, on_instance: Any) -> None:
        self.on_class = on_class.__func__ if isinstance(on_class, staticmethod) else on_class
        self.on_instance = on_instance
        self.__doc__ = (
            "``AsyncDatabase.create(backend, config)``: open a store (see open_backend); "
            "``db.create(record)``: insert one record and return its id (see create_one)."
        )

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.on_class
        return self.on_instance.__get__(instance, owner)


class AsyncDatabase(ABC):
    """One async interface to a record store (the guide's ``AsyncDatabase``).

    Build one with :meth:`create` or :meth:`from_config`, use it with
    ``async with`` (or call :meth:`close`). Ids are strings (see
    :meth:`Record.storage_id`); batch operations return their results in input
    order with per-record errors (:class:`BatchResult`).
    """

    #: Backend name this store is registered under.
    backend: ClassVar[str] = ""

    # -- construction ---------------------------------------------------------------

    @staticmethod
    async def open_backend(
        backend: str, config: Any = None, *, cache: Any = None, monitor: Any = None
    ) -> "AsyncDatabase":
        """Open a store of ``backend`` from ``config``.

        ``config`` is a dict of the store's settings, a saved Ferry block of the
        same backend (loaded with ``Block.load("name")``: an application
        shares its connection settings with its migrations), or a settings
        model from a template's ``databases.<name>`` section.

        Caches are off unless a dict config has a ``cache`` key or ``cache=``
        is given (``{"records": {"ttl_seconds": 60, "max_entries": 10000},
        "queries": {"max_entries": 256}}``, see :mod:`ferry.backends.records_cache`);
        ``monitor=`` (a :class:`~ferry.backends.monitor.PerformanceMonitor`)
        times every database call (see :meth:`instrument`).
        """
        from .records_cache import split_cache_settings

        store_class = record_store_class(backend)
        config, cache_settings = split_cache_settings(config if config is not None else {}, cache)
        store = await store_class.open(config)
        if cache_settings is not None and cache_settings.enabled:
            store.enable_cache(cache_settings)
        if monitor is not None:
            store.instrument(monitor)
        return store

    @staticmethod
    async def from_config(
        path: str | Path, name: str, *, backend: str | None = None, cache: Any = None, monitor: Any = None
    ) -> "AsyncDatabase":
        """Open the store described by the ``databases.<name>`` section of a settings file.

        The file has the shape of ``configs/high-performance.yaml`` and is
        validated by :class:`ferry.flows.settings.TemplateSettings` (bundled
        names such as ``high-performance`` work too). ``backend`` defaults to
        ``name``; ``cache`` and ``monitor`` as for :meth:`open_backend`.
        """
        from ferry.flows.settings import TemplateSettings
        from ferry.flows.spec import load_template, template_path

        if template_path(str(path), Path.cwd()) is None:
            raise ConfigurationError(
                f"settings file {str(path)!r} not found; give the path of a YAML file shaped like "
                "configs/high-performance.yaml, or a bundled name (high-performance, memory-optimized)",
                path="from_config",
            )
        raw = load_template(str(path), Path.cwd(), source=str(path))
        settings = TemplateSettings.model_validate(raw)
        section = getattr(settings.databases, name, None) if name in type(settings.databases).model_fields else None
        if section is None:
            known = ", ".join(type(settings.databases).model_fields)
            raise ConfigurationError(
                f"no databases.{name} section; this file's databases sections can be: {known}",
                source=str(path),
                path=f"databases.{name}",
            )
        return await AsyncDatabase.open_backend(backend or name, section, cache=cache, monitor=monitor)

    @classmethod
    @abstractmethod
    async def open(cls, config: Any) -> "AsyncDatabase":
        """Build and connect a store from a dict, a block or a settings model."""

    async def __aenter__(self) -> "AsyncDatabase":
        return self

    # -- caches and monitoring (the layers live in ferry.backends.records_cache) -----------------

    #: The record and query caches (None: off) and the monitor timing database calls (None: off).
    _cache: Any = None
    _monitor: Any = None
    _monitor_prefix: str = ""

    def enable_cache(self, settings: Any = None) -> Any:
        """Turn on the caches: a ``CacheSettings`` or a dict such as ``{"records": {...}, "queries": {...}}``.

        With no argument both caches get their defaults. Replaces any cache
        this store had (its entries and counters start empty). Returns the
        :class:`~ferry.backends.records_cache.DatabaseCache`.
        """
        from .records_cache import CacheSettings, DatabaseCache

        parsed = CacheSettings.parse(settings)
        self._cache = DatabaseCache(parsed) if parsed.enabled else None
        self._layer_operations()
        return self._cache

    def disable_cache(self) -> None:
        """Turn the caches off (calls go to the store again)."""
        self._cache = None
        self._layer_operations()

    @property
    def cache(self) -> Any:
        """This store's :class:`~ferry.backends.records_cache.DatabaseCache`, or None."""
        return self._cache

    def cache_stats(self) -> dict[str, Any]:
        """Hits, misses, entries, evictions, expirations and invalidations per cache that is on ({} when off)."""
        return self._cache.stats() if self._cache is not None else {}

    def instrument(self, monitor: Any, *, prefix: str | None = None) -> "AsyncDatabase":
        """Time every database call on ``monitor`` as ``<prefix>.<operation>`` (prefix: the backend name).

        ``instrument(None)`` stops. Cache hits do not reach the store and are
        not timed. Returns the store.
        """
        self._monitor = monitor
        self._monitor_prefix = self.backend if prefix is None else prefix
        self._layer_operations()
        return self

    @property
    def monitor(self) -> Any:
        """The :class:`~ferry.backends.monitor.PerformanceMonitor` timing this store, or None."""
        return self._monitor

    def _layer_operations(self) -> None:
        from .records_cache import install_layers

        install_layers(self, self._cache, self._monitor, self._monitor_prefix)

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- primitives every store implements ----------------------------------------------

    @abstractmethod
    async def create_batch(self, records: Iterable[Record]) -> BatchResult:
        """Insert records; ids in input order, None and an error where one failed (e.g. a duplicate id)."""

    @abstractmethod
    async def read_batch(self, ids: Iterable[str | int]) -> list[Record | None]:
        """The records of ``ids`` in input order (None where there is none)."""

    @abstractmethod
    async def update_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        """Replace the fields of existing records (a Record carrying its id, or ``(id, record)`` pairs)."""

    @abstractmethod
    async def delete_batch(self, ids: Iterable[str | int]) -> list[bool]:
        """Delete by id; True where a record was deleted, in input order."""

    @abstractmethod
    async def upsert_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        """Insert or replace; ids in input order."""

    @abstractmethod
    async def exists(self, id: str | int) -> bool:
        """Whether a record with this id exists."""

    @abstractmethod
    async def count(self, query: Query | None = None) -> int:
        """How many records match ``query`` (offset and limit applied)."""

    @abstractmethod
    def _read_batches(self, query: Query, batch_size: int) -> AsyncIterator[list[Record]]:
        """Matching records, in query order, as lists of at most ``batch_size``."""

    @abstractmethod
    async def clear(self) -> None:
        """Delete every record."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store cannot be used afterwards."""

    # -- single-record forms -------------------------------------------------------------

    async def create_one(self, record: Record) -> str:
        """Insert one record and return its id (DataError if it fails, e.g. the id exists)."""
        return (await self.create_batch([record])).raise_for_errors()[0]

    #: ``AsyncDatabase.create(backend, config)`` opens a store; ``db.create(record)`` inserts one.
    create = _ClassOrInstance(open_backend, create_one)

    async def read(self, id: str | int) -> Record | None:
        """The record with this id, or None."""
        return (await self.read_batch([id]))[0]

    async def update(self, id: str | int, record: Record) -> bool:
        """Replace the fields (and metadata) of record ``id``; False when there is no such record."""
        result = await self.update_batch([(id, record)])
        return result[0] is not None

    async def delete(self, id: str | int) -> bool:
        """Delete record ``id``; False when there was none."""
        return (await self.delete_batch([id]))[0]

    async def upsert(self, id_or_record: str | int | Record, record: Record | None = None) -> str:
        """``upsert(record)`` or ``upsert(id, record)``: insert or replace; returns the id."""
        item = id_or_record if record is None else (id_or_record, record)
        return (await self.upsert_batch([item])).raise_for_errors()[0]

    # -- reading -----------------------------------------------------------------------

    async def search(self, query: Query | None = None) -> list[Record]:
        """Every record matching ``query``, in query order (use stream_read for large results)."""
        found: list[Record] = []
        async for batch in self._read_batches(query or Query(), 10_000):
            found.extend(batch)
        return found

    async def all(self) -> list[Record]:
        """Every record."""
        return await self.search(Query())

    async def stream_read(
        self, query: Query | None = None, config: StreamConfig | None = None
    ) -> AsyncIterator[Record]:
        """Yield matching records; at most ``config.buffer_size`` are read ahead of the consumer."""
        batches = self._buffered(query, config)
        try:
            async for batch in batches:
                for record in batch:
                    yield record
        finally:
            # Leaving ``async for`` does not close the inner generator; without this its
            # producer would run on until the event loop finalizes it.
            await batches.aclose()

    async def stream_read_batches(
        self,
        query: Query | None = None,
        config: StreamConfig | None = None,
        *,
        id_column: str = "_id",
        schema: Any = None,
    ) -> AsyncIterator[Any]:
        """Yield ``pyarrow.RecordBatch`` es of at most ``batch_size`` rows, the id in ``id_column``.

        Without ``schema`` each batch's types are inferred from its values;
        give one to get the same schema for every batch.
        """
        import pyarrow as pa

        batches = self._buffered(query, config)
        try:
            async for batch in batches:
                yield self._arrow_batch(batch, id_column, schema, pa)
        finally:
            await batches.aclose()

    @staticmethod
    def _arrow_batch(batch: list[Record], id_column: str, schema: Any, pa: Any) -> Any:
        """One ``pyarrow.RecordBatch`` of records, the id in ``id_column``."""
        rows = []
        for record in batch:
            if id_column in record.fields:
                raise DataError(
                    f"record {record.id!r} has a field named {id_column!r}, the id column; "
                    "pass another id_column=",
                    row_key=record.id,
                )
            rows.append({id_column: record.id, **record.fields})
        try:
            return pa.RecordBatch.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(
                f"records cannot become one Arrow batch ({exc}); a field holds values of several types, "
                "pass schema= with the types to cast to"
            ) from None

    async def _buffered(self, query: Query | None, config: StreamConfig | None) -> AsyncIterator[list[Record]]:
        """Batches of ``_read_batches``, produced by a task at most ``buffer_size`` records ahead.

        A slot is taken before a batch is produced and given back when the
        consumer asks for the next one, so the batches being produced, queued
        and consumed together hold at most ``buffer_size`` records.
        """
        config = config or StreamConfig()
        source = self._read_batches(query or Query(), config.batch_size)
        room = asyncio.Semaphore(config.read_ahead_batches)
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def produce() -> None:
            try:
                while True:
                    await room.acquire()
                    try:
                        batch = await source.__anext__()
                    except StopAsyncIteration:
                        break
                    queue.put_nowait(batch)
                queue.put_nowait(done)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the consumer, raised there
                queue.put_nowait(_Failure(exc))

        task = asyncio.ensure_future(produce())
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
                room.release()
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
            await _close_async_gen(source)

    # -- writing -----------------------------------------------------------------------

    async def _write_stream_batch(self, records: list[Record]) -> BatchResult:
        """Write one batch of a stream (stores may use a faster path than create_batch)."""
        return await self.create_batch(records)

    async def stream_write(
        self, records: AsyncIterable[Record] | Iterable[Record], config: StreamConfig | None = None
    ) -> StreamResult:
        """Write records from an (async) iterable in batches; returns a :class:`StreamResult`.

        At most ``config.parallel`` batches are written at once and at most
        ``config.buffer_size`` records are held (read from the input, not yet
        written). ``on_error='collect'`` writes every record it can and lists
        the failures; ``'stop'`` stops reading at the first failed batch,
        lets the batches in flight finish and raises :class:`StreamWriteError`.
        """
        config = config or StreamConfig()
        started = time.perf_counter()
        result = StreamResult()
        slots = asyncio.Semaphore(config.write_slots)
        ids_by_start: dict[int, list[str | None]] = {}
        errors: list[RecordError] = []
        stop = asyncio.Event()
        pending: set[asyncio.Task] = set()
        iterator = _aiter(records)

        async def write(batch: list[Record], start: int) -> None:
            try:
                try:
                    written = await self._write_stream_batch(batch)
                    batch_errors = [RecordError(start + e.index, e.reason, e.id) for e in written.errors]
                    batch_ids = list(written)
                except (DataError, ConfigurationError) as exc:
                    # The whole batch was refused: every record in it failed for that reason.
                    batch_errors = [
                        RecordError(start + i, str(exc), _safe_id(r)) for i, r in enumerate(batch)
                    ]
                    batch_ids = [None] * len(batch)
                ids_by_start[start] = batch_ids
                errors.extend(batch_errors)
                result.batches += 1
                if batch_errors and config.on_error == "stop":
                    stop.set()
            finally:
                slots.release()

        try:
            while not stop.is_set():
                await slots.acquire()
                if stop.is_set():
                    slots.release()
                    break
                batch: list[Record] = []
                start = result.total
                while len(batch) < config.batch_size:
                    try:
                        batch.append(await iterator.__anext__())
                    except StopAsyncIteration:
                        break
                if not batch:
                    slots.release()
                    break
                result.total += len(batch)
                task = asyncio.ensure_future(write(batch, start))
                pending.add(task)
                task.add_done_callback(pending.discard)
                if len(batch) < config.batch_size:
                    break  # the input is exhausted
            if pending:
                await asyncio.gather(*pending)
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        finally:
            await _close_async_gen(iterator)
        for start in sorted(ids_by_start):
            result.ids.extend(ids_by_start[start])
        errors.sort(key=lambda error: error.index)
        result.errors = errors
        result.failed_indices = [error.index for error in errors]
        result.failed = len(errors)
        result.successful = result.total - result.failed
        result.duration = time.perf_counter() - started
        if errors and config.on_error == "stop":
            result.stopped = True
            raise StreamWriteError(result)
        return result


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _safe_id(record: Any) -> str | None:
    try:
        return record.storage_id()
    except Exception:
        return None


async def _close_async_gen(gen: Any) -> None:
    closer = getattr(gen, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:
            pass


def _aiter(records: AsyncIterable[Record] | Iterable[Record]) -> AsyncIterator[Record]:
    if hasattr(records, "__aiter__"):
        return records.__aiter__()

    async def from_sync() -> AsyncIterator[Record]:
        for count, record in enumerate(records, 1):
            yield record
            if count % 1000 == 0:
                await asyncio.sleep(0)  # let batches in flight progress

    return from_sync()


def coerce_ids(ids: Iterable[str | int]) -> list[str]:
    """Normalize ids for a batch call (ConfigurationError for a bad one)."""
    return [normalize_id(value) for value in ids]
