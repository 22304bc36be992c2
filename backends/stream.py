"""Stream settings, under the names the performance guide uses."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_BATCH_ROWS = 65536
DEFAULT_BATCH_MAX_BYTES = 64 * 1024 * 1024


class StreamConfig(BaseModel):
    """How data streams through a pipeline: batch size, buffering and parallelism."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        DEFAULT_BATCH_ROWS, ge=1, description="Rows per batch read from the source and handed to the target."
    )
    batch_max_bytes: int = Field(
        DEFAULT_BATCH_MAX_BYTES,
        ge=1024,
        description="A batch is also cut when its Arrow buffers exceed this many bytes.",
    )
    buffer_size: int = Field(
        4, ge=1, description="Batches buffered between two stages (read, transform, write) of one partition."
    )
    parallel: int = Field(2, ge=1, description="Partitions in flight at once.")


def split_batch(batch: pa.RecordBatch, max_rows: int, max_bytes: int) -> list[pa.RecordBatch]:
    """Cut ``batch`` into zero-copy slices of at most ``max_rows`` rows and about ``max_bytes`` bytes."""
    rows = batch.num_rows
    if rows == 0:
        return []
    step = max_rows
    size = batch.nbytes
    if size > max_bytes:
        # Bytes per row is an average; good enough to keep batches near the cap.
        step = min(step, max(1, int(rows * max_bytes / size)))
    if rows <= step:
        return [batch]
    return [batch.slice(offset, step) for offset in range(0, rows, step)]


async def rebatch(
    batches: AsyncIterator[pa.RecordBatch], max_rows: int, max_bytes: int
) -> AsyncIterator[pa.RecordBatch]:
    """Re-cut a stream so no batch is larger than the limits (never merges small ones)."""
    async for batch in batches:
        for piece in split_batch(batch, max_rows, max_bytes):
            yield piece


async def thread_call(func, /, *args):
    """Run ``func(*args)`` in a worker thread; if cancelled, wait for it to finish first.

    ``asyncio.to_thread`` returns at once on cancellation while the thread goes
    on: a writer closed by the clean-up would then race a write still running
    in the thread (a crash in Arrow's C++). Here the cancellation is delivered
    only after the thread's call has returned.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        try:
            await future
        except Exception:
            pass
        raise


async def run_together(*coroutines: Any) -> list[Any]:
    """Run coroutines together (pipeline stages, both ends of a pipe); the first failure cancels the others and is raised.

    Unlike ``asyncio.gather`` this never leaves one side blocked on a queue or
    pipe whose other end has died, and unlike a TaskGroup it raises the
    original exception rather than an exception group.
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    failed = [t for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed[0].exception()
    return [t.result() for t in tasks]
