"""How the object-store record store turns records into Parquet rows and back.

Every row of a record file has the fixed columns

* ``id`` (string), ``stamp`` (string: the write's ``<nanoseconds>-<writer>``,
  which orders the versions of an id), ``deleted`` (bool: a tombstone);
* ``fields`` and ``metadata``: the record as JSON text, the exact source of
  truth: ints stay ints (any size), floats keep every bit (NaN and infinity
  included), ``Decimal``, ``date`` and ``datetime`` are tagged objects
  (``{"$decimal": "1.10"}``, ``{"$date": ...}``, ``{"$datetime": ...}``),
  and a user's dict that looks like a tag is escaped, so nothing is reserved;
  a field set to null stays null and a missing field stays missing;

and, for filter pushdown, typed copies of the top-level field values:
``s.<field>`` (strings), ``n.<field>`` (numbers that float64 holds exactly),
``b.<field>`` (booleans) and ``o.<field>`` (true where the value is anything
else: a list, dict, date, Decimal, NaN, an int float64 cannot hold...). A
file types at most ``max_typed_fields`` field names; a row with a field
beyond that has ``unshredded`` true. Pushdown treats ``o.*`` and
``unshredded`` as "unknown" and lets those rows through to the reference
evaluator (:mod:`ferry.backends.records_objectstore_pushdown`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from decimal import Decimal
from typing import Any, Mapping, Sequence

import orjson
import pyarrow as pa

from .errors import ConfigurationError
from .records_model import Record, RecordError, batch_item

__all__ = [
    "ID",
    "STAMP",
    "DELETED",
    "FIELDS",
    "METADATA",
    "UNSHREDDED",
    "typed_columns",
    "encode",
    "decode",
    "build_table",
    "FILE_METADATA",
    "prepare_record",
    "record_from_row",
]

ID, STAMP, DELETED, FIELDS, METADATA, UNSHREDDED = "id", "stamp", "deleted", "fields", "metadata", "unshredded"
#: Key-value metadata of every record file (the layout's version).
FILE_METADATA = {b"ferry.records.layout": b"1"}

STRING, NUMBER, BOOLEAN, OTHER = "s.", "n.", "b.", "o."

_DATE, _DATETIME, _DECIMAL, _MAP = "$date", "$datetime", "$decimal", "$map"
_TAGS = frozenset({_DATE, _DATETIME, _DECIMAL, _MAP})


def typed_columns(field: str) -> dict[str, pa.DataType]:
    """The pushdown columns of one top-level field and their types."""
    return {STRING + field: pa.string(), NUMBER + field: pa.float64(), BOOLEAN + field: pa.bool_(), OTHER + field: pa.bool_()}


# --------------------------------------------------------------------------
# JSON text
# --------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, _dt.date):
        return {_DATE: value.isoformat()}
    if isinstance(value, Decimal):
        return {_DECIMAL: str(value)}
    if isinstance(value, (set, frozenset, bytes, bytearray)):
        raise TypeError(f"a {type(value).__name__} value cannot be stored; use a list or a string")
    raise TypeError(f"a {type(value).__name__} value cannot be stored; use str, number, bool, date, list or dict")


def _escaped(value: Any) -> Any:
    """``value`` with every dict checked (string keys) and tag-like dicts escaped (slow path only)."""
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                raise TypeError(f"field names and dict keys are strings, got {key!r}")
        items = {key: _escaped(item) for key, item in value.items()}
        if len(items) == 1 and next(iter(items)) in _TAGS:
            # A user's {"$date": ...} must not read back as a date: stored as pairs.
            return {_MAP: [[key, item] for key, item in items.items()]}
        return items
    if isinstance(value, (list, tuple)):
        return [_escaped(item) for item in value]
    return value


_SEPARATORS = (",", ":")


def _has_non_finite(fields: Mapping[str, Any]) -> bool:
    """Whether orjson's ``null`` may stand for a NaN/infinity (it writes them as null)."""
    for value in fields.values():
        if type(value) is float and (value != value or value in (float("inf"), float("-inf"))):
            return True
        if isinstance(value, (dict, list, tuple)):
            return True  # not worth walking: the exact encoder decides
    return False


