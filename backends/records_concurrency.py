"""The guide's concurrency helpers, made safe: nothing is lost when some calls fail.

* :func:`max_concurrent` / :class:`RateLimitedDatabase` -- the guide's
  semaphore wrapper: every coroutine method of the store runs under one
  semaphore (``max_concurrent`` calls at once). ``stream_read`` passes
  through (a stream holds no slot while the consumer works on its records);
  ``stream_write`` holds one slot for the whole stream.
* :func:`gather_collect` -- the guide's ``asyncio.gather`` loop, but with a
  concurrency limit and every outcome kept: results in input order and
  every error with its index, instead of the first exception hiding the
  others (and leaving the rest running unobserved).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

__all__ = ["RateLimitedDatabase", "max_concurrent", "GatherResult", "gather_collect", "parallel_map"]

T = TypeVar("T")


class RateLimitedDatabase:
    """A store whose coroutine methods run at most ``max_concurrent`` at a time."""

    def __init__(self, db: Any, max_concurrent: int = 10) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be a whole number >= 1, got {max_concurrent!r}")
        self.db = db
        self.max_concurrent = max_concurrent
        self.semaphore = asyncio.Semaphore(max_concurrent)
        self._in_flight = 0
        #: Highest number of calls seen running at once (to check the limit holds).
        self.peak_in_flight = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.db, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        async def limited(*args: Any, **kwargs: Any) -> Any:
            async with self.semaphore:
                self._in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
                try:
                    return await attribute(*args, **kwargs)
                finally:
                    self._in_flight -= 1

        return limited

    async def __aenter__(self) -> "RateLimitedDatabase":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.db.close()


def max_concurrent(db: Any, limit: int = 10) -> RateLimitedDatabase:
    """Wrap ``db`` so that at most ``limit`` of its calls run at once."""
    return RateLimitedDatabase(db, limit)


@dataclass
class GatherResult:
    """Outcomes in input order: ``results[i]`` (None where call i failed) and ``errors`` as (index, exception)."""

    results: list[Any] = field(default_factory=list)
    errors: list[tuple[int, BaseException]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no call failed."""
        return not self.errors

    def raise_first(self) -> list[Any]:
        """Return the results, or raise the first error (by index) with the count of the others in a note."""
        if self.errors:
            index, exc = self.errors[0]
            if len(self.errors) > 1:
                exc.add_note(f"{len(self.errors) - 1} other call(s) failed too (indices {[i for i, _ in self.errors[1:]]})")
            exc.add_note(f"call {index} of {len(self.results)}")
            raise exc
        return self.results


async def gather_collect(awaitables: Iterable[Awaitable[T]], *, limit: int | None = None) -> GatherResult:
    """Await every item (at most ``limit`` at once) and keep every result and every error.

    Cancellation of the caller cancels the calls still running; other
    exceptions never escape: they are returned in ``errors`` with their index.
    """
    items = list(awaitables)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 or None, got {limit!r}")
    semaphore = asyncio.Semaphore(limit or max(1, len(items)))
    results: list[Any] = [None] * len(items)
    errors: list[tuple[int, BaseException]] = []

    async def run(index: int, awaitable: Awaitable[T]) -> None:
        async with semaphore:
            try:
                results[index] = await awaitable
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                errors.append((index, exc))

    tasks = [asyncio.ensure_future(run(i, item)) for i, item in enumerate(items)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for item in items:  # coroutines that never got a slot: close them, no "never awaited" warning
            if inspect.iscoroutine(item):
                item.close()
        raise
    errors.sort(key=lambda pair: pair[0])
    return GatherResult(results, errors)


async def parallel_map(
    func: Callable[[Any], Awaitable[T]], items: Iterable[Any], *, limit: int = 10
) -> GatherResult:
    """``func(item)`` for every item, at most ``limit`` at once (the guide's parallel batches, safely)."""
    return await gather_collect((func(item) for item in items), limit=limit)
