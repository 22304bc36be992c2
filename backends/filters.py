"""One filter model for a job's ``where`` (pushed down to stores) and the ``filter`` transform.

A filter is parsed from YAML/dict data with :func:`parse_filter` into small
frozen dataclasses (:class:`Comparison`, :class:`And`, :class:`Or`,
:class:`Not`) and evaluated on Arrow data with :func:`evaluate` or
:func:`filter_batch`.

Syntax
------
Canonical forms::

    {column: amount, op: gt, value: 10}
    {and: [<filter>, ...]}
    {or: [<filter>, ...]}
    {not: <filter>}

Compact leaf forms (one key, the column name)::

    {amount: {gt: 10}}            # same as {column: amount, op: gt, value: 10}
    {amount: {gte: 1, lt: 5}}     # several operators -> and of each
    {status: active}              # a plain value means eq

Operators: eq, neq, gt, gte, lt, lte, in, not_in, like, regex, exists, between.
``in``/``not_in`` take a list, ``between`` a two-item list ``[low, high]``
(inclusive both ends), ``exists`` takes ``true`` (default) or ``false``.
A null literal is refused for comparisons: "is null" is spelled
``exists: false``.

Semantics
---------
Every leaf yields a non-null boolean per row, so ``and``/``or``/``not`` are
plain two-valued logic (no SQL three-valued surprises such as ``not`` of an
unknown staying unknown):

* a null value, and a column missing from the batch, never match eq, gt,
  gte, lt, lte, like, regex, between and in;
* they always match neq and not_in;
* ``exists: true`` matches present, non-null values; ``exists: false``
  matches null or missing.

``like`` is SQL LIKE, case-sensitive, with ``%`` (any run of characters) and
``_`` (one character). ``regex`` uses RE2 syntax and is anchored: the whole
value must match (the pattern is wrapped as ``^(?:...)$``). Strings compare
by Unicode code point. A missing column is not an error in :func:`evaluate`
(it is treated as all-null); callers that want to refuse typos check
:meth:`Filter.columns` against the schema.

Literals are converted to the column's type before comparing
(:func:`coerce_literal`): ISO-8601 strings for timestamp columns (a naive
literal against a time-zone-aware column is read as UTC, an offset-aware
literal against a naive column is converted to UTC), ``YYYY-MM-DD`` for date
columns, numbers or numeric strings for decimal and numeric columns.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from ferry.backends.errors import ConfigurationError

__all__ = [
    "OPERATORS",
    "Filter",
    "Comparison",
    "And",
    "Or",
    "Not",
    "parse_filter",
    "evaluate",
    "filter_batch",
    "coerce_literal",
]

#: Every operator a leaf may use, in the order error messages list them.
OPERATORS: tuple[str, ...] = (
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "like",
    "regex",
    "exists",
    "between",
)

# Operators for which a null value (or a missing column) counts as a match.
_NULL_MATCHES = frozenset({"neq", "not_in"})

_COMPARE_FUNCTIONS = {
    "eq": pc.equal,
    "neq": pc.not_equal,
    "gt": pc.greater,
    "gte": pc.greater_equal,
    "lt": pc.less,
    "lte": pc.less_equal,
}

_COMBINATORS = ("and", "or", "not")
_LEAF_KEYS = frozenset({"column", "op", "value"})


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


class Filter:
    """Base class of the filter nodes; use :func:`parse_filter` to build one."""

    __slots__ = ()

    def columns(self) -> set[str]:
        """Names of every column the filter reads."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Canonical, JSON-serializable form (stable: equal filters give equal dicts)."""
        raise NotImplementedError

    def evaluate(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        """Shortcut for :func:`evaluate(self, batch) <evaluate>`."""
        return evaluate(self, batch)


@dataclass(frozen=True)
class Comparison(Filter):
    """A leaf: ``column <op> value``.

    ``value`` is normalized to JSON-friendly Python values: lists become
    tuples, dates/datetimes become ISO-8601 strings and ``Decimal`` becomes a
    string, so that ``to_dict()`` is stable and ``parse_filter(f.to_dict()) == f``.
    ``path`` only serves error messages and is ignored by equality.
    """

    column: str
    op: str
    value: Any = None
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.path or "filter"
        if not isinstance(self.column, str) or not self.column:
            raise ConfigurationError("expected a non-empty column name", path=where)
        if self.op not in OPERATORS:
            raise ConfigurationError(_unknown_operator(self.op), path=where)
        value = True if self.op == "exists" and self.value is None else self.value
        object.__setattr__(self, "value", _checked_value(self.op, value, path=where))

    def columns(self) -> set[str]:
        return {self.column}

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"column": self.column, "op": self.op, "value": value}


