"""The PostgreSQL data plane: Arrow-native binary COPY through the ADBC PostgreSQL driver.

Rows never become Python objects on the bulk paths: reads stream record
batches from ``cursor.fetch_record_batch()`` (the driver runs ``COPY (query)
TO STDOUT`` in binary), writes hand a ``RecordBatchReader`` to
``cursor.adbc_ingest`` (binary ``COPY FROM STDIN``). ADBC connections are
synchronous: they are used from worker threads, one thread per connection at
a time, and pooled per process by :class:`AdbcConnectionPool` through the pool
manager.

Also here: the conversions between what the driver speaks and Ferry's Arrow
types (:func:`to_read_type`, :func:`adapt_for_ingest`), a vectorised
struct -> JSON text encoder for jsonb columns, and the translation of driver
errors into Ferry's error classes (:func:`translate_error`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from typing import Any, AsyncIterator, Callable

import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError, FerryError, PermanentBackendError, TransientBackendError
from .postgres_sql import dumps

#: SQLSTATE classes and codes a retry can fix.
TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "53", "57P01", "57P02", "57P03", "55P03", "58")
#: SQLSTATE classes that mean a value does not fit.
DATA_SQLSTATES = ("22", "23")

_COPY_CONTEXT = re.compile(r"COPY (?P<table>[^,\s]+), line (?P<line>\d+)(?:, column (?P<column>[^:\s]+))?")


class AdbcConnectionPool:
    """A thread-safe pool of ADBC PostgreSQL connections (autocommit; Ferry sends BEGIN/COMMIT itself).

    At most ``max_size`` connections exist; :meth:`acquire` waits up to
    ``timeout`` seconds for one. Connections are used by one thread at a time.
    """

    def __init__(self, uri: str, *, max_size: int, timeout: float | None, setup: list[str]) -> None:
        self._uri = uri
        self.max_size = max_size
        self.timeout = timeout
        self._setup = setup
        self._idle: list[Any] = []
        self._size = 0
        self._lock = threading.Condition()
        self._closed = False

    def _connect(self) -> Any:
        import adbc_driver_postgresql.dbapi as dbapi

        conn = dbapi.connect(self._uri, autocommit=True)
        with conn.cursor() as cur:
            for statement in self._setup:
                cur.execute(statement)
        return conn

    def acquire(self) -> Any:
        """A connection for this thread's exclusive use (blocks while the pool is full)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._lock:
            while True:
                if self._closed:
                    raise PermanentBackendError("the PostgreSQL ADBC pool is closed; reopen the backend")
                if self._idle:
                    return self._idle.pop()
                if self._size < self.max_size:
                    self._size += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransientBackendError(
                        f"no PostgreSQL connection became free within {self.timeout}s "
                        f"(max_connections={self.max_size}); raise max_connections or lower parallel"
                    )
                self._lock.wait(remaining)
        try:
            return self._connect()
        except BaseException:
            with self._lock:
                self._size -= 1
                self._lock.notify()
            raise

    def release(self, conn: Any, *, broken: bool = False) -> None:
        """Give ``conn`` back; a broken connection (or one left in a transaction) is closed."""
        if not broken:
            try:
                broken = conn.adbc_connection is None
            except Exception:
                broken = True
        with self._lock:
            if broken or self._closed:
                self._size -= 1
                self._lock.notify()
                drop = True
            else:
                self._idle.append(conn)
                self._lock.notify()
                drop = False
        if drop:
            _close_quietly(conn)

    def close(self) -> None:
        """Close idle connections; connections in use are closed when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            self._lock.notify_all()
        for conn in idle:
            _close_quietly(conn)

    def stats(self) -> dict[str, Any]:
        """Size, idle and in-use connections (for ``get_pool_info()``)."""
        with self._lock:
            return {"size": self._size, "idle": len(self._idle), "in_use": self._size - len(self._idle)}


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass


def run_quietly(cur: Any, statement: str) -> None:
    """Execute ``statement`` ignoring errors (a ROLLBACK on a connection that may be gone)."""
    try:
        cur.execute(statement)
    except Exception:
        pass


# -- reading -------------------------------------------------------------------------------


# PostgreSQL stores 'infinity' / '-infinity' as the extremes of its storage, counted from
# 2000-01-01; the driver shifts every value to the Unix epoch, so the extremes wrap around.
_PG_EPOCH_US = 946_684_800_000_000
_PG_EPOCH_DAYS = 10_957
_INFINITE = {
    64: (-(2**63) + _PG_EPOCH_US, (2**63 - 1 + _PG_EPOCH_US) - 2**64),
    32: (-(2**31) + _PG_EPOCH_DAYS, (2**31 - 1 + _PG_EPOCH_DAYS) - 2**32),
}


def infinite_to_null(array: pa.Array, column: str, *, nulls: bool) -> pa.Array:
    """Find 'infinity' / '-infinity' dates and timestamps: fail clearly, or (``nulls``) make them null."""
    if not (pa.types.is_timestamp(array.type) or pa.types.is_date32(array.type)):
        return array
    width = 64 if pa.types.is_timestamp(array.type) else 32
    storage = array.view(pa.int64() if width == 64 else pa.int32())
    low, high = _INFINITE[width]
    infinite = pc.fill_null(pc.or_(pc.equal(storage, low), pc.equal(storage, high)), False)
    if not pc.any(infinite).as_py():
        return array
    if nulls:
        return pc.if_else(infinite, pa.scalar(None, array.type), array)
    raise DataError(
        "PostgreSQL's infinite dates and timestamps have no Arrow value; set `infinite_values: null` "
        f"to read them as nulls, or filter them out (isfinite({column}))",
        column=column,
        value="infinity",
        rows=pc.sum(pc.cast(infinite, pa.int64())).as_py(),
    )


def to_read_type(array: pa.Array, target: pa.DataType, column: str, *, infinite_as_null: bool = False) -> pa.Array:
    """Convert a driver column to the Arrow type Ferry reads it as (numeric text -> decimal...)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = infinite_to_null(array, column, nulls=infinite_as_null)
    numeric_text = False
    if isinstance(array.type, pa.BaseExtensionType):
        # The driver hands numeric over as opaque text (type_name=numeric).
        numeric_text = "numeric" in str(array.type)
        array = array.storage
    if numeric_text and pa.types.is_string(array.type) and pa.types.is_string(target):
        array = _postgres_numeric_text(array)
    if array.type == target:
        return array
    if pa.types.is_struct(target) and (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return json_to_struct(array, target, column)
    try:
        return array.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if pa.types.is_decimal(target) and pa.types.is_string(array.type):
            # Only now look for the cause (a scan per batch would cost every read).
            bad = pc.fill_null(pc.match_substring_regex(array, r"^-?(NaN|nan|Infinity|infinity|inf)$"), False)
            if pc.any(bad).as_py():
                value = array.filter(bad)[0].as_py()
                raise DataError(
                    f"a numeric column holds {value!r}, which a decimal cannot hold; read it as text with a "
                    f"custom query (`{column}::text`) or map it in the job",
                    column=column,
                    value=value,
                ) from None
        raise DataError(f"cannot read values as {target}: {exc}", column=column) from None


def _postgres_numeric_text(array: pa.Array) -> pa.Array:
    """The driver writes NaN and infinities its own way; give PostgreSQL's spelling back."""
    for ours, theirs in (("nan", "NaN"), ("-inf", "-Infinity"), ("inf", "Infinity")):
        array = pc.if_else(pc.equal(array, ours), theirs, array)
    return array


def json_to_struct(array: pa.Array, target: pa.StructType, column: str) -> pa.Array:
    """Parse JSON object text into a struct array (vectorised through Arrow's JSON reader)."""
    import pyarrow.json as pajson

    valid = pc.is_valid(array)
    present = array.filter(valid)
    if len(present) == 0:
        return pa.nulls(len(array), target)
    body = pc.binary_join(pa.array([present.to_pylist()], pa.list_(pa.string())), "\n")[0].as_py()
    try:
        table = pajson.read_json(
            pa.BufferReader(body.encode("utf-8")),
            parse_options=pajson.ParseOptions(explicit_schema=pa.schema(list(target)), unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"cannot read JSON values as {target}: {exc}", column=column) from None
    parsed = pa.StructArray.from_arrays(
        [table.column(f.name).combine_chunks().cast(f.type) for f in target], fields=list(target)
    )
    positions = pc.subtract(pc.cumulative_sum(pc.cast(valid, pa.int64())), 1)
    indices = pc.if_else(valid, positions, pa.scalar(None, pa.int64()))
    return parsed.take(indices)


# -- writing -------------------------------------------------------------------------------


def adapt_for_ingest(batch: pa.RecordBatch, column_types: dict[str, str]) -> pa.RecordBatch:
    """Give each column the Arrow type the driver's binary COPY writes as the target column's type.

    Strings for jsonb/json become the ``arrow.json`` extension (the driver
    then writes jsonb's binary format); structs and maps become JSON text;
    ``duration`` becomes month_day_nano intervals.
    """
    arrays = []
    fields = []
    changed = False
    for field, array in zip(batch.schema, batch.columns):
        pg_type = column_types.get(field.name, "")
        base = pg_type.split("(")[0].strip()
        new = array
        if base in ("jsonb", "json"):
            if pa.types.is_struct(array.type) or pa.types.is_map(array.type) or pa.types.is_list(array.type):
                new = struct_to_json(array)
            if pa.types.is_large_string(new.type):
                new = new.cast(pa.string())
            if pa.types.is_string(new.type):
                new = pa.ExtensionArray.from_storage(pa.json_(pa.string()), new)
        elif pa.types.is_duration(array.type):
            micros = pc.cast(array.cast(pa.duration("us")), pa.int64())
            new = pa.array(
                [None if m is None else pa.MonthDayNano([0, 0, m * 1000]) for m in micros.to_pylist()],
                pa.month_day_nano_interval(),
            )
        elif pa.types.is_dictionary(array.type):
            new = array.cast(array.type.value_type)
        elif pa.types.is_uint64(array.type) or pa.types.is_uint32(array.type) or pa.types.is_uint16(array.type) or pa.types.is_uint8(array.type):
            new = array.cast({8: pa.int16(), 16: pa.int32(), 32: pa.int64()}.get(array.type.bit_width, pa.decimal128(20, 0)))
        elif pa.types.is_int8(array.type):
            new = array.cast(pa.int16())
        elif pa.types.is_float16(array.type):
            new = array.cast(pa.float32())
        elif pa.types.is_date64(array.type):
            new = array.cast(pa.date32())
        elif pa.types.is_timestamp(array.type) and array.type.unit == "ns":
            new = array.cast(pa.timestamp("us", tz=array.type.tz), safe=False)
        if new is not array:
            changed = True
        arrays.append(new)
        fields.append(pa.field(field.name, new.type, nullable=field.nullable))
    if not changed:
        return batch
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def struct_to_json(array: pa.Array) -> pa.Array:
    """JSON object text for each struct value (vectorised for flat structs, Python for the rest)."""
    if pa.types.is_struct(array.type):
        encoded = _struct_json_vectorised(array)
        if encoded is not None:
            return encoded
    return pa.array([None if v is None else dumps(_jsonable(v)) for v in array.to_pylist()], pa.string())


def _jsonable(value: Any) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], tuple) and len(value[0]) == 2:
        return {str(k): _jsonable(v) for k, v in value}  # a map's (key, value) pairs
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


