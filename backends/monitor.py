"""``PerformanceMonitor``: timings per operation with percentiles, and a slow-operation log.

::

    from ferry.backends.monitor import PerformanceMonitor

    monitor = PerformanceMonitor(slow_ms=100)
    async with monitor.measure("create"):
        await db.create(record)
    print(monitor.report())          # a table: count, errors, avg, min, max, p50, p95, p99 (ms)
    figures = monitor.report_dict()  # the same as a dict, per operation

* Memory stays bounded: per operation the monitor keeps exact count, error
  count, sum, minimum and maximum, and a **reservoir** of at most
  ``reservoir_size`` durations (Vitter's algorithm R, a uniform sample of
  every duration seen). Percentiles are computed from the reservoir: exact
  while an operation has at most ``reservoir_size`` samples, estimates after.
* The slow-operation log: a measurement that takes ``slow_ms`` or longer is
  logged on the ``ferry.slow`` logger (WARNING) with its description (the
  statement, or the shape of the query) and kept in :attr:`slow_operations`
  (the latest :data:`SLOW_LOG_SIZE`). Bound values are left out unless the
  monitor was built with ``log_values=True``; credentials in URIs and
  ``password=`` style settings are masked in every description.
* Thread safe: one lock per monitor, held only to update numbers.

Record stores time every database call with ``AsyncDatabase.create(...,
monitor=m)`` or ``db.instrument(m)`` (see :mod:`ferry.backends.records_cache`);
the migrate flow times every batch of its read, transform and write stages
and puts the figures in the run's artifact. docs/tuning.md has the details.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = [
    "PerformanceMonitor",
    "OperationStats",
    "DEFAULT_RESERVOIR_SIZE",
    "SLOW_LOG_SIZE",
    "redact",
    "mask_values",
    "timed_call",
    "timed_batches",
]

#: Durations kept per operation for the percentiles.
DEFAULT_RESERVOIR_SIZE = 1024
#: Slow operations kept in ``PerformanceMonitor.slow_operations``.
SLOW_LOG_SIZE = 100

_PERCENTILES = (50, 95, 99)

_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s]*)@")
_SECRET_SETTINGS = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api_key|apikey|access_key|secret_key)\b\s*[=:]\s*)"
    r"(?P<quote>['\"]?)(?P<value>[^'\"\s,;&)]*)(?P=quote)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with credentials in URIs and ``password=...`` style settings replaced by ``***``."""
    text = _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_SETTINGS.sub(lambda m: f"{m['key']}{m['quote']}***{m['quote']}", text)


def mask_values(canonical: Any) -> Any:
    """A canonical query or filter dict with every literal ``value`` replaced by ``"?"``.

    The shape (fields, operators, sort, offset, limit, projection) stays, so
    a slow log line says which query was slow without the values it bound.
    """
    if isinstance(canonical, Mapping):
        return {key: "?" if key == "value" else mask_values(item) for key, item in canonical.items()}
    if isinstance(canonical, list):
        return [mask_values(item) for item in canonical]
    return canonical


@dataclass
class OperationStats:
    """Figures of one operation: exact count, errors, total, min and max; percentiles from a reservoir."""

    operation: str
    count: int = 0
    errors: int = 0
    total_seconds: float = 0.0
    min_seconds: float = math.inf
    max_seconds: float = 0.0
    #: At most ``reservoir_size`` durations, a uniform sample of all of them.
    reservoir: list[float] = field(default_factory=list, repr=False)

    @property
    def avg_seconds(self) -> float:
        """Mean duration (0 with no samples)."""
        return self.total_seconds / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the reservoir, linearly interpolated; 0 with no samples."""
        return _interpolate(sorted(self.reservoir), q)

    @property
    def exact_percentiles(self) -> bool:
        """True while the reservoir holds every sample (percentiles are then exact)."""
        return len(self.reservoir) == self.count

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly figures in milliseconds (total in seconds)."""
        ordered = sorted(self.reservoir)
        figures = {
            "count": self.count,
            "errors": self.errors,
            "total_seconds": round(self.total_seconds, 6),
            "avg_ms": _ms(self.avg_seconds),
            "min_ms": _ms(self.min_seconds if self.count else 0.0),
            "max_ms": _ms(self.max_seconds),
        }
        for q in _PERCENTILES:
            figures[f"p{q}_ms"] = _ms(_interpolate(ordered, q))
        figures["sampled"] = len(ordered)
        return figures