@dataclass(frozen=True)
class And(Filter):
    """True where every item is true (true for an empty list)."""

    items: tuple[Filter, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _filters_tuple(self.items))

    def columns(self) -> set[str]:
        return set().union(*(item.columns() for item in self.items))

    def to_dict(self) -> dict[str, Any]:
        return {"and": [item.to_dict() for item in self.items]}


@dataclass(frozen=True)
class Or(Filter):
    """True where at least one item is true (false for an empty list)."""

    items: tuple[Filter, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _filters_tuple(self.items))

    def columns(self) -> set[str]:
        return set().union(*(item.columns() for item in self.items))

    def to_dict(self) -> dict[str, Any]:
        return {"or": [item.to_dict() for item in self.items]}


@dataclass(frozen=True)
class Not(Filter):
    """True where the item is false (leaves never yield null, so this is exact)."""

    item: Filter

    def __post_init__(self) -> None:
        if not isinstance(self.item, Filter):
            raise TypeError(f"Not() expects a Filter, got {type(self.item).__name__}")

    def columns(self) -> set[str]:
        return self.item.columns()

    def to_dict(self) -> dict[str, Any]:
        return {"not": self.item.to_dict()}


def _filters_tuple(items: Iterable[Filter]) -> tuple[Filter, ...]:
    items = tuple(items)
    for item in items:
        if not isinstance(item, Filter):
            raise TypeError(f"expected Filter items, got {type(item).__name__}")
    return items


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse_filter(data: Any, *, source: str | None = None, path: str = "where") -> Filter:
    """Build a :class:`Filter` from YAML/dict data.

    Raises :class:`ConfigurationError` naming the field path (for example
    ``where.and[1].op``) and what was expected there.
    """
    try:
        return _parse(data, path)
    except ConfigurationError as exc:
        if source is None or exc.source is not None:
            raise
        # Re-raise with the file name so the one-line message points at it.
        raise ConfigurationError(exc.message, source=source, path=exc.path) from None


def _parse(data: Any, path: str) -> Filter:
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"expected a filter mapping such as {{column: amount, op: gt, value: 10}}, "
            f"{{and: [...]}} or {{amount: {{gt: 10}}}}, got {_describe(data)}",
            path=path,
        )
    if not data:
        raise ConfigurationError("expected a filter, got an empty mapping", path=path)
    if "column" in data or "op" in data:
        return _parse_canonical_leaf(data, path)
    if len(data) != 1:
        keys = ", ".join(repr(str(k)) for k in data)
        raise ConfigurationError(
            f"a compact filter has exactly one key (the column name), got {keys}; "
            "combine several conditions with and: [...]",
            path=path,
        )
    ((key, value),) = data.items()
    if key in ("and", "or"):
        if not isinstance(value, list) or not value:
            raise ConfigurationError(
                f"expected a non-empty list of filters, got {_describe(value)}", path=f"{path}.{key}"
            )
        items = tuple(_parse(item, f"{path}.{key}[{i}]") for i, item in enumerate(value))
        return And(items) if key == "and" else Or(items)
    if key == "not":
        return Not(_parse(value, f"{path}.not"))
    return _parse_compact_leaf(key, value, path)


