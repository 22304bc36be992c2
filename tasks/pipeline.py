"""The partition pipeline: stream-read, transform and stream-write as Prefect task runs.

One partition runs three task runs joined by bounded queues (``buffer_size``
batches each), so reading, transforming and writing overlap and memory stays
flat. Batches never travel as task results: they move through the queues on
one event loop; the tasks return small summaries (``NO_CACHE``, nothing
persisted). CPU-heavy Arrow work (transforms, checksums, encoding) runs in
worker threads, where pyarrow releases the GIL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.utilities.annotations import quote

from ferry.backends.base import Backend, Partition, WriteContext
from ferry.backends.checksum import Checksum
from ferry.backends.errors import RejectLimitExceeded, TransientBackendError
from ferry.backends.filters import Filter
from ferry.backends.monitor import PerformanceMonitor
from ferry.backends.stream import StreamConfig, run_together, split_batch

from .progress import RunTracker
from .rejects import RejectsSink
from .transforms import TransformChain

#: Marks the end of a stream in a stage queue.
END = object()

#: Runs whose stage timings are kept until their report takes them (the oldest go first).
STAGE_RUNS_KEPT = 32
_stage_monitors: collections.OrderedDict[str, PerformanceMonitor] = collections.OrderedDict()
_stage_lock = threading.Lock()


def stage_monitor(run_id: str) -> PerformanceMonitor:
    """The run's monitor of batch times per stage: ``read``, ``transform``, ``write`` and ``commit``.

    ``read``: the source producing one batch; ``transform``: the transforms,
    schema policy and checksum of one batch; ``write``: the target taking one
    batch (until it asks for the next); ``commit``: from the last batch to the
    partition's commit. Percentiles come from a bounded reservoir per stage.
    """
    with _stage_lock:
        monitor = _stage_monitors.get(run_id)
        if monitor is None:
            monitor = _stage_monitors[run_id] = PerformanceMonitor()
            while len(_stage_monitors) > STAGE_RUNS_KEPT:
                _stage_monitors.popitem(last=False)
        return monitor


def pop_stage_timings(run_id: str) -> dict[str, dict[str, Any]]:
    """The run's per-stage figures (count, avg, min, max, p50, p95, p99 in ms), forgotten once taken."""
    with _stage_lock:
        monitor = _stage_monitors.pop(run_id, None)
    return monitor.report_dict()["operations"] if monitor is not None else {}


@dataclass
class PartitionJob:
    """Everything one partition pipeline needs. Travels as one opaque task argument."""

    partition: Partition
    source: Backend
    target: Backend
    target_dataset: str
    columns: list[str] | None
    where: Filter | None
    chain: TransformChain
    conform: Any  # ferry.backends.types.SchemaDecision
    #: False when transformed batches already have the write schema.
    conform_needed: bool
    write_ctx: WriteContext
    stream: StreamConfig
    tracker: RunTracker
    rejects_dir: str
    key: list[str]
    on_error: str
    max_rejected_rows: int
    verify: bool
    #: Filled by the stages.
    checksum: Checksum = field(default_factory=Checksum)
    #: Rows the target rejected (on_error: collect); taken out of ``checksum`` for verify.
    rejected_checksum: Checksum = field(default_factory=Checksum)
    #: The plan's direct copy (store to store, no batches here) replacing read -> transform -> write.
    direct: Any = None
    #: Source objects the read left out (on_error: collect), as ``UnreadableInput.to_dict()``.
    unreadable: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pid(self) -> str:
        return self.partition.id


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("ferry")


@task(name="stream-read", cache_policy=NO_CACHE, persist_result=False)
async def stream_read(job: PartitionJob, out: asyncio.Queue) -> dict[str, Any]:
    """Read one partition from the source into ``out``, cut to the stream's batch limits."""
    rows = batches = 0
    started = time.perf_counter()
    stream = job.stream
    stages = stage_monitor(job.tracker.run_id)
    job.tracker.mark_read_started()
    # Timed from asking the source to getting its batch: waits on a full queue are not the source's time.
    asked = time.perf_counter()
    async for batch in job.source.read(
        job.partition, columns=job.columns, where=job.where, batch_rows=stream.batch_size
    ):
        stages.record("read", time.perf_counter() - asked)
        for piece in split_batch(batch, stream.batch_size, stream.batch_max_bytes):
            job.tracker.add_read(job.pid, piece.num_rows)
            await out.put(piece)
            rows += piece.num_rows
            batches += 1
        asked = time.perf_counter()
    job.unreadable = [entry.to_dict() for entry in job.source.unreadable_inputs()]
    for entry in job.unreadable:
        _logger().warning(
            "%s was not read (%s); %s of its rows had been passed on", entry["object"], entry["reason"], entry["rows_read"]
        )
    await out.put(END)
    seconds = time.perf_counter() - started
    _logger().info("read %s rows in %s batches from %s in %.2fs", f"{rows:,}", batches, job.pid, seconds)
    return {"partition": job.pid, "rows_read": rows, "batches": batches, "seconds": seconds}


