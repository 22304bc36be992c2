"""Caches of the record API, and the layers that put caches and a monitor over a store's operations.

Two caches, both off by default, enabled per :class:`~ferry.backends.records.AsyncDatabase`
(``AsyncDatabase.create(backend, {..., "cache": {...}})``, ``cache=`` or
``db.enable_cache(...)``), for every store alike:

* the **record cache** (``records``): read-through for ``read_batch`` /
  ``read`` (and ``exists`` answers True from it), keyed by record id,
  at most ``max_entries`` records (least recently used evicted first), each
  kept at most ``ttl_seconds``. Updates, upserts and deletes through the
  same database drop the ids they wrote; ``clear`` drops everything.
* the **query cache** (``queries``): results of ``search`` / ``all`` and
  ``count``, keyed by the query's canonical form (``Query.to_dict()``, with
  the type of every literal, so ``1``, ``1.0``, ``"1"`` and ``True`` are
  different keys), a bounded LRU of ``max_entries`` results of at most
  ``max_result_records`` records each, kept at most ``ttl_seconds``. Any
  write through the same database empties it.

What they cannot see: writes by other processes, by other ``AsyncDatabase``
objects (even on the same table or named memory store), and SQL run outside
the record API. Such a write is invisible until the entry's ``ttl_seconds``
run out, so the TTL bounds how stale a hit can be; ``ttl_seconds: null``
means "only this database writes".

A read racing a write never caches what the write replaced: a fetch that
was in flight while ids were invalidated does not store those ids, and a
query result whose fetch overlapped any write is not stored.

Copies: the caches keep private copies of the records (as stores do) and
hand out a fresh copy on every hit, so changing a returned record changes
neither the cache nor the store.

The layers (:func:`install_layers`) are set on the store object itself,
over the class's methods: nothing is in the way while both the caches and
the monitor are off. The order is caller -> cache -> monitor -> store, so
the monitor times the calls that reach the store; a cache hit costs no
round trip and is not a monitored call.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigurationError
from .monitor import PerformanceMonitor, mask_values, timed_batches, timed_call
from .records_model import Record, is_flat, normalize_id, private_copy
from .records_query import Query

__all__ = [
    "CacheSettings",
    "RecordCacheSettings",
    "QueryCacheSettings",
    "DatabaseCache",
    "LruTtlCache",
    "query_key",
    "split_cache_settings",
    "install_layers",
]


class RecordCacheSettings(BaseModel):
    """The record cache: read-through by id, TTL and size bounded."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float | None = Field(
        60, gt=0, description="Seconds a cached record is served; bounds staleness from other writers (None: no expiry)."
    )
    max_entries: int = Field(10_000, ge=1, description="Records kept at most; the least recently used go first.")


class QueryCacheSettings(BaseModel):
    """The query-result cache: keyed by the canonical query, bounded LRU."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float | None = Field(
        60, gt=0, description="Seconds a cached result is served; bounds staleness from other writers (None: no expiry)."
    )
    max_entries: int = Field(256, ge=1, description="Query results kept at most; the least recently used go first.")
    max_result_records: int = Field(
        10_000, ge=0, description="Results with more records than this are not cached (they would crowd out the rest)."
    )


class CacheSettings(BaseModel):
    """The ``cache:`` section of a store's config; each cache is on when its section is given."""

    model_config = ConfigDict(extra="forbid")

    records: RecordCacheSettings | None = Field(None, description="The record cache (None: off). `{}` or `true` for defaults.")
    queries: QueryCacheSettings | None = Field(None, description="The query cache (None: off). `{}` or `true` for defaults.")

    @field_validator("records", "queries", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @property
    def enabled(self) -> bool:
        """True when at least one cache is on."""
        return self.records is not None or self.queries is not None

    @classmethod
    def parse(cls, value: Any) -> "CacheSettings":
        """From a CacheSettings, a mapping, or None (both caches with their defaults)."""
        if value is None:
            return cls(records=RecordCacheSettings(), queries=QueryCacheSettings())
        if isinstance(value, CacheSettings):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                "cache settings are a mapping such as {'records': {'ttl_seconds': 60, 'max_entries': 10000}, "
                f"'queries': {{'max_entries': 256}}}}, got {type(value).__name__}",
                path="cache",
            )
        try:
            return cls.model_validate(dict(value))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(
                f"invalid cache settings: {problems} (keys: records.ttl_seconds, records.max_entries, "
                "queries.ttl_seconds, queries.max_entries, queries.max_result_records)",
                path="cache",
            ) from None


