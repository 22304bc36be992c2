"""SQL of the PostgreSQL record store: the document layout, JSON encoding, and query pushdown.

The layout is the performance guide's: ``id text COLLATE "C" PRIMARY KEY``,
``data jsonb`` (the record's fields), ``metadata jsonb``, ``created_at`` and
``updated_at``, with a GIN index on ``data`` and a btree on ``created_at``.

Pushdown translates a filter subtree only when PostgreSQL gives exactly the
reference evaluator's answer (:mod:`ferry.backends.records_reference`); every
literal travels as a bound parameter (the SQL text depends on the query's
shape only, so asyncpg's per-connection statement cache prepares it once):

* ``eq`` / ``in``: containment ``data @> $1`` / ``data @> ANY($1::jsonb[])``
  (GIN). jsonb equality is exact: numbers numerically, strings byte for byte,
  no conversion across kinds, and a nested array does not contain a scalar;
* ranges, ``between``, ``like`` and ``regex``: a strict jsonpath predicate
  ``data @? 'strict $ ? (@."f" > 1)'`` (GIN-eligible). In strict mode a missing
  field, a null, an array or a value of another kind make the predicate
  unknown, which ``@?`` reports as false; strings compare by code point;
* ``exists``: ``data ? $1`` plus a not-null check.

Every leaf is two-valued (never SQL NULL), so ``and`` / ``or`` / ``not`` map
to SQL directly. Not pushed (evaluated in Python while streaming): literals
that are null, NaN, lists, Decimals, numbers of magnitude 2**53 and
beyond, or strings that read as ISO dates (a stored date
is an object ``{"$date": ...}`` and compares with such strings), and regexes
with ``(?i)`` (PostgreSQL and Python fold non-ASCII case differently).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from decimal import Decimal
from typing import Any, Mapping, Sequence

import orjson

from .filters import And, Comparison, Filter, Not, Or
from .postgres_sql import quote_ident
from .records_query import SortKey
from .records_reference import _ascii_classes, compile_regex  # the reference's own class spelling

__all__ = [
    "Params",
    "can_push",
    "filter_sql",
    "order_sql",
    "other_kind_sql",
    "projection_sql",
    "layout_sql",
    "encode_fields",
    "decode_fields",
    "like_to_are",
    "regex_to_are",
]

DATE_TAG = "$date"
DATETIME_TAG = "$datetime"


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def layout_sql(schema: str, table: str) -> list[str]:
    """DDL of the document layout (idempotent): schema, table, GIN on data, btree on created_at."""
    target = f"{quote_ident(schema)}.{quote_ident(table)}"
    return [
        f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}",
        f"CREATE TABLE IF NOT EXISTS {target} ("
        'id text COLLATE "C" PRIMARY KEY, '
        "data jsonb NOT NULL, "
        "metadata jsonb, "
        "created_at timestamptz NOT NULL DEFAULT now(), "
        "updated_at timestamptz NOT NULL DEFAULT now())",
        f"CREATE INDEX IF NOT EXISTS {quote_ident(_index_name(table, 'data_gin'))} ON {target} USING gin (data)",
        f"CREATE INDEX IF NOT EXISTS {quote_ident(_index_name(table, 'created_at'))} ON {target} (created_at)",
    ]


def _index_name(table: str, suffix: str) -> str:
    name = f"{table}_{suffix}"
    if len(name.encode()) > 63:
        import hashlib

        name = f"{table[:40]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}_{suffix[:10]}"
    return name


def index_name(table: str, suffix: str) -> str:
    """An index name for ``table`` within PostgreSQL's 63 bytes."""
    return _index_name(table, re.sub(r"[^0-9A-Za-z_]+", "_", suffix).strip("_") or "idx")


