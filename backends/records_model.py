"""Value types of the record API: Record, batch results, StreamConfig and StreamResult."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigurationError, DataError

__all__ = [
    "Record",
    "RecordError",
    "BatchResult",
    "StreamConfig",
    "StreamResult",
    "StreamWriteError",
    "DEFAULT_PARALLEL",
    "normalize_id",
    "is_flat",
    "private_copy",
]

#: Batches written at once by ``StreamConfig(parallel=True)``.
DEFAULT_PARALLEL = 4

_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def normalize_id(value: Any) -> str:
    """Record ids are strings; an int is accepted and turned into its decimal text."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ConfigurationError(f"a record id is a non-empty string or an int, got {value!r}", path="record.id")


def batch_item(item: Any, *, pairs: bool) -> tuple["str | None", "Record"]:
    """The id and record of one batch item: a Record (its storage id, None when it has none)
    or, where ``pairs`` allows, an ``(id, Record)`` pair; ConfigurationError for anything else."""
    if pairs and isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[1], Record):
            raise ConfigurationError("expected (id, Record)")
        return normalize_id(item[0]), item[1]
    if isinstance(item, Record):
        return item.storage_id(), item
    raise ConfigurationError(f"expected a Record{' or (id, Record)' if pairs else ''}, got {type(item).__name__}")


def private_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy the caller cannot change behind the store's back (deep only where needed)."""
    immutable = _IMMUTABLE
    return {key: value if type(value) in immutable else copy.deepcopy(value) for key, value in values.items()}


def is_flat(values: Mapping[str, Any]) -> bool:
    """True when every value is an immutable scalar (a shallow copy is then a private copy)."""
    immutable = _IMMUTABLE
    return all(type(value) in immutable for value in values.values())