def split_cache_settings(config: Any, cache: Any) -> tuple[Any, CacheSettings | None]:
    """``config`` without its ``cache`` key, and the cache settings from it or from ``cache`` (None: off)."""
    if isinstance(config, Mapping) and "cache" in config:
        if cache is not None:
            raise ConfigurationError(
                "cache settings were given twice (a `cache` key in the config and cache=); give them once",
                path="cache",
            )
        cache = config["cache"]
        config = {key: value for key, value in config.items() if key != "cache"}
        if cache is None:
            return config, None
    if cache is None:
        return config, None
    return config, CacheSettings.parse(cache)


_MISSING = object()


class LruTtlCache:
    """A bounded mapping: least recently used entries evicted past ``max_entries``, entries expire after ``ttl_seconds``.

    Counts hits, misses (an expired entry is a miss), evictions, expirations
    and invalidations. Thread safe.
    """

    def __init__(self, max_entries: int, ttl_seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.expirations = self.invalidations = 0

    def get(self, key: Any) -> Any:
        """The value, or ``_MISSING`` (absent or expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                expires_at, value = entry
                if expires_at >= self.clock():
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return value
                del self._entries[key]
                self.expirations += 1
            self.misses += 1
            return _MISSING

    def put(self, key: Any, value: Any) -> None:
        """Store ``value``; evict the least recently used entries past ``max_entries``."""
        expires_at = float("inf") if self.ttl_seconds is None else self.clock() + self.ttl_seconds
        with self._lock:
            self._entries[key] = (expires_at, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1

    def discard(self, keys: Iterable[Any]) -> None:
        """Drop these keys (those present count as invalidations)."""
        with self._lock:
            for key in keys:
                if self._entries.pop(key, None) is not None:
                    self.invalidations += 1

    def clear(self) -> None:
        """Drop every entry (each counts as an invalidation)."""
        with self._lock:
            self.invalidations += len(self._entries)
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, Any]:
        """Counters and the current size."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_ratio": round(self.hits / lookups, 4) if lookups else 0.0,
                "entries": len(self._entries),
                "max_entries": self.max_entries,
                "ttl_seconds": self.ttl_seconds,
                "evictions": self.evictions,
                "expirations": self.expirations,
                "invalidations": self.invalidations,
            }


def query_key(kind: str, query: Query | None) -> str:
    """The cache key of ``search`` / ``count`` of ``query``: its canonical form, literal types included."""
    canonical = (query or Query()).to_dict()
    return kind + ":" + json.dumps(canonical, sort_keys=True, default=_typed, separators=(",", ":"))


def _typed(value: Any) -> Any:
    # Decimal("1"), a date and the string "1" must not share a key: name the type.
    return {"$type": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}


_Snapshot = tuple[str, dict[str, Any], dict[str, Any], bool]


def _snapshot(record: Record) -> _Snapshot:
    """A private copy of a record (the cache's own, never handed out)."""
    flat = is_flat(record.fields)
    fields = dict(record.fields) if flat else private_copy(record.fields)
    metadata = private_copy(record.metadata) if record.metadata else {}
    return (record.id, fields, metadata, flat)


def _thaw(snapshot: _Snapshot) -> Record:
    """A fresh Record from a snapshot: the caller may change it freely."""
    record_id, fields, metadata, flat = snapshot
    record = Record.__new__(Record)
    record.id = record_id
    record.fields = dict(fields) if flat else private_copy(fields)
    record.metadata = private_copy(metadata) if metadata else {}
    return record


class _Fetch:
    """A read in flight: what was invalidated while it ran is not stored when it ends."""

    __slots__ = ("dirty", "everything", "epoch")

    def __init__(self, epoch: int) -> None:
        self.dirty: set[str] = set()
        self.everything = False
        self.epoch = epoch