def encode(fields: Mapping[str, Any]) -> str:
    """Exact JSON text of a record's fields (or metadata); TypeError/ValueError say why it cannot be stored.

    orjson first; the standard encoder (with NaN/Infinity tokens, ASCII
    escapes for lone surrogates and tag escaping) whenever orjson refuses a
    value (an int beyond 64 bits, a lone surrogate), wrote a null that could
    be a NaN, or the text holds something that looks like a tag.
    """
    try:
        raw = orjson.dumps(fields, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
        slow = b'"$' in raw or (b"null" in raw and _has_non_finite(fields))
    except TypeError:  # orjson.JSONEncodeError: the exact encoder says what is wrong, or stores it
        slow = True
    if not slow:
        return raw.decode()
    value = _escaped(dict(fields))
    text = json.dumps(value, default=_default, separators=_SEPARATORS, ensure_ascii=False, allow_nan=True)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: \ud800 escapes read back exactly
        text = json.dumps(value, default=_default, separators=_SEPARATORS, ensure_ascii=True, allow_nan=True)
    return text


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        key, value = next(iter(obj.items()))
        if key == _DATETIME and isinstance(value, str):
            return _dt.datetime.fromisoformat(value)
        if key == _DATE and isinstance(value, str):
            return _dt.date.fromisoformat(value)
        if key == _DECIMAL and isinstance(value, str):
            return Decimal(value)
        if key == _MAP and isinstance(value, list):
            return {pair[0]: pair[1] for pair in value}
    return obj


# orjson reads integers beyond 64 bits as floats and knows no NaN/Infinity tokens.
_NEEDS_STDLIB = re.compile(r"\d{19}|NaN|Infinity")


def decode(text: str | None) -> dict[str, Any]:
    """The fields (or metadata) stored as ``text`` (None: empty)."""
    if text is None:
        return {}
    if '"$' in text:
        return json.loads(text, object_hook=_hook)
    if _NEEDS_STDLIB.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # an escaped lone surrogate, which only the standard decoder reads back
        return json.loads(text)


# --------------------------------------------------------------------------
# Rows -> Arrow table
# --------------------------------------------------------------------------

#: A row to write: (id, fields or None for a tombstone, fields JSON or None, metadata JSON or None).
Row = tuple[str, "Mapping[str, Any] | None", "str | None", "str | None"]


def build_table(rows: Sequence[Row], stamp: str, max_typed_fields: int) -> pa.Table:
    """One file's table: the fixed columns and the typed copies of the top-level fields."""
    count = len(rows)
    strings: dict[str, dict[int, str]] = {}
    numbers: dict[str, dict[int, float]] = {}
    booleans: dict[str, dict[int, bool]] = {}
    others: dict[str, dict[int, bool]] = {}
    typed: set[str] = set()
    unshredded: list[bool] = [False] * count
    any_unshredded = False
    for index, (_id, fields, _text, _meta) in enumerate(rows):
        if not fields:
            continue
        for name, value in fields.items():
            if name not in typed:
                if len(typed) >= max_typed_fields:
                    unshredded[index] = any_unshredded = True
                    continue
                typed.add(name)
            kind = type(value)
            if kind is str:
                strings.setdefault(name, {})[index] = value
            elif kind is bool:
                booleans.setdefault(name, {})[index] = value
            elif kind is int:
                if -(2**53) <= value <= 2**53:
                    numbers.setdefault(name, {})[index] = float(value)
                else:
                    exact = _exact_float(value)
                    if exact is None:
                        others.setdefault(name, {})[index] = True
                    else:
                        numbers.setdefault(name, {})[index] = exact
            elif kind is float:
                if value == value:
                    numbers.setdefault(name, {})[index] = value
                else:  # NaN matches nothing; the reference evaluator says so
                    others.setdefault(name, {})[index] = True
            elif value is not None:
                others.setdefault(name, {})[index] = True
    columns: dict[str, pa.Array] = {
        ID: pa.array([row[0] for row in rows], pa.string()),
        STAMP: pa.array([stamp] * count, pa.string()),
        DELETED: pa.array([row[1] is None for row in rows], pa.bool_()),
        FIELDS: pa.array([row[2] for row in rows], pa.string()),
        METADATA: pa.array([row[3] for row in rows], pa.string()),
    }
    if any_unshredded:
        columns[UNSHREDDED] = pa.array(unshredded, pa.bool_())
    for name in sorted(strings):
        values = strings[name]
        try:
            array = pa.array([values.get(i) for i in range(count)], pa.string())
        except (UnicodeEncodeError, pa.ArrowInvalid):
            # Lone surrogates have no UTF-8 form: those values are "other" (the JSON keeps them).
            good: dict[int, str] = {}
            for i, text in values.items():
                if _utf8(text):
                    good[i] = text
                else:
                    others.setdefault(name, {})[i] = True
            array = pa.array([good.get(i) for i in range(count)], pa.string())
        columns[STRING + name] = array
    for name in sorted(numbers):
        values = numbers[name]
        columns[NUMBER + name] = pa.array([values.get(i) for i in range(count)], pa.float64())
    for name in sorted(booleans):
        values = booleans[name]
        columns[BOOLEAN + name] = pa.array([values.get(i) for i in range(count)], pa.bool_())
    for name in sorted(others):
        values = others[name]
        columns[OTHER + name] = pa.array([values.get(i) for i in range(count)], pa.bool_())
    return pa.table(columns)


def _exact_float(value: int) -> float | None:
    """``float(value)`` when it is exactly ``value``, else None."""
    try:
        converted = float(value)
    except OverflowError:
        return None
    return converted if converted == value else None


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


def record_from_row(record_id: str, fields: str | None, metadata: str | None) -> Record:
    """The Record of a stored row."""
    record = Record.__new__(Record)
    record.id = record_id
    record.fields = decode(fields)
    record.metadata = decode(metadata) if metadata else {}
    return record


#: ``(index, id or None, fields, fields JSON, metadata JSON)`` of a record to write.
Prepared = tuple[int, "str | None", dict, str, "str | None"]


def prepare_record(index: int, item: Any, *, pairs: bool) -> Prepared | RecordError:
    """``(index, id or None, fields, fields JSON, metadata JSON)`` of one item, or why it cannot be stored."""
    try:
        record_id, record = batch_item(item, pairs=pairs)
        fields = record.fields
        text = encode(fields)
        metadata = encode(record.metadata) if record.metadata else None
        return (index, record_id, fields, text, metadata)
    except ConfigurationError as exc:
        return RecordError(index, exc.message, None)
    except (TypeError, ValueError, RecursionError) as exc:
        record_id = None
        try:
            record_id = item.storage_id() if isinstance(item, Record) else None
        except Exception:
            pass
        return RecordError(index, f"this record cannot be stored: {exc}", record_id)