def text_literal(text: str) -> str:
    """A SQL string literal (for DDL, which takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return {DATETIME_TAG: value.isoformat()}
    if isinstance(value, _dt.date):
        return {DATE_TAG: value.isoformat()}
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("NaN and infinite numbers cannot be stored in PostgreSQL jsonb")
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"a {type(value).__name__} value cannot be stored as JSON; use str, number, bool, date, list or dict")


_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_ENCODER = json.JSONEncoder(default=_default, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME


def encode_fields(fields: Mapping[str, Any]) -> str:
    """JSON text of a record's fields (dates tagged); ValueError/TypeError says why it cannot be stored.

    orjson first (several times faster than ``json``); the standard encoder
    decides whenever orjson refuses a value (e.g. an int beyond 64 bits) or
    the text holds a ``null`` (orjson writes NaN and infinity as null, which
    must fail instead).
    """
    try:
        text = orjson.dumps(fields, default=_default, option=_ORJSON_OPTIONS).decode()
        slow = "null" in text
    except TypeError as exc:
        if "str" in str(exc) and "key" in str(exc):
            raise TypeError(f"field names are strings, got {[k for k in fields if type(k) is not str][:1]}") from None
        slow = True
    if slow:
        for name in fields:
            if type(name) is not str:
                raise TypeError(f"field names are strings, got {name!r}")
        try:
            text = _ENCODER.encode(fields)
        except ValueError as exc:
            if "Out of range float" in str(exc):
                raise ValueError("NaN and infinite numbers cannot be stored in PostgreSQL jsonb") from None
            raise
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate, which is not valid UTF-8") from None
    if _EXPONENT_HINT.search(text):
        text = _TOKENS.sub(_plain_number, text)
    if "\\u0000" in text and _NUL.search(text):
        raise ValueError("PostgreSQL jsonb cannot store the NUL character (\\u0000) in a string")
    return text


# jsonb prints 1.5e+21 as 1500000000000000000000, which would read back as an int: write a
# float with a positive exponent as plain digits with ".0", which jsonb keeps (and reads back as that float).
_EXPONENT_HINT = re.compile(r"\d[eE]\+?\d")
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?[eE]\+?\d+')


def _plain_number(match: re.Match[str]) -> str:
    token = match.group(0)
    if token.startswith('"'):
        return token
    plain = format(Decimal(token), "f")
    return plain if "." in plain else plain + ".0"


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if DATETIME_TAG in obj and isinstance(obj[DATETIME_TAG], str):
            return _dt.datetime.fromisoformat(obj[DATETIME_TAG])
        if DATE_TAG in obj and isinstance(obj[DATE_TAG], str):
            return _dt.date.fromisoformat(obj[DATE_TAG])
    return obj


def decode_fields(text: str | None) -> dict[str, Any]:
    """The fields of a stored JSON text (tagged dates back to date/datetime)."""
    if text is None:
        return {}
    if '"$date' in text:
        return json.loads(text, object_hook=_hook)
    if _BIG_NUMBER.search(text):
        return json.loads(text)  # orjson reads integers beyond 64 bits as floats
    return orjson.loads(text)


_BIG_NUMBER = re.compile(r"\d{19}")


# --------------------------------------------------------------------------
# Pushdown
# --------------------------------------------------------------------------


class Params:
    """Bound parameters of one statement, numbered ``$1, $2, ...``."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any, cast: str | None = None) -> str:
        """Bind ``value`` and return its placeholder (with a cast)."""
        self.values.append(value)
        return f"${len(self.values)}" + (f"::{cast}" if cast else "")


def _date_like(text: str) -> bool:
    try:
        _dt.datetime.fromisoformat(text.strip())
        return True
    except ValueError:
        pass
    try:
        _dt.date.fromisoformat(text.strip())
        return True
    except ValueError:
        return False


#: Beyond this magnitude not every integer is a float: Python compares an int with a float
#: exactly, PostgreSQL compares the float's shortest decimal text, so they could disagree.
_EXACT_FLOAT_INTS = 2**53


def _scalar_ok(value: Any) -> bool:
    """A literal PostgreSQL compares exactly as the reference does.

    Numbers are stored as their shortest decimal text (jsonb numeric). For a
    literal that is exactly a float of magnitude below 2**53 the order of the
    texts is the order of the values, whatever kind the stored number is;
    larger numbers and Decimals (not floats, so 0.1 != Decimal("0.1") in
    Python) are evaluated in Python.
    """
    if isinstance(value, bool):
        return True
    if isinstance(value, str):
        return not _date_like(value)
    if isinstance(value, int):
        return abs(value) <= _EXACT_FLOAT_INTS
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) < _EXACT_FLOAT_INTS
    return False