def _parse_canonical_leaf(data: dict, path: str) -> Filter:
    extra = sorted(str(k) for k in data if k not in _LEAF_KEYS)
    if extra:
        raise ConfigurationError(
            f"unexpected key(s) {', '.join(map(repr, extra))}; a leaf has column, op and value",
            path=path,
        )
    column = data.get("column")
    if not isinstance(column, str) or not column:
        raise ConfigurationError(
            f"expected a non-empty column name, got {_describe(column)}", path=f"{path}.column"
        )
    if "op" not in data:
        raise ConfigurationError(f"missing op; expected one of: {', '.join(OPERATORS)}", path=path)
    op = data["op"]
    if op not in OPERATORS:
        raise ConfigurationError(_unknown_operator(op), path=f"{path}.op")
    if "value" not in data and op != "exists":
        raise ConfigurationError(f"missing value for operator {op}", path=path)
    value = data.get("value", True)
    value = _checked_value(op, value, path=f"{path}.value")
    return Comparison(column, op, value, path=path)


def _parse_compact_leaf(column: Any, spec: Any, path: str) -> Filter:
    if not isinstance(column, str) or not column:
        raise ConfigurationError(f"expected a column name as key, got {_describe(column)}", path=path)
    leaf_path = f"{path}.{column}"
    if isinstance(spec, list):
        raise ConfigurationError(
            f"a list needs an operator, e.g. {{{column}: {{in: [...]}}}}", path=leaf_path
        )
    if not isinstance(spec, dict):
        # {status: active} means eq.
        return Comparison(column, "eq", _checked_value("eq", spec, path=leaf_path), path=leaf_path)
    if not spec:
        raise ConfigurationError(
            f"expected {{operator: value}}, got an empty mapping; operators: {', '.join(OPERATORS)}",
            path=leaf_path,
        )
    leaves = []
    for op, value in spec.items():
        if op not in OPERATORS:
            raise ConfigurationError(_unknown_operator(op), path=leaf_path)
        op_path = f"{leaf_path}.{op}"
        value = _checked_value(op, True if op == "exists" and value is None else value, path=op_path)
        leaves.append(Comparison(column, op, value, path=op_path))
    return leaves[0] if len(leaves) == 1 else And(tuple(leaves))


def _unknown_operator(op: Any) -> str:
    return f"unknown operator {op!r}; expected one of: {', '.join(OPERATORS)}"


def _checked_value(op: str, value: Any, *, path: str) -> Any:
    """Validate ``value`` for ``op`` and normalize it (lists -> tuples, dates -> ISO strings)."""
    if op == "exists":
        if not isinstance(value, bool):
            raise ConfigurationError(f"exists takes true or false, got {_describe(value)}", path=path)
        return value
    if op in ("in", "not_in"):
        if not isinstance(value, (list, tuple)):
            raise ConfigurationError(
                f"{op} takes a list of values, e.g. [a, b], got {_describe(value)}", path=path
            )
        return tuple(_scalar(item, op, path=f"{path}[{i}]") for i, item in enumerate(value))
    if op == "between":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigurationError(
                f"between takes a list of 2 values [low, high], got {_describe(value)}", path=path
            )
        return tuple(_scalar(item, op, path=f"{path}[{i}]") for i, item in enumerate(value))
    value = _scalar(value, op, path=path)
    if op in ("like", "regex") and not isinstance(value, str):
        raise ConfigurationError(f"{op} takes a string pattern, got {_describe(value)}", path=path)
    if op == "regex":
        _check_regex(value, path)
    return value


def _scalar(value: Any, op: str, *, path: str) -> Any:
    if value is None:
        raise ConfigurationError(
            f"{op} cannot compare with null (nothing equals null); "
            "use {exists: false} to match missing values",
            path=path,
        )
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (_dt.date, _dt.datetime)):  # YAML turns unquoted dates into these
        return value.isoformat()
    raise ConfigurationError(
        f"expected a string, number, boolean or date, got {_describe(value)}", path=path
    )


def _check_regex(pattern: str, path: str) -> None:
    # Compile once with RE2 on a one-row array: syntax errors surface at parse
    # time instead of on the first batch.
    try:
        pc.match_substring_regex(pa.array([""], pa.string()), _anchored(pattern))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ConfigurationError(f"invalid regex {pattern!r} (RE2 syntax): {exc}", path=path) from None


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------
# Literal coercion
# --------------------------------------------------------------------------


