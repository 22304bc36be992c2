"""Transform steps on Arrow batches: pure functions, no Prefect and no I/O.

A job's ``transforms`` is a list of single-key mappings, parsed by
:func:`parse_steps` and run in order by a :class:`TransformChain`::

    transforms:
      - select: [id, amount, created]
      - rename: {amount: amount_text}
      - drop: [debug]
      - cast: {amount_text: 'decimal(12,2)', created: 'timestamp[us, tz=UTC]'}
      - filter: {amount_text: {gt: 0}}
      - derive: {amount_eur: 'round(amount_text * 0.92, 2)'}
      - python: mypkg.hooks:clean
        api: pandas            # or arrow (the default)

Failure handling: a cast, an expression or a python hook that fails on some
rows never drops or corrupts them silently. With ``on_error='fail'`` the
chain raises :class:`DataError` naming the step, the column, an example value
and the input row. With ``on_error='collect'`` the failing step is retried on
halves of the batch, recursively down to single rows (about ``bad * log2(n)``
calls, valid because every step treats rows independently): the good rows go
on, in their original order, and each bad row becomes one row of
``TransformResult.rejects``. When nothing fails, each step is one vectorized
call on the whole batch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa

from ferry.backends.errors import ConfigurationError, DataError, FerryError
from ferry.backends.filters import Filter, evaluate, parse_filter
from ferry.tasks.expressions import Expr, evaluate_expression, first_failing_row, parse_expression

__all__ = [
    "STEP_NAMES",
    "REJECTS_SCHEMA",
    "Step",
    "SelectStep",
    "RenameStep",
    "DropStep",
    "CastStep",
    "FilterStep",
    "DeriveStep",
    "PythonStep",
    "parse_steps",
    "TransformChain",
    "TransformResult",
]

#: Valid step names, in the order error messages list them.
STEP_NAMES: tuple[str, ...] = ("select", "rename", "drop", "cast", "filter", "derive", "python")

#: Columns of :attr:`TransformResult.rejects`, one row per rejected input row.
REJECTS_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),  # index of the row in the batch given to apply()
        ("step", pa.string()),  # step kind: cast, derive, python, ...
        ("column", pa.string()),
        ("value", pa.string()),  # str() of the offending value; null when unknown
        ("reason", pa.string()),
        ("error_class", pa.string()),  # class of the underlying exception
    ]
)

ON_ERROR_MODES = ("fail", "collect")


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Base class of transform steps.

    ``apply(batch)`` returns the transformed batch. It raises
    :class:`DataError` for a failure caused by row values (which the chain
    may isolate by bisection) and :class:`ConfigurationError` for one that no
    row could avoid (a missing column, a type mismatch).
    """

    kind: ClassVar[str] = "step"
    index: int = field(default=0, kw_only=True)
    path: str = field(default="transforms", kw_only=True, compare=False)
    source: str | None = field(default=None, kw_only=True, compare=False, repr=False)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        raise NotImplementedError

    def run(self, batch: pa.RecordBatch, rows: pa.Array) -> tuple[pa.RecordBatch, pa.Array]:
        """Apply the step and carry the input row indexes along (``rows`` matches ``batch``)."""
        return self.apply(batch), rows

    def config_error(self, message: str, *, suffix: str | None = None) -> ConfigurationError:
        path = f"{self.path}.{suffix}" if suffix else self.path
        return ConfigurationError(message, source=self.source, path=path)

    def require(self, schema: pa.Schema, names) -> None:
        """Refuse references to columns the batch does not have."""
        for name in names:
            if schema.get_field_index(name) < 0:
                available = ", ".join(schema.names) or "(none)"
                raise self.config_error(
                    f"step {self.index} ({self.kind}): no column {name!r}; available columns: {available}"
                )


@dataclass(frozen=True)
class SelectStep(Step):
    """Keep only ``columns``, in that order."""

    kind: ClassVar[str] = "select"
    columns: tuple[str, ...] = ()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.require(batch.schema, self.columns)
        return batch.select(list(self.columns))