class Record:
    """A record: its fields (a dict of values), an optional id and metadata.

    ``Record({"id": 7, "data": "x"})`` has no explicit id; stores then use the
    ``id`` field (as text, ``"7"``) and generate one when there is none.
    ``Record(fields, id="abc")`` sets it explicitly.
    """

    __slots__ = ("fields", "id", "metadata")

    def __init__(
        self,
        fields: Mapping[str, Any] | None = None,
        id: str | int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if fields is not None and type(fields) is not dict and not isinstance(fields, Mapping):
            raise ConfigurationError(
                f"Record fields are a mapping such as {{'name': 'x'}}, got {type(fields).__name__}", path="record"
            )
        self.fields: dict[str, Any] = dict(fields or {})
        self.id: str | None = None if id is None else normalize_id(id)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def storage_id(self) -> str | None:
        """The id a store uses: the explicit id, else the ``id`` field, else None (the store generates one)."""
        if self.id is not None:
            return self.id
        value = self.fields.get("id")
        return None if value is None else normalize_id(value)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def get(self, name: str, default: Any = None) -> Any:
        """A field's value, or ``default``."""
        return self.fields.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """``{"id": ..., "fields": {...}, "metadata": {...}}``."""
        return {"id": self.id, "fields": dict(self.fields), "metadata": dict(self.metadata)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (self.id, self.fields, self.metadata) == (other.id, other.fields, other.metadata)

    def __repr__(self) -> str:
        return f"Record(id={self.id!r}, fields={self.fields!r})"


@dataclass(frozen=True)
class RecordError:
    """Why one record of a batch or stream failed: its index in the input, its id and the reason."""

    index: int
    reason: str
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"index": self.index, "id": self.id, "reason": self.reason}


class BatchResult(list):
    """The result of a batch operation: one entry per input record, in input order.

    For create, update and upsert batches the entries are ids, and ``None``
    where that record failed; :attr:`errors` says why (index and reason).
    """

    def __init__(self, items: Iterable[Any] = (), errors: Iterable[RecordError] = ()) -> None:
        super().__init__(items)
        self.errors: list[RecordError] = list(errors)

    @property
    def ok(self) -> bool:
        """True when no record failed."""
        return not self.errors

    @property
    def failed_indices(self) -> list[int]:
        """Input positions of the failed records."""
        return [error.index for error in self.errors]

    def raise_for_errors(self) -> "BatchResult":
        """Raise DataError naming the first failure when any record failed; else return self."""
        if self.errors:
            first = self.errors[0]
            raise DataError(
                f"{len(self.errors)} of {len(self)} record(s) failed; first at index {first.index}: {first.reason}",
                row_key=first.id,
            )
        return self


class StreamConfig(BaseModel):
    """How ``stream_read`` / ``stream_write`` move records (the guide's names).

    Same names as :class:`ferry.backends.stream.StreamConfig`, but
    ``buffer_size`` counts records here (the guide: "Buffer up to 5000
    records"), not batches.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(1000, ge=1, description="Records per batch read from or written to the store.")
    buffer_size: int | None = Field(
        None,
        ge=1,
        description=(
            "At most this many records held at once: read ahead of the consumer by stream_read, or read from "
            "the input and not yet written by stream_write. Default: batch_size * (parallel + 1)."
        ),
    )
    parallel: int = Field(
        1,
        ge=1,
        description=(
            f"Batches written concurrently by stream_write; True means {DEFAULT_PARALLEL}, False means 1. "
            "Capped by buffer_size // batch_size."
        ),
    )
    on_error: Literal["stop", "collect"] = Field(
        "stop",
        description=(
            "'stop': stop reading the input at the first failed batch and raise StreamWriteError (its .result "
            "holds the accounting); 'collect': write every record that can be written and report the others "
            "in StreamResult.errors."
        ),
    )

    @field_validator("parallel", mode="before")
    @classmethod
    def _parallel_flag(cls, value: Any) -> Any:
        if value is True:
            return DEFAULT_PARALLEL
        if value is False:
            return 1
        return value

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> "StreamConfig":
        if self.buffer_size is not None and self.buffer_size < self.batch_size:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must hold at least one batch (batch_size {self.batch_size}); "
                "raise buffer_size or lower batch_size"
            )
        return self

    @property
    def effective_buffer_size(self) -> int:
        """``buffer_size``, or its default ``batch_size * (parallel + 1)``."""
        return self.buffer_size if self.buffer_size is not None else self.batch_size * (self.parallel + 1)

    @property
    def write_slots(self) -> int:
        """Batches stream_write holds at once (being filled or being written): fits in the buffer."""
        return max(1, min(self.parallel, self.effective_buffer_size // self.batch_size))

    @property
    def read_ahead_batches(self) -> int:
        """Batches stream_read may hold ahead of its consumer (including the one being produced)."""
        return max(1, self.effective_buffer_size // self.batch_size)


@dataclass
class StreamResult:
    """What ``stream_write`` did: counts, the failed records (index and reason), time and batches."""

    total: int = 0
    successful: int = 0
    failed: int = 0
    failed_indices: list[int] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    duration: float = 0.0
    batches: int = 0
    #: True when on_error='stop' stopped the stream before the end of the input.
    stopped: bool = False
    #: The ids written, in input order (None for failed records).
    ids: list[str | None] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        """Successful records per second."""
        return self.successful / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (ids left out)."""
        return {
            "total": self.total,
            "successful": self.successful,
            "failed": self.failed,
            "failed_indices": list(self.failed_indices),
            "errors": [error.to_dict() for error in self.errors],
            "duration": self.duration,
            "batches": self.batches,
            "stopped": self.stopped,
        }


class StreamWriteError(DataError):
    """stream_write stopped at a failed record (on_error='stop'); ``result`` has the accounting."""

    def __init__(self, result: StreamResult) -> None:
        self.result = result
        first = result.errors[0] if result.errors else None
        where = f"record {first.index}: {first.reason}" if first else "an error"
        super().__init__(
            f"stream_write stopped at {where}; {result.successful} of {result.total} record(s) read were "
            f"written, {result.failed} failed. Use StreamConfig(on_error='collect') to write the others and "
            "collect the failures"
        )