def coerce_literal(
    value: Any,
    arrow_type: pa.DataType,
    *,
    column: str,
    path: str | None = None,
    source: str | None = None,
) -> pa.Scalar:
    """Convert a filter/expression literal into a scalar comparable with ``arrow_type``.

    Numbers against numeric columns are left to Arrow's own type promotion
    (so ``int8_col > 1000`` and ``int_col > 1.5`` compare exactly); strings
    are parsed for timestamp, date, decimal, numeric and boolean columns.
    Raises :class:`ConfigurationError` naming the column and the value when
    the literal cannot be converted.
    """
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if value is None:
        return pa.scalar(None, arrow_type)
    try:
        return _coerce(value, arrow_type)
    except (
        pa.ArrowInvalid,
        pa.ArrowNotImplementedError,
        pa.ArrowTypeError,
        ValueError,
        TypeError,
        OverflowError,
        InvalidOperation,
    ) as exc:
        raise ConfigurationError(
            f"cannot compare column {column!r} ({arrow_type}) with {value!r}: {exc}",
            source=source,
            path=path,
        ) from None


def _coerce(value: Any, arrow_type: pa.DataType) -> pa.Scalar:
    if pa.types.is_timestamp(arrow_type):
        return _timestamp_literal(value, arrow_type)
    if pa.types.is_date(arrow_type):
        return _date_literal(value, arrow_type)
    if pa.types.is_decimal(arrow_type):
        return pa.scalar(_decimal(value))
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return pa.scalar(_number(value))
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        if isinstance(value, str):
            return pa.scalar(value, arrow_type)
    if pa.types.is_boolean(arrow_type) and isinstance(value, bool):
        return pa.scalar(value)
    # Anything else: let Arrow's safe cast decide (e.g. 'true' -> bool, 5 -> '5').
    return pa.scalar(value).cast(arrow_type)


def _number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Decimal):
        value = str(value)
    if isinstance(value, str):
        parsed = Decimal(value.strip())
        if parsed.is_finite() and parsed == parsed.to_integral_value():
            return int(parsed)
        return float(parsed)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, float):
        value = repr(value)  # shortest round-trip text: 0.1 -> '0.1', not 0.1000000000000000055...
    if isinstance(value, (int, str, Decimal)):
        result = Decimal(str(value).strip())
        if not result.is_finite():
            raise ValueError("a decimal must be finite")
        return result
    raise TypeError(f"expected a number or numeric string, got {type(value).__name__}")


def _timestamp_literal(value: Any, arrow_type: pa.TimestampType) -> pa.Scalar:
    if isinstance(value, str):
        try:
            # Arrow's own parser keeps nanoseconds; it only accepts an offset
            # when the column has a time zone, hence the fallback below.
            return pa.scalar(value.strip()).cast(arrow_type)
        except pa.ArrowInvalid:
            moment = _dt.datetime.fromisoformat(value.strip())
    elif isinstance(value, _dt.datetime):
        moment = value
    elif isinstance(value, _dt.date):
        moment = _dt.datetime(value.year, value.month, value.day)
    else:
        raise TypeError("expected an ISO-8601 timestamp string")
    if arrow_type.tz is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    elif arrow_type.tz is None and moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    # Python datetimes carry microseconds; a safe cast refuses to drop digits
    # a seconds/milliseconds column cannot hold.
    return pa.scalar(moment, pa.timestamp("us", tz=arrow_type.tz)).cast(arrow_type)


def _date_literal(value: Any, arrow_type: pa.DataType) -> pa.Scalar:
    if isinstance(value, str):
        day = _dt.date.fromisoformat(value.strip())
    elif isinstance(value, _dt.datetime):
        if value.time() != _dt.time(0):
            raise ValueError("a date column compares with a date, not a time of day")
        day = value.date()
    elif isinstance(value, _dt.date):
        day = value
    else:
        raise TypeError("expected a date string 'YYYY-MM-DD'")
    return pa.scalar(day, pa.date32()).cast(arrow_type)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(filter: Filter, batch: pa.RecordBatch | pa.Table) -> pa.BooleanArray:
    """Row mask of ``filter`` on ``batch``: one non-null boolean per row.

    Vectorized with ``pyarrow.compute``; a missing column is treated as all-null.
    Raises :class:`ConfigurationError` when a literal does not fit its column
    or an operator does not apply to the column's type.
    """
    result = _evaluate(filter, batch, batch.num_rows)
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    return result