class DatabaseCache:
    """The record cache and the query cache of one database (see the module docstring)."""

    def __init__(self, settings: CacheSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.records: LruTtlCache | None = None
        self.queries: LruTtlCache | None = None
        if settings.records is not None:
            self.records = LruTtlCache(settings.records.max_entries, settings.records.ttl_seconds, clock)
        if settings.queries is not None:
            self.queries = LruTtlCache(settings.queries.max_entries, settings.queries.ttl_seconds, clock)
        self._lock = threading.Lock()
        self._fetches: set[_Fetch] = set()
        #: Bumped by every write: a query result fetched across a write is not stored.
        self._epoch = 0
        #: Query results not stored because they held more than max_result_records.
        self.oversized = 0

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use another clock for the TTLs (tests step a fake clock instead of sleeping)."""
        for cache in (self.records, self.queries):
            if cache is not None:
                cache.clock = clock

    # -- invalidation ---------------------------------------------------------------------

    def _begin(self) -> _Fetch:
        with self._lock:
            fetch = _Fetch(self._epoch)
            self._fetches.add(fetch)
            return fetch

    def _end(self, fetch: _Fetch, store: Callable[[_Fetch], None] | None = None) -> None:
        """The fetch is over; ``store(fetch)`` keeps what no write invalidated meanwhile (under the lock)."""
        with self._lock:
            self._fetches.discard(fetch)
            if store is not None:
                store(fetch)

    def invalidate(self, ids: Iterable[str] | None = None) -> None:
        """After a write: drop these record ids (None: every record) and every query result."""
        # One lock around marking the fetches in flight and dropping entries, and around
        # a fetch's end and its stores (see _end): no store can slip in between.
        with self._lock:
            self._epoch += 1
            if ids is None:
                for fetch in self._fetches:
                    fetch.everything = True
            else:
                ids = [key for key in ids if key is not None]
                for fetch in self._fetches:
                    fetch.dirty.update(ids)
            if self.records is not None:
                if ids is None:
                    self.records.clear()
                else:
                    self.records.discard(ids)
            if self.queries is not None:
                self.queries.clear()

    def clear(self) -> None:
        """Drop everything cached (counters stay)."""
        self.invalidate(None)

    # -- reads ----------------------------------------------------------------------------

    async def read_batch(self, fetch: Callable[[list[str]], Any], keys: list[str]) -> list[Record | None]:
        """Hits from the record cache; one call of ``fetch`` for the ids that missed."""
        cache = self.records
        found: dict[str, _Snapshot] = {}
        missing: list[str] = []
        looked_up: set[str] = set()
        for key in keys:
            if key in looked_up:
                continue
            looked_up.add(key)
            snapshot = cache.get(key)
            if snapshot is _MISSING:
                missing.append(key)
            else:
                found[key] = snapshot
        fetched: dict[str, Record | None] = {}
        if missing:
            flight = self._begin()
            try:
                records = await fetch(missing)
            except BaseException:
                self._end(flight)
                raise
            fetched = dict(zip(missing, records))
            # Absent ids are not cached: a create elsewhere would stay unseen for a whole TTL.
            snapshots = {key: _snapshot(record) for key, record in fetched.items() if record is not None}

            def store(done: _Fetch) -> None:
                if not done.everything:
                    for key, snapshot in snapshots.items():
                        if key not in done.dirty:
                            cache.put(key, snapshot)

            self._end(flight, store)
        result: list[Record | None] = []
        handed: set[str] = set()
        for key in keys:
            if key in found:
                result.append(_thaw(found[key]))
            elif key not in handed:
                handed.add(key)
                result.append(fetched[key])
            else:  # a repeated id gets its own copy, as the stores do
                record = fetched[key]
                result.append(None if record is None else _thaw(_snapshot(record)))
        return result

    async def exists(self, check: Callable[[Any], Any], id: Any) -> bool:
        """True straight from the record cache when the record is cached, else the store's answer."""
        if self.records is not None:
            if self.records.get(normalize_id(id)) is not _MISSING:
                return True
        return await check(id)

    async def search(self, run: Callable[..., Any], query: Query | None) -> list[Record]:
        """A cached result (fresh copies), or the store's, stored when it is small enough and no write overlapped."""
        key = query_key("search", query)
        cached = self.queries.get(key)
        if cached is not _MISSING:
            return [_thaw(snapshot) for snapshot in cached]
        flight = self._begin()
        try:
            records = await run(query)
        except BaseException:
            self._end(flight)
            raise
        if len(records) > self.settings.queries.max_result_records:
            self.oversized += 1
            self._end(flight)
            return records
        snapshots = tuple(_snapshot(record) for record in records)

        def store(done: _Fetch) -> None:
            if self._epoch == done.epoch:
                self.queries.put(key, snapshots)

        self._end(flight, store)
        return records

    async def count(self, run: Callable[..., Any], query: Query | None) -> int:
        """A cached count, or the store's (stored when no write overlapped)."""
        key = query_key("count", query)
        cached = self.queries.get(key)
        if cached is not _MISSING:
            return cached
        flight = self._begin()
        try:
            total = await run(query)
        except BaseException:
            self._end(flight)
            raise

        def store(done: _Fetch) -> None:
            if self._epoch == done.epoch:
                self.queries.put(key, total)

        self._end(flight, store)
        return total

    def stats(self) -> dict[str, Any]:
        """``{"records": {...}, "queries": {...}}`` for the caches that are on: hits, misses, entries, ..."""
        report: dict[str, Any] = {}
        if self.records is not None:
            report["records"] = self.records.stats()
        if self.queries is not None:
            report["queries"] = {**self.queries.stats(), "oversized": self.oversized}
        return report


# -- the layers over a store's operations ----------------------------------------------------------

#: Operations that take an iterable first argument (and its name), made a list once so every layer can look at it.
_ITERABLE_FIRST = {
    "read_batch": "ids",
    "delete_batch": "ids",
    "create_batch": "records",
    "update_batch": "items",
    "upsert_batch": "items",
}
#: Writes whose result lists the ids written (None where an item failed).
_WRITES_BY_RESULT = ("create_batch", "update_batch", "upsert_batch")
#: Writes whose effect is unknown record by record: every cached entry goes.
_WRITES_EVERYTHING = ("clear", "_write_stream_batch", "execute", "execute_query")
#: Store-specific methods layered when the store has them (SQL can write anything).
_OPTIONAL = ("execute", "execute_query")


def _layered_names(store_class: type) -> list[str]:
    from .records import AsyncDatabase

    names = [
        "read_batch",
        "exists",
        "count",
        "search",
        "_read_batches",
        "create_batch",
        "update_batch",
        "upsert_batch",
        "delete_batch",
        "clear",
        "close",
    ]
    # The base class's stream batch writes through create_batch (already layered); a store's own path is not.
    if getattr(store_class, "_write_stream_batch") is not AsyncDatabase._write_stream_batch:
        names.append("_write_stream_batch")
    names.extend(name for name in _OPTIONAL if callable(getattr(store_class, name, None)))
    return names


def install_layers(db: Any, cache: DatabaseCache | None, monitor: PerformanceMonitor | None, prefix: str) -> None:
    """Set ``db``'s layered operations as attributes of ``db`` (removing any set before).

    With neither a cache nor a monitor nothing is set: calls go straight to
    the class's methods.
    """
    for name in db.__dict__.pop("_layered_operations", ()):
        db.__dict__.pop(name, None)
    if cache is None and monitor is None:
        return
    store_class = type(db)
    names = _layered_names(store_class)
    for name in names:
        operation = getattr(store_class, name).__get__(db, store_class)
        if monitor is not None and name != "close":
            label = f"{prefix}.{name.lstrip('_')}" if prefix else name.lstrip("_")
            if name == "_read_batches":
                operation = timed_batches(monitor, label, operation, _describer(name))
            else:
                operation = timed_call(monitor, label, operation, _describer(name), _values_of(name))
        if cache is not None:
            operation = _cached(name, operation, cache)
        if name in _ITERABLE_FIRST:
            operation = _listing(operation, _ITERABLE_FIRST[name])
        db.__dict__[name] = operation
    db.__dict__["_layered_operations"] = tuple(names)


def _listing(operation: Callable[..., Any], parameter: str) -> Callable[..., Any]:
    """Turn a one-shot iterable first argument (positional or ``parameter=``) into a positional list.

    Every layer below, and the store, can then look at it and pass it on.
    """

    async def listed(*args: Any, **kwargs: Any) -> Any:
        if args:
            items, args = args[0], args[1:]
        else:
            items = kwargs.pop(parameter)
        if not isinstance(items, (list, tuple)):
            items = list(items)
        return await operation(items, *args, **kwargs)

    listed.__wrapped__ = operation  # type: ignore[attr-defined]
    return listed


def _cached(name: str, operation: Callable[..., Any], cache: DatabaseCache) -> Callable[..., Any]:
    """The cache's layer of one operation (``operation`` itself when that cache is off)."""
    if name == "read_batch" and cache.records is not None:

        async def read_batch(ids: Iterable[str | int]) -> list[Record | None]:
            keys = [normalize_id(value) for value in ids]
            if not keys:
                return []
            return await cache.read_batch(operation, keys)

        return read_batch
    if name == "exists" and cache.records is not None:

        async def exists(id: str | int) -> bool:
            return await cache.exists(operation, id)

        return exists
    if name == "search" and cache.queries is not None:

        async def search(query: Query | None = None) -> list[Record]:
            return await cache.search(operation, query)

        return search
    if name == "count" and cache.queries is not None:

        async def count(query: Query | None = None) -> int:
            return await cache.count(operation, query)

        return count
    if name in _WRITES_BY_RESULT:

        async def write(items: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                result = await operation(items, *args, **kwargs)
            except BaseException:
                cache.invalidate(None)  # part of it may have been written
                raise
            cache.invalidate(result)
            return result

        return write
    if name == "delete_batch":

        async def delete_batch(ids: Iterable[str | int]) -> list[bool]:
            keys = [normalize_id(value) for value in ids]
            try:
                return await operation(keys)
            finally:
                cache.invalidate(keys)

        return delete_batch
    if name in _WRITES_EVERYTHING or name == "close":

        async def write_all(*args: Any, **kwargs: Any) -> Any:
            try:
                return await operation(*args, **kwargs)
            finally:
                cache.invalidate(None)

        return write_all
    return operation


def _describer(name: str) -> Callable[..., str]:
    """What the slow log says about a call of ``name`` (no bound values)."""
    label = name.lstrip("_")
    if name in ("search", "count", "_read_batches"):
        return lambda query=None, *rest, **kw: f"{label} {_query_shape(query)}"
    if name in ("execute", "execute_query"):
        return lambda sql="", *args, **kw: f"{label} {' '.join(str(sql).split())} ({len(args)} bound value(s))"
    if name in _ITERABLE_FIRST:
        noun = "id(s)" if name in ("read_batch", "delete_batch") else "record(s)"
        return lambda items=(), *rest, **kw: f"{label} of {len(items)} {noun}"
    return lambda *args, **kw: label


def _values_of(name: str) -> Callable[..., Any] | None:
    """The bound values of a call of ``name`` (logged only by a monitor with ``log_values=True``)."""
    if name in ("search", "count"):
        return lambda query=None, *rest, **kw: (query or Query()).to_dict()
    if name in ("execute", "execute_query"):
        return lambda sql="", *args, **kw: list(args)
    if name in ("read_batch", "delete_batch"):
        return lambda ids=(), *rest, **kw: list(ids)
    if name in ("create_batch", "update_batch", "upsert_batch"):
        return lambda items=(), *rest, **kw: [_item_id(item) for item in items]
    if name == "exists":
        return lambda id=None, *rest, **kw: id
    return None


def _item_id(item: Any) -> Any:
    if isinstance(item, tuple) and item:
        return item[0]
    try:
        return item.storage_id()
    except Exception:
        return None


def _query_shape(query: Any) -> str:
    canonical = (query or Query()).to_dict() if isinstance(query, (Query, type(None))) else query
    return json.dumps(mask_values(canonical), sort_keys=True, default=str)