class _Measurement:
    """``measure()``'s context manager: usable with ``async with`` and with ``with``."""

    __slots__ = ("_monitor", "_operation", "_detail", "_values", "_started")

    def __init__(self, monitor: "PerformanceMonitor", operation: str, detail: Any, values: Any) -> None:
        self._monitor = monitor
        self._operation = operation
        self._detail = detail
        self._values = values
        self._started = 0.0

    def __enter__(self) -> "_Measurement":
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._monitor.record(
            self._operation,
            time.perf_counter() - self._started,
            failed=exc_type is not None,
            detail=self._detail,
            values=self._values,
        )

    async def __aenter__(self) -> "_Measurement":
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


class PerformanceMonitor:
    """Durations per operation name, their percentiles, and a slow-operation log (see the module docstring).

    ``slow_ms``: measurements at least this long are logged (None: no slow
    log). ``log_values``: include bound values (ids, query literals,
    statement arguments) in slow-log lines; off by default because they may
    hold personal data. ``reservoir_size``: durations kept per operation for
    the percentiles. ``seed`` makes the reservoir's sampling repeatable.
    """

    def __init__(
        self,
        *,
        slow_ms: float | None = None,
        log_values: bool = False,
        reservoir_size: int = DEFAULT_RESERVOIR_SIZE,
        seed: int | None = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        if isinstance(reservoir_size, bool) or not isinstance(reservoir_size, int) or reservoir_size < 1:
            raise ValueError(f"reservoir_size must be a whole number >= 1, got {reservoir_size!r}")
        if slow_ms is not None and (isinstance(slow_ms, bool) or not isinstance(slow_ms, (int, float)) or slow_ms < 0):
            raise ValueError(f"slow_ms must be a number of milliseconds >= 0 or None, got {slow_ms!r}")
        self.slow_ms = slow_ms
        self.log_values = log_values
        self.reservoir_size = reservoir_size
        self.logger = logger or logging.getLogger("ferry.slow")
        #: The latest slow operations: ``{"operation", "ms", "detail"[, "values"]}``.
        self.slow_operations: deque[dict[str, Any]] = deque(maxlen=SLOW_LOG_SIZE)
        self._stats: dict[str, OperationStats] = {}
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    # -- measuring -------------------------------------------------------------------------

    def measure(self, operation: str, *, detail: Any = None, values: Any = None) -> _Measurement:
        """Time a block: ``async with monitor.measure("search"):`` (``with`` works too).

        ``detail`` (text, or a callable returning text, called only for a
        slow operation) describes it in the slow log; ``values`` are its
        bound values, logged only with ``log_values=True``. A block that
        raises is counted, and counted as an error.
        """
        return _Measurement(self, operation, detail, values)

    def record(
        self,
        operation: str,
        seconds: float,
        *,
        failed: bool = False,
        detail: Any = None,
        values: Any = None,
    ) -> None:
        """Add one duration of ``operation`` (what ``measure`` does when its block ends)."""
        with self._lock:
            stats = self._stats.get(operation)
            if stats is None:
                stats = self._stats[operation] = OperationStats(operation)
            stats.count += 1
            stats.errors += failed
            stats.total_seconds += seconds
            if seconds < stats.min_seconds:
                stats.min_seconds = seconds
            if seconds > stats.max_seconds:
                stats.max_seconds = seconds
            # Algorithm R: the n-th sample replaces a random slot with probability size/n.
            if len(stats.reservoir) < self.reservoir_size:
                stats.reservoir.append(seconds)
            else:
                slot = self._random.randrange(stats.count)
                if slot < self.reservoir_size:
                    stats.reservoir[slot] = seconds
        if self.slow_ms is not None and seconds * 1000 >= self.slow_ms:
            self._log_slow(operation, seconds, failed, detail, values)

    def _log_slow(self, operation: str, seconds: float, failed: bool, detail: Any, values: Any) -> None:
        try:
            text = detail() if callable(detail) else detail
        except Exception as exc:  # a description must never break the measured call
            text = f"(no description: {type(exc).__name__})"
        text = redact(str(text)) if text is not None else ""
        entry: dict[str, Any] = {"operation": operation, "ms": _ms(seconds), "detail": text, "failed": failed}
        line = "slow operation %s took %.1f ms (threshold %s ms)%s: %s"
        args: list[Any] = [operation, seconds * 1000, self.slow_ms, " and failed" if failed else "", text or "-"]
        if self.log_values and values is not None:
            shown = redact(repr(values))
            entry["values"] = shown
            line += " values=%s"
            args.append(shown)
        with self._lock:
            self.slow_operations.append(entry)
        self.logger.warning(line, *args)

    # -- reading ---------------------------------------------------------------------------

    def operations(self) -> list[str]:
        """Names of the operations measured so far, sorted."""
        with self._lock:
            return sorted(self._stats)

    def stats(self, operation: str) -> OperationStats:
        """A copy of one operation's figures (empty figures for an operation never measured)."""
        with self._lock:
            stats = self._stats.get(operation)
            if stats is None:
                return OperationStats(operation)
            return OperationStats(
                operation,
                stats.count,
                stats.errors,
                stats.total_seconds,
                stats.min_seconds,
                stats.max_seconds,
                list(stats.reservoir),
            )

    def count(self, operation: str) -> int:
        """How many times ``operation`` was measured."""
        with self._lock:
            stats = self._stats.get(operation)
            return stats.count if stats is not None else 0

    def report_dict(self, *, pools: bool = False) -> dict[str, Any]:
        """``{"operations": {name: {count, errors, total_seconds, avg_ms, min_ms, max_ms, p50_ms, p95_ms, p99_ms, sampled}}}``.

        ``pools=True`` adds ``"pools"``: the pool manager's report
        (:func:`ferry.backends.pools.get_pool_info`, with utilisation).
        """
        report: dict[str, Any] = {
            "operations": {name: self.stats(name).to_dict() for name in self.operations()},
            "slow_operations": len(self.slow_operations),
        }
        if pools:
            from .pools import get_pool_info

            report["pools"] = get_pool_info()
        return report

    def report(self, *, pools: bool = False) -> str:
        """The figures as a text table (milliseconds); ``print(monitor.report())``."""
        data = self.report_dict(pools=pools)
        header = ("operation", "count", "errors", "avg ms", "min ms", "max ms", "p50 ms", "p95 ms", "p99 ms")
        rows = [header]
        for name, figures in data["operations"].items():
            rows.append(
                (
                    name,
                    str(figures["count"]),
                    str(figures["errors"]),
                    *(
                        f"{figures[key]:.3f}"
                        for key in ("avg_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms")
                    ),
                )
            )
        if len(rows) == 1:
            lines = ["no operations measured"]
        else:
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            lines = [
                "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
                for row in rows
            ]
        if pools:
            lines.append("")
            lines.extend(_pool_lines(data["pools"]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def reset(self) -> None:
        """Forget every figure and the slow log."""
        with self._lock:
            self._stats.clear()
            self.slow_operations.clear()


def _pool_lines(pools: dict[str, dict[str, Any]]) -> list[str]:
    if not pools:
        return ["pools: none open"]
    lines = ["pools:"]
    for name, row in pools.items():
        parts = [f"users {row.get('users')}"]
        for key in ("size", "idle", "in_use", "max_size", "waiters"):
            if key in row:
                parts.append(f"{key} {row[key]}")
        if "utilisation" in row:
            parts.append(f"utilisation {row['utilisation']:.0%}")
        lines.append(f"  {name}: " + ", ".join(parts))
    return lines


def _interpolate(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def timed_call(
    monitor: PerformanceMonitor,
    operation: str,
    func: Callable[..., Any],
    describe: Callable[..., Any] | None = None,
    values: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``func`` (a coroutine function) timed as ``operation``; ``describe(*args)`` feeds the slow log."""

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        failed = True
        try:
            result = await func(*args, **kwargs)
            failed = False
            return result
        finally:
            monitor.record(
                operation,
                time.perf_counter() - started,
                failed=failed,
                detail=(lambda: describe(*args, **kwargs)) if describe is not None else None,
                values=values(*args, **kwargs) if values is not None and monitor.log_values else None,
            )

    timed.__wrapped__ = func  # type: ignore[attr-defined]
    timed.__doc__ = getattr(func, "__doc__", None)
    return timed


def timed_batches(
    monitor: PerformanceMonitor,
    operation: str,
    func: Callable[..., Any],
    describe: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``func`` (returning an async iterator) with each step timed as ``operation``.

    A step is the time from asking for the next item to getting it: what the
    store spends producing one batch, not what the consumer spends on it.
    The inner iterator is closed when the outer one is.
    """

    async def timed(*args: Any, **kwargs: Any) -> Any:
        source = func(*args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                try:
                    item = await source.__anext__()
                except StopAsyncIteration:
                    return
                except BaseException:
                    monitor.record(
                        operation,
                        time.perf_counter() - started,
                        failed=True,
                        detail=(lambda: describe(*args, **kwargs)) if describe is not None else None,
                    )
                    raise
                monitor.record(
                    operation,
                    time.perf_counter() - started,
                    detail=(lambda: describe(*args, **kwargs)) if describe is not None else None,
                )
                yield item
        finally:
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()

    timed.__wrapped__ = func  # type: ignore[attr-defined]
    return timed