@dataclass(frozen=True)
class DropStep(Step):
    """Remove ``columns``."""

    kind: ClassVar[str] = "drop"
    columns: tuple[str, ...] = ()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.require(batch.schema, self.columns)
        dropped = set(self.columns)
        return batch.select([name for name in batch.schema.names if name not in dropped])


@dataclass(frozen=True)
class RenameStep(Step):
    """Rename columns: ``mapping`` holds (old, new) pairs, applied simultaneously."""

    kind: ClassVar[str] = "rename"
    mapping: tuple[tuple[str, str], ...] = ()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        renames = dict(self.mapping)
        self.require(batch.schema, renames)
        names = [renames.get(name, name) for name in batch.schema.names]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise self.config_error(
                f"step {self.index} (rename): the result would have duplicate column(s) {', '.join(map(repr, duplicates))}"
            )
        return batch.rename_columns(names)


@dataclass(frozen=True)
class CastStep(Step):
    """Cast columns to Arrow types with ``safe=True`` (no overflow, no truncation).

    ``casts`` holds (column, type text, Arrow type) triples.
    """

    kind: ClassVar[str] = "cast"
    casts: tuple[tuple[str, str, pa.DataType], ...] = ()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.require(batch.schema, [name for name, _, _ in self.casts])
        for name, text, target in self.casts:
            index = batch.schema.get_field_index(name)
            array = batch.column(index)
            if array.type == target:
                continue
            try:
                converted = array.cast(target, safe=True)
            except pa.ArrowInvalid as exc:
                raise _data_error(
                    f"cannot cast column {name!r} from {array.type} to {text}: {exc}",
                    column=name,
                    value=array[0].as_py() if len(array) == 1 else None,
                ) from exc
            except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise self.config_error(
                    f"cannot cast column {name!r} from {array.type} to {text}: {exc}", suffix=name
                ) from None
            batch = _set_column(batch, index, name, converted)
        return batch


@dataclass(frozen=True)
class FilterStep(Step):
    """Keep the rows for which ``filter`` is true (see :mod:`ferry.backends.filters`)."""

    kind: ClassVar[str] = "filter"
    filter: Filter | None = None

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return self.run(batch, _row_numbers(batch.num_rows))[0]

    def run(self, batch: pa.RecordBatch, rows: pa.Array) -> tuple[pa.RecordBatch, pa.Array]:
        # Unlike `where`, a filter step knows its schema: a missing column is a typo.
        self.require(batch.schema, sorted(self.filter.columns()))
        try:
            mask = evaluate(self.filter, batch)
        except ConfigurationError as exc:
            raise self.config_error(exc.message) from None
        return batch.filter(mask), rows.filter(mask)


@dataclass(frozen=True)
class DeriveStep(Step):
    """Compute columns from expressions, in order.

    ``items`` holds (name, expression) pairs. Each expression sees the
    columns derived before it in the same step. An existing name is replaced
    in place; a new one is appended.
    """

    kind: ClassVar[str] = "derive"
    items: tuple[tuple[str, Expr], ...] = ()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for name, expr in self.items:
            try:
                array = evaluate_expression(expr, batch, explain=False)
            except ConfigurationError as exc:
                raise self.config_error(exc.message, suffix=name) from None
            except DataError as exc:
                raise _data_error(
                    f"cannot derive {name!r}: {_reason(exc)}", column=name, value=exc.value
                ) from exc
            index = batch.schema.get_field_index(name)
            if index >= 0:
                batch = _set_column(batch, index, name, array)
            else:
                batch = batch.append_column(pa.field(name, array.type), array)
        return batch


