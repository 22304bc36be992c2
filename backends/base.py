"""The backend interface every store implements.

A backend is a Prefect Block: it holds configuration (never live clients when
saved or pickled) and opens its pooled client through the pool manager on
``async with``. Data moves as ``pyarrow.RecordBatch`` streams; a run is
planned as small, picklable :class:`Partition` objects, each read and written
on its own so that a failed partition is retried alone.

The write protocol of one run is::

    await target.begin_write(dataset, ctx)              # once: create, stage
    await target.write(dataset, partition_id, batches, ctx)   # per partition
    await target.publish(dataset, ctx)                   # once, on success
    await target.abort(dataset, ctx)                     # once, on failure

``write`` is idempotent per ``(ctx.run_id, partition_id)``: a retry removes
what a failed attempt left and a partition that already committed is skipped.
``publish`` makes a replace visible atomically; ``abort`` removes this run's
unfinished output and leaves committed data alone.
"""

from __future__ import annotations

import enum
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Callable, ClassVar, Self

import pyarrow as pa
from prefect.blocks.core import Block
from pydantic import PrivateAttr

from .errors import ConfigurationError
from .filters import Filter


class WriteMode(str, enum.Enum):
    """How a write treats data already in the target."""

    APPEND = "append"
    REPLACE = "replace"
    UPSERT = "upsert"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared as data so planners need no isinstance checks."""

    read: bool = True
    write: bool = True
    write_modes: frozenset[WriteMode] = frozenset(WriteMode)
    pushdown_columns: bool = False
    pushdown_filters: bool = False
    #: The target keeps what it receives, so a run can read it back to verify.
    readable_after_write: bool = True


@dataclass(frozen=True)
class Partition:
    """A small, deterministic slice of a source dataset.

    ``spec`` holds backend-specific, JSON-serialisable details (a row range,
    a file list, a snapshot id) so the partition can be shipped to another
    process, used as a checkpoint key and retried on its own.
    """

    id: str
    dataset: str
    spec: dict[str, Any] = field(default_factory=dict)
    estimated_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WriteContext:
    """Everything a target needs to know about the run it writes for."""

    run_id: str
    job_name: str
    mode: WriteMode
    schema: pa.Schema
    key: tuple[str, ...] = ()
    #: Partitions of this run that committed; filled in as they finish.
    committed: set[str] = field(default_factory=set)
    #: Backend-private state kept between begin_write, write and publish.
    state: dict[str, Any] = field(default_factory=dict)
    #: The job's ``on_error``. With "collect" a target that can isolate the rows it
    #: cannot store (PostgreSQL) loads the good rows and hands the bad ones to ``reject``.
    on_error: str = "fail"
    #: Set per partition by the pipeline when ``on_error`` is "collect":
    #: ``reject(batch, rejects)`` records rows of ``batch`` in the partition's rejects
    #: file; ``rejects`` is a table with ``row_index`` (into ``batch``), ``column``,
    #: ``value``, ``reason``, ``error_class`` and ``step``. It returns how many rows
    #: it recorded and raises RejectLimitExceeded past ``max_rejected_rows``.
    reject: Callable[[pa.RecordBatch, pa.Table], int] | None = None


@dataclass(frozen=True)
class ReadPolicy:
    """What a source does with an input object (a file) it cannot read.

    The flow sets it from the job's ``on_error`` (:meth:`Backend.set_read_policy`).
    ``"fail"`` raises naming the object. ``"collect"`` leaves the object out,
    records an :class:`UnreadableInput` (:meth:`Backend.unreadable_inputs`) and
    reads the others. Errors a retry may fix (TransientBackendError) raise
    either way. Stores that do not read separate objects ignore it.
    """

    on_error: str = "fail"

    @property
    def collect(self) -> bool:
        return self.on_error == "collect"


@dataclass(frozen=True)
class UnreadableInput:
    """An input object a read left out under ``on_error: collect``, and why."""

    #: The object as messages name it (``s3://bucket/key`` or a local path).
    object: str
    reason: str
    error_class: str
    #: "plan" (its footer, sample or schema) or "read" (while its rows were read).
    step: str
    partition: str | None = None
    #: Rows of it passed on, and so loaded, before the failure (0 when none).
    rows_read: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WriteResult:
    """What one partition's write did."""

    partition_id: str
    rows_written: int = 0
    rows_rejected: int = 0
    bytes_written: int = 0
    duration_seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    #: True when a previous attempt of this run had already committed it.
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Block, ABC):
    """Base of every Ferry backend block.

    Subclasses declare ``kind`` (the name used in job files) and
    ``capabilities``, and implement the abstract methods. A backend works with
    ``async with`` outside Prefect too::

        async with MemoryBackend() as store:
            async for batch in store.read(partition):
                ...
    """

    _block_schema_capabilities = ["read", "write"]

    kind: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    #: Live clients of this instance (pools, filesystems); never saved or pickled.
    _live: dict[str, Any] = PrivateAttr(default_factory=dict)
    #: What a read does with objects it cannot read; ``fresh()`` copies keep it.
    _read_policy: ReadPolicy = PrivateAttr(default_factory=ReadPolicy)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        private = dict(state.get("__pydantic_private__") or {})
        private["_live"] = {}
        state["__pydantic_private__"] = private
        return state

    @property
    def effective_capabilities(self) -> Capabilities:
        """Capabilities of this configured instance (a setting may narrow the class's)."""
        return self.capabilities

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def fresh(self) -> Self:
        """A copy with the same settings and no live clients (for another task or loop)."""
        clone = self.model_copy()
        clone._live = {}
        return clone

    async def open(self) -> None:
        """Acquire pooled clients and check the store is reachable (fail fast)."""

    async def close(self) -> None:
        """Release pooled clients; safe to call twice and when cancelled."""

    def config_hash(self) -> str:
        """A stable hash of this block's settings (secrets included, never shown)."""
        data = self.model_dump(mode="json", exclude_none=False)
        for name, value in self.model_dump().items():
            secret = getattr(value, "get_secret_value", None)
            if secret is not None:
                data[name] = secret()
        canonical = json.dumps({"kind": self.kind, **data}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # -- reading ---------------------------------------------------------------
    @property
    def read_policy(self) -> ReadPolicy:
        return self._read_policy

    def set_read_policy(self, policy: ReadPolicy) -> Self:
        """Tell this source what to do with input it cannot read (the job's ``on_error``); returns self."""
        self._read_policy = policy
        return self

    def note_unreadable(self, entry: UnreadableInput) -> None:
        """Record an object left out under the collect policy (once per object, step and partition)."""
        self._live.setdefault("unreadable", {})[(entry.object, entry.step, entry.partition)] = entry

    def unreadable_inputs(self) -> list[UnreadableInput]:
        """Objects this instance has left out so far (planning and reads), in the order met."""
        return list(self._live.get("unreadable", {}).values())

    @abstractmethod
    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        """The Arrow schema a read of ``dataset`` yields (one stable schema per read)."""

    async def exists(self, dataset: str) -> bool:
        """Whether ``dataset`` exists in this store."""
        try:
            await self.schema(dataset)
        except ConfigurationError:
            return False
        return True

    @abstractmethod
    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        """Split ``dataset`` into partitions that cover every row exactly once.

        ``hint`` is the number of partitions the caller would like (usually the
        job's ``parallel``); backends may return more or fewer.
        """

    @abstractmethod
    def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Stream one partition as record batches of at most ``batch_rows`` rows.

        ``where`` is applied exactly (pushed down where the store can, then
        evaluated with the reference semantics of :mod:`ferry.backends.filters`).
        """

    async def count(self, dataset: str, where: Filter | None = None) -> int:
        """Number of rows in ``dataset`` matching ``where``."""
        total = 0
        for part in await self.partitions(dataset, where=where):
            async for batch in self.read(part, where=where):
                total += batch.num_rows
        return total

    # -- writing ---------------------------------------------------------------
    def check_write(self, mode: WriteMode, key: tuple[str, ...]) -> None:
        """Refuse, at plan time, a write this backend cannot do correctly."""
        if not self.capabilities.write:
            raise ConfigurationError(f"the {self.kind} backend cannot be a target")
        if mode not in self.capabilities.write_modes:
            allowed = ", ".join(sorted(m.value for m in self.capabilities.write_modes))
            raise ConfigurationError(
                f"write mode {mode.value!r} is not supported by the {self.kind} backend; use one of: {allowed}",
                path="mode",
            )
        if mode is WriteMode.UPSERT and not key:
            raise ConfigurationError("mode 'upsert' needs key columns: set `key: [column, ...]`", path="key")

    async def target_schema(self, dataset: str) -> pa.Schema | None:
        """The schema of an existing target dataset, or None when it does not exist yet."""
        if not await self.exists(dataset):
            return None
        return await self.schema(dataset)

    @abstractmethod
    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        """Prepare a run's write: create the target or a staging area for replace."""

    @abstractmethod
    async def write(
        self,
        dataset: str,
        partition_id: str,
        batches: AsyncIterable[pa.RecordBatch],
        ctx: WriteContext,
    ) -> WriteResult:
        """Write one partition's batches and commit them; idempotent per (run, partition)."""

    @abstractmethod
    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        """Make the run's data visible (an atomic swap for replace)."""

    @abstractmethod
    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        """Remove this run's unfinished output; committed partitions stay."""

    def describe(self) -> str:
        """A one-line description without secrets, for logs and plans."""
        return self.kind

    def concurrency_tag(self) -> str:
        """The Prefect tag of tasks that touch this store, for tag concurrency limits.

        ``ferry-<block name>`` for a saved block, else ``ferry-<kind>-<config hash>``.
        """
        name = getattr(self, "_block_document_name", None)
        if name:
            return f"ferry-{name}"
        return f"ferry-{self.kind}-{self.config_hash()[:8]}"

    def location(self, dataset: str) -> str:
        """Where ``dataset`` lives, for summaries (no secrets)."""
        return f"{self.kind}:{dataset}"

    def partitions_written_by(self, run_id: str, partitions: list[Partition]) -> list[Partition] | None:
        """The partitions holding only ``run_id``'s rows, or None when the store cannot tell."""
        return None

    async def repair(self, dataset: str) -> list[str]:
        """Undo what a crashed run left on ``dataset``; one line per thing done ([] when clean).

        ``ferry repair`` calls it on a job's target. Stores whose failed runs
        cannot leave anything behind keep this default.
        """
        return []

    async def discard_run(self, dataset: str, run_id: str, mode: WriteMode) -> list[str]:
        """Remove the unfinished output of ``run_id``, a run whose process is gone; one line per thing done.

        Called after a flow run was cancelled or crashed without cleaning up
        itself (``abort`` did not run). Only ``run_id``'s output goes:
        committed append partitions stay, other runs are left alone. Stores
        whose failed runs cannot leave anything behind keep this default.
        """
        return []

    async def plan_notes(self, dataset: str, mode: WriteMode) -> list[str]:
        """Lines ``ferry plan`` shows about how this target will write ``dataset`` (strategies, fallbacks)."""
        return []

    def describe_target_schema(self, schema: pa.Schema) -> str:
        """The DDL, mapping or file schema this backend would create for ``schema``."""
        return schema.to_string(show_schema_metadata=False)