_NEEDS_PYTHON = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"


def _struct_json_vectorised(array: pa.StructArray) -> pa.Array | None:
    """Encode a struct of strings, integers, booleans and finite floats with Arrow kernels, or None."""
    pieces: list[Any] = []
    for index, field in enumerate(array.type):
        child = array.field(index)
        key = dumps(field.name)
        prefix = ("{" if index == 0 else ", ") + key + ": "
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            if pc.any(pc.fill_null(pc.match_substring_regex(child, _NEEDS_PYTHON), False)).as_py():
                return None
            escaped = pc.replace_substring(child, "\\", "\\\\")
            escaped = pc.replace_substring(escaped, '"', '\\"')
            escaped = pc.replace_substring(escaped, "\n", "\\n")
            escaped = pc.replace_substring(escaped, "\r", "\\r")
            escaped = pc.replace_substring(escaped, "\t", "\\t")
            text = pc.binary_join_element_wise('"', escaped, '"', "")
        elif pa.types.is_boolean(field.type):
            text = pc.if_else(child, "true", "false")
        elif pa.types.is_integer(field.type):
            text = pc.cast(child, pa.string())
        elif pa.types.is_floating(field.type):
            if not pc.all(pc.fill_null(pc.is_finite(child), True)).as_py():
                return None
            text = pc.cast(child, pa.string())
        else:
            return None
        pieces.append(prefix)
        pieces.append(pc.fill_null(text, "null"))
    if not pieces:
        return pc.if_else(pc.is_valid(array), "{}", pa.scalar(None, pa.string()))
    pieces.append("}")
    joined = pc.binary_join_element_wise(*pieces, "")
    # The struct's own nulls stay null (not an object of nulls).
    return pc.if_else(pc.is_valid(array), joined, pa.scalar(None, pa.string()))