@dataclass(frozen=True)
class PythonStep(Step):
    """Call a user hook ``module:function`` on each batch.

    With ``api='arrow'`` the hook gets and returns a ``pyarrow.RecordBatch``;
    with ``api='pandas'`` a ``pandas.DataFrame`` (converted back without the
    index). The hook is called once on an empty batch per input schema to
    learn its output schema; every later result is cast (safely) to that
    schema, so a hook must return the same columns for every batch.
    """

    kind: ClassVar[str] = "python"
    ref: str = ""
    api: str = "arrow"
    function: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)
    # Output schema per input schema, learnt from an empty batch (see expected_schema).
    _schemas: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        expected = self.expected_schema(batch.schema)
        return self._conform(self._call(batch), expected)

    def run(self, batch: pa.RecordBatch, rows: pa.Array) -> tuple[pa.RecordBatch, pa.Array]:
        result = self.apply(batch)
        if result.num_rows != batch.num_rows:
            # The hook dropped or added rows: which input row each one comes
            # from is unknown, so later rejects get a null row_index.
            rows = pa.nulls(result.num_rows, pa.int64())
        return result, rows

    def expected_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The hook's output schema for ``input_schema``, learnt from an empty batch."""
        schema = self._schemas.get(input_schema)
        if schema is None:
            try:
                schema = self._call(_empty_batch(input_schema)).schema
            except DataError as exc:
                raise self.config_error(
                    f"python hook {self.ref} failed on an empty batch (it is called once without "
                    f"rows to learn its output schema; hooks must accept empty batches): {_reason(exc)}"
                ) from exc
            self._schemas[input_schema] = schema
        return schema

    def _call(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        argument = batch.to_pandas() if self.api == "pandas" else batch
        try:
            result = self.function(argument)
        except FerryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any hook failure becomes a data error
            raise _data_error(f"python hook {self.ref} raised {type(exc).__name__}: {exc}") from exc
        if self.api == "pandas":
            return self._from_pandas(result, batch.schema)
        if isinstance(result, pa.Table):
            return _table_to_batch(result)
        if not isinstance(result, pa.RecordBatch):
            raise self.config_error(
                f"python hook {self.ref} must return a pyarrow.RecordBatch, got {type(result).__name__}"
            )
        return result

    def _from_pandas(self, frame: Any, input_schema: pa.Schema) -> pa.RecordBatch:
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            raise self.config_error(
                f"python hook {self.ref} (api: pandas) must return a pandas.DataFrame, got {type(frame).__name__}"
            )
        try:
            # Same conversion as pa.RecordBatch.from_pandas(df, preserve_index=False);
            # going through a Table also works for empty frames of pandas'
            # Arrow-backed string dtype, which RecordBatch.from_pandas rejects.
            batch = _table_to_batch(pa.Table.from_pandas(frame, preserve_index=False))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise _data_error(f"python hook {self.ref} returned a DataFrame Arrow cannot convert: {exc}") from exc
        batch = batch.replace_schema_metadata(None)  # drop pandas' per-batch metadata
        # pandas turns string columns into large_string; give untouched
        # names their input type back so a pandas hook keeps the schema.
        for index, name in enumerate(batch.schema.names):
            position = input_schema.get_field_index(name)
            if position < 0:
                continue
            wanted, actual = input_schema.field(position).type, batch.schema.field(index).type
            if (wanted, actual) in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
                batch = _set_column(batch, index, name, batch.column(index).cast(wanted))
        return batch

    def _conform(self, batch: pa.RecordBatch, expected: pa.Schema) -> pa.RecordBatch:
        if batch.schema.equals(expected):
            return batch
        if sorted(batch.schema.names) != sorted(expected.names):
            raise self.config_error(
                f"python hook {self.ref} returned columns {batch.schema.names}, but on an empty batch "
                f"it returned {expected.names}; a hook must return the same columns for every batch"
            )
        arrays = []
        for target in expected:
            array = batch.column(batch.schema.get_field_index(target.name))
            if array.type != target.type:
                if not _same_family(array.type, target.type):
                    # Not about row values: the hook's types are not stable
                    # (typically pandas typing an empty object column).
                    raise self.config_error(
                        f"python hook {self.ref} returned column {target.name!r} as {array.type}, but as "
                        f"{target.type} on an empty batch; give it an explicit type in the hook "
                        "(e.g. .astype('string') or .astype('Int64') in pandas)"
                    )
                try:
                    array = array.cast(target.type, safe=True)
                except pa.ArrowInvalid as exc:
                    raise _data_error(
                        f"python hook {self.ref} returned column {target.name!r} as {array.type}, "
                        f"which does not convert to {target.type} (its type on an empty batch): {exc}",
                        column=target.name,
                        value=array[0].as_py() if len(array) == 1 else None,
                    ) from exc
                except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    raise self.config_error(
                        f"python hook {self.ref} returned column {target.name!r} as {array.type}, but as "
                        f"{target.type} on an empty batch: {exc}"
                    ) from None
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, schema=expected)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse_steps(raw: list | None, *, source: str | None = None, path: str = "transforms") -> list[Step]:
    """Validate the job's ``transforms`` list and build the steps.

    Column names are checked later, against the real schema, by
    :meth:`TransformChain.output_schema`. Raises :class:`ConfigurationError`
    with the field path (``transforms[2].cast.amount``) on anything invalid,
    including a python hook that cannot be imported.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigurationError(f"expected a list of steps, got {_describe(raw)}", source=source, path=path)
    steps = []
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        if not isinstance(item, dict) or not item:
            raise ConfigurationError(
                f"expected a single-key mapping such as {{select: [a, b]}}, got {_describe(item)}; "
                f"steps: {', '.join(STEP_NAMES)}",
                source=source,
                path=item_path,
            )
        name = "python" if "python" in item else next(iter(item))
        allowed = {"python", "api"} if name == "python" else {name}
        extra = [str(key) for key in item if key not in allowed]
        if name not in STEP_NAMES or extra:
            unknown = name if name not in STEP_NAMES else extra[0]
            raise ConfigurationError(
                f"unknown step {unknown!r}; expected one of: {', '.join(STEP_NAMES)} "
                "(one per list item; 'api' only goes with 'python')",
                source=source,
                path=item_path,
            )
        context = {"index": index, "path": f"{item_path}.{name}", "source": source}
        steps.append(_PARSERS[name](item, context))
    return steps


def _parse_select(item: dict, ctx: dict) -> Step:
    return SelectStep(columns=_names(item["select"], ctx), **ctx)


def _parse_drop(item: dict, ctx: dict) -> Step:
    return DropStep(columns=_names(item["drop"], ctx), **ctx)


def _parse_rename(item: dict, ctx: dict) -> Step:
    mapping = _mapping(item["rename"], ctx, "{old_name: new_name}")
    pairs = []
    for old, new in mapping.items():
        if not isinstance(new, str) or not new:
            raise _config(ctx, f"expected a new column name, got {_describe(new)}", suffix=str(old))
        pairs.append((str(old), new))
    news = [new for _, new in pairs]
    if len(set(news)) != len(news):
        raise _config(ctx, "two columns are renamed to the same name")
    return RenameStep(mapping=tuple(pairs), **ctx)


def _parse_cast(item: dict, ctx: dict) -> Step:
    from ferry.backends.types import parse_arrow_type  # lazy: written separately

    casts = []
    for name, text in _mapping(item["cast"], ctx, "{column: 'type name'}").items():
        where = f"{ctx['path']}.{name}"
        if not isinstance(text, str):
            raise _config(ctx, f"expected a type name such as 'int64', got {_describe(text)}", suffix=str(name))
        try:
            target = parse_arrow_type(text)
        except ConfigurationError as exc:
            raise ConfigurationError(exc.message, source=ctx["source"], path=where) from None
        casts.append((str(name), text, target))
    return CastStep(casts=tuple(casts), **ctx)


def _parse_filter(item: dict, ctx: dict) -> Step:
    return FilterStep(filter=parse_filter(item["filter"], source=ctx["source"], path=ctx["path"]), **ctx)


def _parse_derive(item: dict, ctx: dict) -> Step:
    items = []
    for name, text in _mapping(item["derive"], ctx, "{new_column: 'expression'}").items():
        if not isinstance(text, str):
            raise _config(ctx, f"expected an expression string (quote it), got {_describe(text)}", suffix=str(name))
        expr = parse_expression(text, source=ctx["source"], path=f"{ctx['path']}.{name}")
        items.append((str(name), expr))
    return DeriveStep(items=tuple(items), **ctx)


def _parse_python(item: dict, ctx: dict) -> Step:
    ref, api = item["python"], item.get("api", "arrow")
    if api not in ("arrow", "pandas"):
        raise ConfigurationError(
            f"expected api: arrow or api: pandas, got {api!r}",
            source=ctx["source"],
            path=ctx["path"].rsplit(".", 1)[0] + ".api",
        )
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise _config(ctx, f"expected 'package.module:function', got {ref!r}")
    module_name, attribute = ref.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise _config(ctx, f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- a broken hook module is a configuration problem
        raise _config(ctx, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _config(ctx, f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _config(ctx, f"{ref} is not callable")
    return PythonStep(ref=ref, api=api, function=target, **ctx)


_PARSERS: dict[str, Callable[[dict, dict], Step]] = {
    "select": _parse_select,
    "rename": _parse_rename,
    "drop": _parse_drop,
    "cast": _parse_cast,
    "filter": _parse_filter,
    "derive": _parse_derive,
    "python": _parse_python,
}


def _names(value: Any, ctx: dict) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _config(ctx, f"expected a non-empty list of column names, got {_describe(value)}")
    for position, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise _config(ctx, f"expected a column name, got {_describe(name)}", suffix=f"[{position}]")
    duplicates = sorted({name for name in value if value.count(name) > 1})
    if duplicates:
        raise _config(ctx, f"column(s) listed twice: {', '.join(map(repr, duplicates))}")
    return tuple(value)


def _mapping(value: Any, ctx: dict, example: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise _config(ctx, f"expected a non-empty mapping {example}, got {_describe(value)}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise _config(ctx, f"expected column names as keys, got {_describe(key)}")
    return value


def _config(ctx: dict, message: str, *, suffix: str | None = None) -> ConfigurationError:
    path = ctx["path"] if suffix is None else (
        f"{ctx['path']}{suffix}" if suffix.startswith("[") else f"{ctx['path']}.{suffix}"
    )
    return ConfigurationError(message, source=ctx["source"], path=path)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformResult:
    """What :meth:`TransformChain.apply` returns.

    ``batch`` holds the good rows, transformed, in input order and conforming
    to :meth:`TransformChain.output_schema`; ``rejects`` is ``None`` or a
    table with :data:`REJECTS_SCHEMA`, one row per rejected input row.
    """

    batch: pa.RecordBatch
    rejects: pa.Table | None = None

    @property
    def rejected_count(self) -> int:
        """Number of rejected rows."""
        return 0 if self.rejects is None else self.rejects.num_rows


class TransformChain:
    """Runs parsed steps on batches; ``on_error`` is ``'fail'`` or ``'collect'``."""

    def __init__(self, steps: list[Step], *, on_error: str = "fail"):
        if on_error not in ON_ERROR_MODES:
            raise ConfigurationError(
                f"expected on_error: fail or on_error: collect, got {on_error!r}", path="on_error"
            )
        self.steps: tuple[Step, ...] = tuple(steps)
        self.on_error = on_error

    @property
    def is_identity(self) -> bool:
        """True when the chain has no steps and returns batches unchanged."""
        return not self.steps

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """Schema of the batches :meth:`apply` returns for input of ``input_schema``.

        Runs the chain on an empty batch of that schema; a reference to a
        missing column raises :class:`ConfigurationError` naming the step
        and listing the columns available there.
        """
        batch = _empty_batch(input_schema)
        for step in self.steps:
            try:
                batch = step.apply(batch)
            except DataError as exc:
                raise step.config_error(f"fails even without rows: {_reason(exc)}") from exc
        return batch.schema

    def apply(self, batch: pa.RecordBatch) -> TransformResult:
        """Transform ``batch``; see the module docstring for failure handling."""
        if self.is_identity:
            return TransformResult(batch)
        rows = _row_numbers(batch.num_rows)
        rejects: list[dict[str, Any]] = []
        for step in self.steps:
            try:
                batch, rows = step.run(batch, rows)
            except DataError as exc:
                self._ensure_row_level(step, batch, exc)
                if self.on_error == "fail":
                    raise self._explain(step, batch, rows, exc) from exc
                batch, rows = self._isolate(step, batch, rows, rejects)
        table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA) if rejects else None
        return TransformResult(batch, table)

    # -- failure path ---------------------------------------------------------

    def _ensure_row_level(self, step: Step, batch: pa.RecordBatch, exc: DataError) -> None:
        # A step that fails without any row is broken for every row: stop
        # instead of rejecting the whole batch one row at a time.
        try:
            step.apply(_empty_batch(batch.schema))
        except DataError as empty_exc:
            raise step.config_error(f"fails even without rows: {_reason(empty_exc)}") from exc

    def _explain(self, step: Step, batch: pa.RecordBatch, rows: pa.Array, exc: DataError) -> DataError:
        position = first_failing_row(step.apply, batch)
        input_row = None
        if position is not None:
            try:
                step.apply(batch.slice(position, 1))
            except DataError as single:
                exc = single
            input_row = rows[position].as_py()
        where = f" on input row {input_row}" if input_row is not None else ""
        return DataError(f"{step.path} failed{where}: {_reason(exc)}", column=exc.column, value=exc.value)

    def _isolate(
        self, step: Step, batch: pa.RecordBatch, rows: pa.Array, rejects: list[dict[str, Any]]
    ) -> tuple[pa.RecordBatch, pa.Array]:
        pieces: list[tuple[pa.RecordBatch, pa.Array]] = []
        self._split(step, batch, rows, rejects, pieces)
        if not pieces:  # every row was rejected
            return step.apply(_empty_batch(batch.schema)), pa.array([], pa.int64())
        batches = [piece for piece, _ in pieces]
        return _concat_batches(batches), pa.concat_arrays([piece_rows for _, piece_rows in pieces])

    def _split(self, step, batch, rows, rejects, pieces) -> None:
        """``batch`` is known to fail: retry each half, recursively, down to single rows."""
        if batch.num_rows == 1:
            try:
                pieces.append(step.run(batch, rows))  # an isolated row may pass on its own
            except DataError as exc:
                rejects.append(_reject(step, exc, rows[0].as_py()))
            return
        middle = batch.num_rows // 2
        for start, length in ((0, middle), (middle, batch.num_rows - middle)):
            part, part_rows = batch.slice(start, length), rows.slice(start, length)
            try:
                pieces.append(step.run(part, part_rows))
            except DataError:
                self._split(step, part, part_rows, rejects, pieces)


def _reject(step: Step, exc: DataError, row_index: int | None) -> dict[str, Any]:
    cause: BaseException = exc
    while cause.__cause__ is not None:  # report the root cause: ArrowInvalid, ValueError, ...
        cause = cause.__cause__
    return {
        "row_index": row_index,
        "step": step.kind,
        "column": exc.column,
        "value": None if exc.value is None else str(exc.value),
        "reason": _reason(exc),
        "error_class": type(cause).__name__,
    }


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _data_error(reason: str, *, column: str | None = None, value: Any = None) -> DataError:
    err = DataError(reason, column=column, value=value)
    err.reason = reason  # the message without the (column, value) suffix, for rejects
    return err


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc)


_FAMILIES = (
    lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
    lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    pa.types.is_timestamp,
    pa.types.is_date,
    pa.types.is_boolean,
)


def _same_family(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a hook's per-batch type may be cast to its empty-batch type.

    pandas legitimately varies within a family (int64 becomes float64 when a
    batch has nulls); an all-null column (type null) fits anything.
    """
    if pa.types.is_null(actual):
        return True
    return any(family(actual) and family(expected) for family in _FAMILIES)


def _row_numbers(count: int) -> pa.Array:
    return pa.array(np.arange(count, dtype=np.int64))


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


def _set_column(batch: pa.RecordBatch, index: int, name: str, array: pa.Array) -> pa.RecordBatch:
    arrays = list(batch.columns)
    arrays[index] = array
    fields = list(batch.schema)
    fields[index] = pa.field(name, array.type)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def _table_to_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    if not batches:
        return _empty_batch(table.schema)
    if len(batches) == 1:
        return batches[0]
    return _concat_batches(batches)


def _concat_batches(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    if hasattr(pa, "concat_batches"):  # pyarrow >= 19
        return pa.concat_batches(batches)
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
