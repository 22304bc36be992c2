"""The memory backend: named in-process datasets, the demo generator and a counting sink.

* Named datasets live in a process-wide store guarded by a lock, so
  partitions writing from several threads (the thread task runner) are safe.
* ``generate: {rows: N, seed: S}`` turns the block into a source of the
  deterministic "orders" data set: batches are generated as they are read,
  so a ten-million-row source never sits in memory.
* ``discard: true`` turns it into a counting sink: it counts what it
  receives and keeps nothing (for benchmarks and dry loads).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from .base import Backend, Capabilities, Partition, WriteContext, WriteMode, WriteResult
from .errors import ConfigurationError
from .filters import Filter, columns_to_read, filter_batch
from .generator import ORDERS_SCHEMA, generate_batches
from .logos import code_example, docs_url, logo_url
from .stream import thread_call


class GenerateSettings(BaseModel):
    """Settings of the deterministic data generator."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(..., ge=0, description="How many rows the generated data set has.")
    seed: int = Field(42, description="Seed of the generator; the same seed gives the same rows.")


@dataclass
class _Dataset:
    schema: pa.Schema
    batches: list[pa.RecordBatch] = field(default_factory=list)
    #: (run id, partition id) pairs already committed: a retry skips them.
    ledger: set[tuple[str, str]] = field(default_factory=set)
    rows: int = 0


@dataclass
class _SinkCounter:
    rows: int = 0
    batches: int = 0
    ledger: set[tuple[str, str]] = field(default_factory=set)