@task(name="transform", cache_policy=NO_CACHE, persist_result=False)
async def transform_batches(job: PartitionJob, inbox: asyncio.Queue, out: asyncio.Queue) -> dict[str, Any]:
    """Apply the job's transforms and schema policy; route bad rows to the rejects file."""
    if inbox is out:
        # Nothing to transform, conform or checksum: the reader feeds the writer
        # directly and this stage only reports that it let the batches through.
        _logger().info("no transforms for %s: batches go straight from read to write", job.pid)
        return {"partition": job.pid, "rows_in": None, "rows_out": None, "rows_rejected": 0, "passthrough": True}
    rows_in = rows_out = rejected = 0
    rejects = RejectsSink(os.path.join(job.rejects_dir), job.pid, job.key)
    stages = stage_monitor(job.tracker.run_id)

    def work(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, pa.Table | None]:
        result = job.chain.apply(batch)
        good = job.conform.conform(result.batch) if job.conform_needed else result.batch
        if job.verify:
            job.checksum.update(good)
        return good, result.rejects

    while True:
        batch = await inbox.get()
        if batch is END:
            break
        rows_in += batch.num_rows
        began = time.perf_counter()
        good, bad = await asyncio.to_thread(work, batch)
        stages.record("transform", time.perf_counter() - began)
        if bad is not None and bad.num_rows:
            count = rejects.add(batch, bad)
            rejected += count
            total = job.tracker.add_rejected(job.pid, count)
            if total > job.max_rejected_rows:
                raise RejectLimitExceeded(
                    f"more than max_rejected_rows={job.max_rejected_rows} rows were rejected; "
                    f"see the rejects in {rejects.folder} and fix the data or raise the limit",
                    rows=total,
                )
        rejects.advance(batch.num_rows)
        if good.num_rows:
            rows_out += good.num_rows
            await out.put(good)
    await out.put(END)
    path = await asyncio.to_thread(rejects.flush)
    if path:
        job.tracker.partition(job.pid).rejects_file = path
        _logger().warning("%s rows of %s were rejected; kept in %s", f"{rejected:,}", job.pid, path)
    return {"partition": job.pid, "rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rejected}


@task(name="stream-write", cache_policy=NO_CACHE, persist_result=False)
async def stream_write(job: PartitionJob, inbox: asyncio.Queue) -> dict[str, Any]:
    """Write the partition's batches to the target and commit them (idempotently)."""
    stages = stage_monitor(job.tracker.run_id)
    last_batch_done: list[float] = []

    async def batches() -> AsyncIterator[pa.RecordBatch]:
        while True:
            batch = await inbox.get()
            if batch is END:
                last_batch_done.append(time.perf_counter())
                return
            handed = time.perf_counter()
            yield batch
            # The target asks for the next batch when it is done with this one.
            stages.record("write", time.perf_counter() - handed)
            job.tracker.add_written(job.pid, batch.num_rows)

    ctx, sink = job.write_ctx, None
    if ctx.on_error == "collect":
        # Targets that isolate rows they cannot store hand them over here (WriteContext.reject).
        sink = RejectsSink(job.rejects_dir, job.pid, job.key)
        ctx = dataclasses.replace(ctx, reject=_write_rejector(job, sink))
    result = await job.target.write(job.target_dataset, job.pid, batches(), ctx)
    if last_batch_done:
        stages.record("commit", time.perf_counter() - last_batch_done[0])
    if result.rows_rejected:
        job.tracker.add_written(job.pid, -result.rows_rejected)  # counted as handed over, not stored
    if sink is not None and sink.rows:
        path = await asyncio.to_thread(sink.flush, append=True)
        job.tracker.partition(job.pid).rejects_file = path
        _logger().warning("%s rows of %s were rejected by the target; kept in %s", f"{sink.rows:,}", job.pid, path)
    job.write_ctx.committed.add(job.pid)
    job.tracker.mark_committed(job.pid)
    progress = job.tracker.partition(job.pid)
    progress.bytes_written = result.bytes_written
    progress.files = result.files
    progress.skipped = result.skipped
    if result.skipped:
        _logger().info("%s was committed by an earlier attempt of this run; skipped", job.pid)
    else:
        _logger().info(
            "wrote %s rows of %s in %.2fs (%s bytes)",
            f"{result.rows_written:,}",
            job.pid,
            result.duration_seconds,
            f"{result.bytes_written:,}",
        )
    return result.to_dict()


def _minus(total: Checksum, removed: Checksum) -> Checksum:
    """``total`` without the rows of ``removed`` (checksums are sums of row hashes)."""
    if not removed.rows:
        return total
    return Checksum(total.rows - removed.rows, total.value - removed.value, total.schema_fingerprint)


def _write_rejector(job: PartitionJob, sink: RejectsSink):
    """The ``WriteContext.reject`` of one partition: record rows, enforce max_rejected_rows."""

    def reject(batch: pa.RecordBatch, rejects: pa.Table) -> int:
        count = sink.add(batch, rejects)
        if job.verify:
            job.rejected_checksum.update(batch.take(pa.concat_arrays(rejects.column("row_index").chunks)))
        total = job.tracker.add_rejected(job.pid, count)
        if total > job.max_rejected_rows:
            raise RejectLimitExceeded(
                f"more than max_rejected_rows={job.max_rejected_rows} rows were rejected; "
                f"see the rejects in {sink.folder} and fix the data or raise the limit",
                rows=total,
            )
        return count

    return reject


@task(name="stream-copy", cache_policy=NO_CACHE, persist_result=False)
async def stream_copy(job: PartitionJob) -> dict[str, Any]:
    """Copy the partition store to store through the plan's direct copy (no batch passes through here)."""
    job.tracker.mark_read_started()
    if job.verify:
        # No row passes through here: the checksum that verification compares the target with
        # comes from reading the partition from the source (same snapshot, columns and where,
        # renames applied). Read first: a value Arrow cannot hold fails before anything is written.
        async for batch in job.source.read(job.partition, columns=job.columns, where=job.where, batch_rows=job.stream.batch_size):
            await asyncio.to_thread(job.checksum.update, job.chain.apply(batch).batch)
    result = await job.direct.copy(job.source, job.target, job.partition, job.target_dataset, job.write_ctx)
    job.tracker.add_read(job.pid, result.rows_written)
    job.tracker.add_written(job.pid, result.rows_written)
    job.write_ctx.committed.add(job.pid)
    job.tracker.mark_committed(job.pid)
    progress = job.tracker.partition(job.pid)
    progress.bytes_written, progress.skipped = result.bytes_written, result.skipped
    if result.skipped:
        _logger().info("%s was committed by an earlier attempt of this run; skipped", job.pid)
    else:
        _logger().info("copied %s rows of %s in %.2fs (%s bytes)", f"{result.rows_written:,}", job.pid,
                       result.duration_seconds, f"{result.bytes_written:,}")
    return result.to_dict()


@task(name="migrate-partition", cache_policy=NO_CACHE, persist_result=False)
async def migrate_partition(job: PartitionJob) -> dict[str, Any]:
    """One partition end to end: read -> transform -> write, overlapping through bounded queues."""
    started = time.perf_counter()
    progress = job.tracker.partition(job.pid)
    progress.attempts += 1
    progress.status = "running"
    job.tracker.reset_partition(job.pid)
    job.checksum = Checksum()
    job.rejected_checksum = Checksum()
    job.unreadable = []
    raw: asyncio.Queue = asyncio.Queue(maxsize=job.stream.buffer_size)
    # A stage hop costs measurable throughput on a busy machine: skip it when
    # the transform stage would hand every batch on unchanged.
    passthrough = job.chain.is_identity and not job.conform_needed and not job.verify
    ready: asyncio.Queue = raw if passthrough else asyncio.Queue(maxsize=job.stream.buffer_size)
    # Pools are per event loop: open this partition's own handles (the pool
    # manager hands back the loop's shared pool when one is open).
    source, target = job.source.fresh(), job.target.fresh()
    async with source, target:
        job.source, job.target = source, target
        if job.direct is not None:
            written = await stream_copy.with_options(task_run_name=f"copy {job.pid}")(quote(job))
            transformed = {"rows_rejected": 0}
        else:
            _, transformed, written = await run_together(
                # quote(): Prefect must not copy or walk the job (it holds queues and live handles).
                stream_read.with_options(task_run_name=f"read {job.pid}")(quote(job), quote(raw)),
                transform_batches.with_options(task_run_name=f"transform {job.pid}")(quote(job), quote(raw), quote(ready)),
                stream_write.with_options(task_run_name=f"write {job.pid}")(quote(job), quote(ready)),
            )
    progress.seconds = time.perf_counter() - started
    progress.status = "skipped" if written["skipped"] else "committed"
    return {
        "partition": job.pid,
        "rows_written": written["rows_written"],
        "rows_rejected": transformed["rows_rejected"],
        "skipped": written["skipped"],
        "seconds": progress.seconds,
        "checksum": _minus(job.checksum, job.rejected_checksum).to_dict(),
        "unreadable": job.unreadable,
    }


def is_retryable(exc: BaseException) -> bool:
    """Whether a partition that failed with ``exc`` may be retried (transient backend errors only)."""
    return isinstance(exc, TransientBackendError)