def can_push(node: Filter) -> bool:
    """Whether :func:`filter_sql` translates ``node`` with exactly the reference evaluator's results."""
    if isinstance(node, (And, Or)):
        return all(can_push(item) for item in node.items)
    if isinstance(node, Not):
        return can_push(node.item)
    if not isinstance(node, Comparison):
        return False
    op, value = node.op, node.value
    if op == "exists":
        return True
    if op in ("in", "not_in"):
        return isinstance(value, (list, tuple)) and all(_scalar_ok(item) for item in value)
    if op == "between":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_scalar_ok(item) for item in value)
    if op == "like":
        return isinstance(value, str)
    if op == "regex":
        return isinstance(value, str) and not value.startswith("(?i)")
    return op in ("eq", "neq", "gt", "gte", "lt", "lte") and _scalar_ok(value)


def filter_sql(node: Filter, params: Params) -> str:
    """A two-valued SQL condition on ``data`` for a filter :func:`can_push` accepted."""
    if isinstance(node, And):
        return "(" + " AND ".join(filter_sql(item, params) for item in node.items) + ")"
    if isinstance(node, Or):
        return "(" + " OR ".join(filter_sql(item, params) for item in node.items) + ")"
    if isinstance(node, Not):
        return f"(NOT {filter_sql(node.item, params)})"
    return _leaf_sql(node, params)


def _json_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _member(column: str) -> str:
    return "@." + json.dumps(column, ensure_ascii=False)


_PATH_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _leaf_sql(node: Comparison, params: Params) -> str:
    column, op, value = node.column, node.op, node.value
    if op == "exists":
        key = params.add(column, "text")
        present = f"(data ? {key} AND jsonb_typeof(data -> {key}) <> 'null')"
        return present if value else f"(NOT {present})"
    if op in ("eq", "neq"):
        test = f"(data @> {params.add(encode_fields({column: value}), 'jsonb')})"
        return test if op == "eq" else f"(NOT {test})"
    if op in ("in", "not_in"):
        options = [encode_fields({column: item}) for item in value]
        test = f"(data @> ANY({params.add(options, 'jsonb[]')}))"
        return test if op == "in" else f"(NOT {test})"
    member = _member(column)
    if op in _PATH_OPS:
        predicate = f"{member} {_PATH_OPS[op]} {_json_literal(value)}"
    elif op == "between":
        low, high = value
        predicate = f"{member} >= {_json_literal(low)} && {member} <= {_json_literal(high)}"
    elif op == "like":
        predicate = f'{member} like_regex {json.dumps(like_to_are(value), ensure_ascii=False)} flag "s"'
    elif op == "regex":
        predicate = f'{member} like_regex {json.dumps(regex_to_are(value), ensure_ascii=False)} flag "s"'
    else:  # pragma: no cover - can_push refuses it
        raise ValueError(f"cannot push operator {op!r}")
    return f"(data @? {params.add(f'strict $ ? ({predicate})', 'jsonpath')})"


_ARE_SPECIAL = set("\\^$.|?*+()[]{}")


def _are_char(char: str) -> str:
    return "\\" + char if char in _ARE_SPECIAL else char


def like_to_are(pattern: str) -> str:
    r"""SQL LIKE as an anchored PostgreSQL regex (used with flag "s": ``.`` matches line breaks)."""
    out = []
    chars = iter(pattern)
    for char in chars:
        if char == "\\":
            out.append(_are_char(next(chars, "\\")))
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(_are_char(char))
    return "^(?:" + "".join(out) + ")$"