class MemoryStore:
    """The process-wide home of named memory datasets (thread safe)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.datasets: dict[str, _Dataset] = {}
        self.sinks: dict[str, _SinkCounter] = {}
        #: Replace runs stage here until publish: (dataset, run id) -> staged data.
        self.pending: dict[tuple[str, str], _Dataset] = {}

    def put(self, name: str, data: pa.Table | pa.RecordBatch | list[pa.RecordBatch]) -> None:
        """Store ``data`` under ``name`` (replacing what was there)."""
        if isinstance(data, pa.Table):
            batches = data.to_batches()
            schema = data.schema
        elif isinstance(data, pa.RecordBatch):
            batches, schema = [data], data.schema
        else:
            if not data:
                raise ValueError("an empty list of batches has no schema; pass a pa.Table instead")
            batches, schema = list(data), data[0].schema
        with self.lock:
            self.datasets[name] = _Dataset(schema=schema, batches=batches, rows=sum(b.num_rows for b in batches))

    def table(self, name: str) -> pa.Table:
        """The whole dataset ``name`` as a table (for tests and small data)."""
        with self.lock:
            ds = self.datasets.get(name)
            if ds is None:
                raise KeyError(name)
            return pa.Table.from_batches(list(ds.batches), schema=ds.schema)

    def sink_rows(self, name: str) -> int:
        """Rows a counting sink named ``name`` has received."""
        with self.lock:
            return self.sinks.get(name, _SinkCounter()).rows

    def drop(self, name: str) -> None:
        """Forget dataset ``name`` (and its sink counter)."""
        with self.lock:
            self.datasets.pop(name, None)
            self.sinks.pop(name, None)

    def clear(self) -> None:
        """Forget every dataset."""
        with self.lock:
            self.datasets.clear()
            self.sinks.clear()
            self.pending.clear()


#: The store shared by every MemoryBackend in this process.
memory_store = MemoryStore()


class MemoryBackend(Backend):
    """In-process datasets, a deterministic data generator and a counting sink."""

    _block_type_name = "Ferry Memory"
    _block_type_slug = "ferry-memory"
    _description = "Named in-process datasets, Ferry's deterministic data generator and a counting sink."
    _logo_url = logo_url("memory.png")
    _documentation_url = docs_url("jobs.md")
    _code_example = code_example(
        "ferry-memory", "ferry.backends.memory", "MemoryBackend", "memory_block", side="source"
    )

    kind: ClassVar[str] = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(pushdown_columns=True)

    generate: GenerateSettings | None = Field(
        None, description="Generate the deterministic orders data set instead of reading a stored dataset."
    )
    discard: bool = Field(False, description="As a target, count rows and keep nothing.")
    partition_rows: int = Field(
        1_000_000, ge=1, description="Largest number of rows in one read partition."
    )

    @property
    def effective_capabilities(self) -> Capabilities:
        if self.discard:
            return Capabilities(pushdown_columns=True, readable_after_write=False)
        return self.capabilities

    def describe(self) -> str:
        if self.generate is not None:
            return f"memory (generated orders, {self.generate.rows:,} rows, seed {self.generate.seed})"
        return "memory (counting sink)" if self.discard else "memory"

    # -- reading ---------------------------------------------------------------
    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        if self.generate is not None:
            schema = ORDERS_SCHEMA
        else:
            with memory_store.lock:
                ds = memory_store.datasets.get(dataset)
            if ds is None:
                known = ", ".join(sorted(memory_store.datasets)) or "none"
                raise ConfigurationError(
                    f"memory dataset {dataset!r} does not exist (known datasets: {known}); "
                    "write it first or set `generate: {rows: N}` to generate data"
                )
            schema = ds.schema
        return _project_schema(schema, columns, dataset)

    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        total = self._row_count(dataset)
        count = max(1, hint, math.ceil(total / self.partition_rows))
        # A multiple of the parallelism keeps every worker busy to the end
        # (5 partitions on 2 workers would leave one idle for the last fifth).
        count = math.ceil(count / max(1, hint)) * max(1, hint)
        count = min(count, max(1, total))
        bounds = [round(i * total / count) for i in range(count + 1)]
        width = len(str(total))
        return [
            Partition(
                id=f"rows-{bounds[i]:0{width}d}-{bounds[i + 1]:0{width}d}",
                dataset=dataset,
                spec={"start": bounds[i], "stop": bounds[i + 1]},
                estimated_rows=bounds[i + 1] - bounds[i],
            )
            for i in range(count)
        ]

    def _row_count(self, dataset: str) -> int:
        if self.generate is not None:
            return self.generate.rows
        with memory_store.lock:
            ds = memory_store.datasets.get(dataset)
            if ds is None:
                raise ConfigurationError(f"memory dataset {dataset!r} does not exist")
            return ds.rows

    async def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        start, stop = partition.spec["start"], partition.spec["stop"]
        # Filters need their columns even when they are not selected.
        needed = columns_to_read(columns, where)
        if self.generate is not None:
            source = generate_batches(start, stop, seed=self.generate.seed, batch_rows=batch_rows)
            async for batch in _iterate_in_thread(source):
                yield _finish(batch, needed, columns, where)
            return
        with memory_store.lock:
            ds = memory_store.datasets.get(partition.dataset)
            if ds is None:
                raise ConfigurationError(f"memory dataset {partition.dataset!r} does not exist")
            snapshot = list(ds.batches)  # a fixed list: later writes do not leak into this read
        offset = 0
        for batch in snapshot:
            end = offset + batch.num_rows
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                piece = batch.slice(lo - offset, hi - lo)
                for sub in range(0, piece.num_rows, batch_rows):
                    yield _finish(piece.slice(sub, batch_rows), needed, columns, where)
            offset = end
            if offset >= stop:
                break

    # -- writing ---------------------------------------------------------------
    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        if self.discard:
            with memory_store.lock:
                memory_store.sinks.setdefault(dataset, _SinkCounter())
            return
        with memory_store.lock:
            if ctx.mode is WriteMode.REPLACE:
                memory_store.pending[(dataset, ctx.run_id)] = _Dataset(schema=ctx.schema)
            elif dataset not in memory_store.datasets:
                memory_store.datasets[dataset] = _Dataset(schema=ctx.schema)

    async def write(
        self,
        dataset: str,
        partition_id: str,
        batches: AsyncIterable[pa.RecordBatch],
        ctx: WriteContext,
    ) -> WriteResult:
        started = time.perf_counter()
        ledger_key = (ctx.run_id, partition_id)
        if self._committed(dataset, ctx, ledger_key):
            async for _ in batches:  # drain so upstream stages finish
                pass
            return WriteResult(partition_id, skipped=True)
        staged: list[pa.RecordBatch] = []
        rows = nbytes = 0
        async for batch in batches:
            rows += batch.num_rows
            nbytes += batch.nbytes
            if not self.discard:
                staged.append(batch)
        with memory_store.lock:
            if self.discard:
                sink = memory_store.sinks.setdefault(dataset, _SinkCounter())
                if ledger_key not in sink.ledger:
                    sink.rows += rows
                    sink.batches += len(staged)
                    sink.ledger.add(ledger_key)
            else:
                target = self._write_target(dataset, ctx)
                if ledger_key not in target.ledger:
                    if ctx.mode is WriteMode.UPSERT:
                        _merge_upsert(target, staged, ctx.key)
                    else:
                        target.batches.extend(staged)
                        target.rows += rows
                    target.ledger.add(ledger_key)
        return WriteResult(
            partition_id,
            rows_written=rows,
            bytes_written=nbytes,
            duration_seconds=time.perf_counter() - started,
        )

    def _write_target(self, dataset: str, ctx: WriteContext) -> _Dataset:
        if ctx.mode is WriteMode.REPLACE:
            pending = memory_store.pending.get((dataset, ctx.run_id))
            if pending is None:
                raise ConfigurationError("replace write without begin_write (or after abort)")
            return pending
        return memory_store.datasets.setdefault(dataset, _Dataset(schema=ctx.schema))

    def _committed(self, dataset: str, ctx: WriteContext, ledger_key: tuple[str, str]) -> bool:
        with memory_store.lock:
            if self.discard:
                return ledger_key in memory_store.sinks.get(dataset, _SinkCounter()).ledger
            if ctx.mode is WriteMode.REPLACE:
                pending = memory_store.pending.get((dataset, ctx.run_id))
                return pending is not None and ledger_key in pending.ledger
            ds = memory_store.datasets.get(dataset)
            return ds is not None and ledger_key in ds.ledger

    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        if self.discard or ctx.mode is not WriteMode.REPLACE:
            return
        with memory_store.lock:
            pending = memory_store.pending.pop((dataset, ctx.run_id), None)
            if pending is not None:
                memory_store.datasets[dataset] = pending

    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        with memory_store.lock:
            memory_store.pending.pop((dataset, ctx.run_id), None)


def _project_schema(schema: pa.Schema, columns: list[str] | None, dataset: str) -> pa.Schema:
    if columns is None:
        return schema
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise ConfigurationError(
            f"dataset {dataset!r} has no column(s) {', '.join(map(repr, missing))}; "
            f"available: {', '.join(schema.names)}",
            path="source.columns",
        )
    return pa.schema([schema.field(c) for c in columns])


def _finish(
    batch: pa.RecordBatch, needed: list[str] | None, columns: list[str] | None, where: Filter | None
) -> pa.RecordBatch:
    if needed is not None:
        batch = batch.select(needed)
    if where is not None:
        batch = filter_batch(batch, where)
    if columns is not None and needed != columns:
        batch = batch.select(columns)
    return batch


async def _iterate_in_thread(iterator) -> AsyncIterator[pa.RecordBatch]:
    """Run a CPU-bound synchronous generator in a worker thread, one item at a time."""
    sentinel = object()
    while True:
        item = await thread_call(next, iterator, sentinel)
        if item is sentinel:
            return
        yield item


def _merge_upsert(target: _Dataset, staged: list[pa.RecordBatch], key: tuple[str, ...]) -> None:
    """Merge ``staged`` into ``target`` by key; the last row for a key wins."""
    parts = list(target.batches) + staged
    if not parts:
        return
    table = pa.Table.from_batches(parts, schema=target.schema)
    table = table.append_column("__ferry_pos", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by(list(key), use_threads=False).aggregate([("__ferry_pos", "max")])
    positions = pc.sort_indices(last["__ferry_pos_max"])
    keep = pc.take(last["__ferry_pos_max"], positions)
    merged = table.take(keep).drop_columns(["__ferry_pos"])
    target.batches = merged.combine_chunks().to_batches()
    target.rows = merged.num_rows