# -- errors ----------------------------------------------------------------------------------


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg or ADBC error, when it has one."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and state:
        return state
    match = re.search(r"SQLSTATE: ([0-9A-Z]{5})", str(exc))
    return match.group(1) if match else None


def is_transient(exc: BaseException) -> bool:
    """Whether a retry of the partition can fix ``exc`` (lost connection, deadlock, shutdown...)."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    name = type(exc).__name__
    if name in ("ConnectionDoesNotExistError", "InterfaceError", "ConnectionFailureError", "OperationalError"):
        return True
    state = sqlstate_of(exc)
    if state and any(state.startswith(prefix) for prefix in TRANSIENT_SQLSTATES):
        return True
    text = str(exc).lower()
    return "terminating connection" in text or "server closed the connection" in text or "connection is closed" in text


def translate_error(
    exc: BaseException,
    what: str,
    *,
    locate: Callable[[int], tuple[Any, Any, Any]] | None = None,
) -> FerryError:
    """A Ferry error for a driver error while doing ``what`` (the message says what to do).

    ``locate(line)`` maps a COPY line number to (row key, column value getter, row)
    so a data error names the table, column, row key and value.
    """
    if isinstance(exc, FerryError):
        return exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    state = sqlstate_of(exc)
    if is_transient(exc):
        return TransientBackendError(f"{what}: PostgreSQL connection or transaction failed ({message}); retried per partition")
    if state and state.startswith(DATA_SQLSTATES):
        context = _COPY_CONTEXT.search(str(exc))
        column = context.group("column") if context else None
        row_key = value = None
        table = context.group("table") if context else None
        if context and locate is not None:
            row_key, value = locate(int(context.group("line")), column)
        detail = ""
        match = re.search(r"DETAIL:\s*(.*)", str(exc))
        if match:
            detail = " " + match.group(1).strip()
        where = f" in table {table}" if table else ""
        return DataError(f"{what}: a value does not fit{where}: {message}.{detail}", column=column, value=value, row_key=row_key)
    return PermanentBackendError(f"{what}: {message}")


# -- bridging threads and the event loop -----------------------------------------------------

#: Marks the end of a stream.
END = object()


def settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def next_or_end(iterator: AsyncIterator[pa.RecordBatch]) -> Any:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return END


async def thread_stream(produce) -> AsyncIterator[Any]:
    """Run ``produce(emit)`` in its own thread and yield what it emits (bounded, cancellable).

    ``emit(item)`` blocks the producer while the consumer is two items behind
    and returns False once the consumer has gone, so the producer can stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=2)
    gone = threading.Event()

    def emit(item: Any) -> bool:
        if gone.is_set():
            return False
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                future.result(timeout=0.2)
                return not gone.is_set()
            except concurrent.futures.TimeoutError:
                if gone.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    def run() -> None:
        try:
            produce(emit)
        except BaseException as exc:
            emit(_Failure(exc))
            return
        emit(END)

    thread = threading.Thread(target=run, name="ferry-pg-read", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        gone.set()
        while not queue.empty():
            queue.get_nowait()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