def regex_to_are(pattern: str) -> str:
    """A pattern of the common subset as an anchored PostgreSQL regex read like Python's ``re``.

    Used with flag "s" (so ``[^a]`` matches a line break, as in Python);
    ``.`` outside classes becomes ``[^\\n]`` (Python's ``.``), and the Perl
    classes are spelled out as ASCII classes, as the reference does.
    """
    compile_regex(pattern)  # refuses what is outside the subset, with the reference's message
    body = _ascii_classes(pattern)
    out: list[str] = []
    i, n, in_class = 0, len(body), False
    while i < n:
        char = body[i]
        if char == "\\" and i + 1 < n:
            out.append(body[i : i + 2])
            i += 2
            continue
        if not in_class and char == "[":
            in_class = True
            out.append(char)
            i += 1
            for lead in ("^", "]"):
                if body[i : i + 1] == lead:
                    out.append(lead)
                    i += 1
            continue
        if in_class and char == "]":
            in_class = False
        elif not in_class and char == ".":
            char = "[^\\n]"
        out.append(char)
        i += 1
    return "^(?:" + "".join(out) + ")$"


# --------------------------------------------------------------------------
# Sorting and projection
# --------------------------------------------------------------------------


def _rank_sql(value: str) -> str:
    # The reference's kind order: strings < numbers < booleans < dates < datetimes < others; null last.
    return (
        f"(CASE jsonb_typeof({value}) WHEN 'string' THEN 0 WHEN 'number' THEN 1 WHEN 'boolean' THEN 2 "
        f"WHEN 'array' THEN 5 WHEN 'object' THEN (CASE "
        f"WHEN {value} ? '{DATE_TAG}' AND jsonb_typeof({value} -> '{DATE_TAG}') = 'string' "
        f"AND (SELECT count(*) FROM jsonb_object_keys({value})) = 1 THEN 3 "
        f"WHEN {value} ? '{DATETIME_TAG}' AND jsonb_typeof({value} -> '{DATETIME_TAG}') = 'string' "
        f"AND (SELECT count(*) FROM jsonb_object_keys({value})) = 1 THEN 4 ELSE 5 END) END)"
    )


def order_sql(keys: Sequence[SortKey], params: Params) -> str:
    """ORDER BY terms for the sort keys (the reference's order), ties by id."""
    terms: list[str] = []
    for spec in keys:
        key = params.add(spec.field, "text")
        value = f"(data -> {key})"
        kind = f"jsonb_typeof({value})"
        direction = " DESC" if spec.descending else ""
        rank = _rank_sql(value)
        terms.extend(
            [
                rank + direction,
                f"(CASE WHEN {kind} = 'string' THEN (data ->> {key}) END) COLLATE \"C\"{direction}",
                f"(CASE WHEN {kind} = 'number' THEN ({value})::numeric END){direction}",
                f"(CASE WHEN {kind} = 'boolean' THEN ({value})::boolean END){direction}",
                # Only tagged dates (rank 3 / 4) are cast: a dict that merely has the key is not.
                f"(CASE WHEN {rank} = 3 THEN ({value} ->> '{DATE_TAG}')::date END){direction}",
                f"(CASE WHEN {rank} = 4 THEN ({value} ->> '{DATETIME_TAG}')::timestamptz END){direction}",
            ]
        )
    terms.append('id COLLATE "C"')
    return ", ".join(terms)


def other_kind_sql(keys: Sequence[SortKey], params: Params) -> str:
    """True for a row whose sort field PostgreSQL cannot order as the reference does.

    Lists and dicts (the reference orders them by their Python text), and
    numbers of magnitude 2**53 and beyond (Python orders an int and a float
    by their exact values, jsonb by the float's shortest decimal text).
    """
    tests = []
    for spec in keys:
        value = f"(data -> {params.add(spec.field, 'text')})"
        tests.append(f"{_rank_sql(value)} = 5")
        tests.append(
            f"(jsonb_typeof({value}) = 'number' AND abs(({value})::numeric) >= {_EXACT_FLOAT_INTS})"
        )
    return "(" + " OR ".join(tests) + ")"


def projection_sql(select: Sequence[str], params: Params) -> str:
    """The selected fields a record has, as a jsonb object (the whole ``data`` is never sent)."""
    names = params.add(list(select), "text[]")
    return f"COALESCE((SELECT jsonb_object_agg(key, value) FROM jsonb_each(data) WHERE key = ANY({names})), '{{}}'::jsonb)"
