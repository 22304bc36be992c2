"""The pool manager: one pooled client per configuration and event loop.

A live pool never crosses an event loop, a thread or a process. Backends ask
the manager for a pool by (kind, configuration hash); asynchronous pools are
also keyed by the running event loop, synchronous clients (such as a
filesystem) by the process only. Pools are reference counted: partitions
that run on one loop share one pool, and the pool is closed when its last
user leaves and, for synchronous clients, at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# How many pools may be open before the manager warns (as in the performance guide).
POOL_COUNT_WARNING = 100


@dataclass
class _PoolEntry:
    name: str
    kind: str
    config_hash: str
    loop_id: int | None
    resource: Any
    closer: Callable[[Any], Any] | None
    stats: Callable[[Any], dict[str, Any]] | None
    limits: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    refs: int = 0
    pid: int = field(default_factory=os.getpid)


class PoolManager:
    """Hands out pooled clients keyed by configuration and event loop, and reports on them."""

    def __init__(self, *, pool_count_warning: int = POOL_COUNT_WARNING) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, int | None], _PoolEntry] = {}
        self._creating: dict[tuple[str, str, int | None], asyncio.Future] = {}
        #: Warn (once, until the count falls back to it) when more pools than this are open.
        self.pool_count_warning = pool_count_warning
        self._warned_count = False

    @staticmethod
    def _loop_id(per_loop: bool) -> int | None:
        if not per_loop:
            return None
        return id(asyncio.get_running_loop())

    async def acquire(
        self,
        kind: str,
        config_hash: str,
        factory: Callable[[], Any],
        *,
        closer: Callable[[Any], Any] | None = None,
        stats: Callable[[Any], dict[str, Any]] | None = None,
        limits: dict[str, Any] | None = None,
        per_loop: bool = True,
    ) -> Any:
        """Return the pool for this configuration (creating it once) and take a reference.

        ``factory`` may be a plain or an async callable. Concurrent callers on
        one loop wait for the same creation instead of opening two pools.
        """
        key = (kind, config_hash, self._loop_id(per_loop))
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.pid == os.getpid():
                    entry.refs += 1
                    return entry.resource
                pending = self._creating.get(key)
                if pending is None:
                    pending = asyncio.get_running_loop().create_future() if per_loop else None
                    if pending is not None:
                        self._creating[key] = pending
                    break
            await asyncio.shield(pending)
        try:
            resource = factory()
            if inspect.isawaitable(resource):
                resource = await resource
        except BaseException as exc:
            with self._lock:
                self._creating.pop(key, None)
            if pending is not None and not pending.done():
                pending.set_exception(exc)
                pending.exception()  # mark retrieved; waiters retry creation
            raise
        name = f"{kind}:{config_hash}" + (f"@loop{key[2]:x}" if key[2] is not None else "")
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and existing.pid == os.getpid():
                # Another thread created the same process-wide client first.
                existing.refs += 1
                duplicate, resource = resource, existing.resource
            else:
                duplicate = None
                self._entries[key] = _PoolEntry(
                    name=name,
                    kind=kind,
                    config_hash=config_hash,
                    loop_id=key[2],
                    resource=resource,
                    closer=closer,
                    stats=stats,
                    limits=dict(limits or {}),
                    refs=1,
                )
            self._creating.pop(key, None)
            count = len(self._entries)
        if pending is not None and not pending.done():
            pending.set_result(None)
        if duplicate is not None and closer is not None:
            await _maybe_await(closer(duplicate))
        self._check_count(count)
        return resource

    def _check_count(self, count: int) -> None:
        """Warn once when the pool count passes ``pool_count_warning``; re-arm when it is back under it."""
        with self._lock:
            if count <= self.pool_count_warning:
                self._warned_count = False
                return
            if self._warned_count:
                return
            self._warned_count = True
        import logging

        logging.getLogger("ferry.pools").warning(
            "High pool count: %d pools are open (more than %d); each configuration and event loop opens its own "
            "pool: reuse backends across partitions, lower parallelism, or raise "
            "pool_manager.pool_count_warning if this many is expected",
            count,
            self.pool_count_warning,
        )

    async def release(self, kind: str, config_hash: str, *, per_loop: bool = True) -> None:
        """Drop a reference; the last user closes the pool (shielded from cancellation)."""
        key = (kind, config_hash, self._loop_id(per_loop))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._entries[key]
            count = len(self._entries)
        self._check_count(count)
        if entry.closer is not None:
            await asyncio.shield(_maybe_await(entry.closer(entry.resource)))

    def get_pool_info(self) -> dict[str, dict[str, Any]]:
        """Per pool: event loop, configuration hash, kind, users, limits, age, live stats and utilisation.

        The live stats come from the driver: ``size`` (connections open),
        ``idle``, ``in_use`` and, where the driver reports it, ``waiters``
        (callers waiting for a connection; asyncpg does not report them).
        With ``in_use`` and a ``max_size`` limit the row also has
        ``max_size`` and ``utilisation`` (``in_use / max_size``, 0..1).
        """
        now = time.time()
        with self._lock:
            entries = list(self._entries.values())
        info: dict[str, dict[str, Any]] = {}
        for entry in entries:
            row: dict[str, Any] = {
                "kind": entry.kind,
                "loop_id": entry.loop_id,
                "config_hash": entry.config_hash,
                "users": entry.refs,
                "limits": dict(entry.limits),
                "age_seconds": round(now - entry.created_at, 3),
            }
            if entry.stats is not None:
                try:
                    row.update(entry.stats(entry.resource))
                except Exception as exc:  # stats are best effort; never break a run for them
                    row["stats_error"] = str(exc)
            _add_utilisation(row)
            info[entry.name] = row
        return info

    def get_pool_count(self) -> int:
        """Number of open pools in this process."""
        with self._lock:
            return len(self._entries)

    def close_process_wide(self) -> None:
        """Close synchronous, process-wide clients (called at interpreter exit)."""
        with self._lock:
            entries = [e for k, e in self._entries.items() if k[2] is None]
            for key in [k for k in self._entries if k[2] is None]:
                del self._entries[key]
        for entry in entries:
            if entry.closer is None:
                continue
            try:
                result = entry.closer(entry.resource)
                if inspect.isawaitable(result):
                    result.close()  # cannot await at exit; async closers are per-loop pools
            except Exception:
                pass


def _add_utilisation(row: dict[str, Any]) -> None:
    """``max_size`` and ``utilisation`` (in use / max size) when the driver's stats and the limits allow."""
    in_use, max_size = row.get("in_use"), row.get("limits", {}).get("max_size")
    if isinstance(max_size, int) and max_size > 0:
        row["max_size"] = max_size
        if isinstance(in_use, int):
            row["utilisation"] = round(in_use / max_size, 3)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


#: The process-wide pool manager.
pool_manager = PoolManager()
atexit.register(pool_manager.close_process_wide)


def get_pool_info() -> dict[str, dict[str, Any]]:
    """Report on every open pool of this process (see :meth:`PoolManager.get_pool_info`)."""
    return pool_manager.get_pool_info()


def get_pool_count() -> int:
    """Number of open pools in this process."""
    return pool_manager.get_pool_count()