def filter_batch(batch: pa.RecordBatch, filter: Filter) -> pa.RecordBatch:
    """The rows of ``batch`` for which ``filter`` is true, in their original order."""
    return batch.filter(evaluate(filter, batch))


def _evaluate(node: Filter, batch, n: int):
    if isinstance(node, Comparison):
        return _evaluate_leaf(node, batch, n)
    if isinstance(node, And):
        result = _constant(n, True)
        for item in node.items:
            result = pc.and_(result, _evaluate(item, batch, n))
        return result
    if isinstance(node, Or):
        result = _constant(n, False)
        for item in node.items:
            result = pc.or_(result, _evaluate(item, batch, n))
        return result
    if isinstance(node, Not):
        return pc.invert(_evaluate(node.item, batch, n))
    raise TypeError(f"not a filter: {node!r}")


def _constant(n: int, value: bool) -> pa.BooleanArray:
    return pa.repeat(value, n)


def _column(batch, name: str):
    index = batch.schema.get_field_index(name)
    if index < 0:
        return None
    array = batch.column(index)
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    return array


def _evaluate_leaf(node: Comparison, batch, n: int):
    array = _column(batch, node.column)
    if node.op == "exists":
        if array is None:
            return _constant(n, not node.value)
        present = pc.is_valid(array)
        return present if node.value else pc.invert(present)
    if array is None or pa.types.is_null(array.type):
        return _constant(n, node.op in _NULL_MATCHES)
    try:
        raw = _compare(node, array)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ConfigurationError(
            f"operator {node.op} does not apply to column {node.column!r} of type {array.type}: {exc}",
            path=node.path,
        ) from None
    # Comparison kernels return null for null inputs; turn those into the
    # documented two-valued answer.
    return pc.fill_null(raw, node.op in _NULL_MATCHES)


def _compare(node: Comparison, array):
    op, value = node.op, node.value
    literal = lambda v: coerce_literal(v, array.type, column=node.column, path=node.path)  # noqa: E731
    if op in _COMPARE_FUNCTIONS:
        return _COMPARE_FUNCTIONS[op](array, literal(value))
    if op == "between":
        low, high = literal(value[0]), literal(value[1])
        return pc.and_(pc.greater_equal(array, low), pc.less_equal(array, high))
    if op in ("in", "not_in"):
        matched = pc.is_in(array, value_set=_value_set(node, array.type), skip_nulls=True)
        return pc.invert(matched) if op == "not_in" else matched
    # like / regex
    if not _is_text(array.type):
        raise ConfigurationError(
            f"{op} needs a string column; column {node.column!r} is {array.type}", path=node.path
        )
    if op == "like":
        return pc.match_like(array, value)
    return pc.match_substring_regex(array, _anchored(value))


def _value_set(node: Comparison, arrow_type: pa.DataType) -> pa.Array:
    scalars = []
    for item in node.value:
        scalar = coerce_literal(item, arrow_type, column=node.column, path=node.path)
        try:
            scalars.append(scalar.cast(arrow_type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            # Converted fine but not representable in the column's type
            # (1.5 or 1000 for an int8 column): it can never be equal, skip it.
            continue
    return pa.array(scalars, type=arrow_type)


def _is_text(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or getattr(pa.types, "is_string_view", lambda t: False)(arrow_type)
    )



def columns_to_read(columns: list[str] | None, where: Filter | None, available: list[str] | None = None) -> list[str] | None:
    """The columns a read must fetch: the selected ones plus those ``where`` tests.

    ``None`` means all columns. Filter columns the source lacks (``available``)
    are left out: the evaluator treats them as null.
    """
    if columns is None:
        return None
    extra = sorted(where.columns() - set(columns)) if where is not None else []
    if available is not None:
        extra = [c for c in extra if c in available]
    return list(columns) + extra
