"""A job's ``where`` as Elasticsearch / OpenSearch ``bool.filter`` clauses.

The pushed query must never drop a row that the reference evaluator
(:mod:`ferry.backends.filters`) keeps; the reader always applies
``filter_batch`` to what comes back, so a pushed query may keep too much but
never too little. Hence only what the index answers exactly (or as a
superset) is pushed:

* string columns mapped as ``keyword`` (or ``text`` with a ``keyword``
  sub-field, no ``ignore_above``): ``eq``/``in`` as ``term``/``terms``,
  ``neq``/``not_in`` as ``must_not`` (a missing value matches both, as in the
  evaluator), ranges (keyword order is UTF-8 byte order, which is code point
  order), ``like`` as ``wildcard`` and a simple ``regex`` as ``regexp``;
* integer columns (``long``, ``integer``, ``short``, ``byte``) with integer
  literals: ``term``/``terms``/``range``;
* boolean columns: ``term``;
* timestamp and date columns: ``range`` on epoch milliseconds, widened to
  whole milliseconds (the index keeps milliseconds, Arrow microseconds);
* ``exists`` on any scalar column.

Floats are not pushed (NaN and infinities are kept in ``_source`` but not
indexed), nor decimals (``scaled_float`` rounds), nor list columns (a term
matches any element). ``and`` pushes the children it can, ``or`` only when
every branch is pushed; ``not`` is not pushed.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pyarrow as pa

from .filters import And, Comparison, Filter, Or, coerce_literal

_INTEGER_ES = {"long", "integer", "short", "byte"}
_SIMPLE_REGEX = re.compile(r"[\w .*+?|()\[\]-]*")


def to_query(where: Filter | None, schema: pa.Schema, properties: dict[str, Any]) -> dict[str, Any] | None:
    """A ``bool.filter`` query keeping at least the rows ``where`` keeps, or None (push nothing)."""
    if where is None:
        return None
    clause = _node(where, schema, properties)
    if clause is None:
        return None
    return {"bool": {"filter": [clause]}}


def _node(node: Filter, schema: pa.Schema, properties: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(node, Comparison):
        return _leaf(node, schema, properties)
    if isinstance(node, And):
        parts = [p for p in (_node(i, schema, properties) for i in node.items) if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {"bool": {"filter": parts}}
    if isinstance(node, Or):
        parts = [_node(i, schema, properties) for i in node.items]
        if not parts or any(p is None for p in parts):
            return None
        return {"bool": {"should": parts, "minimum_should_match": 1}}
    return None


def _field_name(column: str, properties: dict[str, Any]) -> tuple[str, str] | None:
    """(field to query, its mapping type) for a top-level column, or None."""
    spec = properties.get(column)
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type", "object")
    if kind == "keyword":
        if "ignore_above" in spec or spec.get("index") is False:
            return None
        return column, "keyword"
    if kind == "text":
        sub = (spec.get("fields") or {}).get("keyword")
        if isinstance(sub, dict) and sub.get("type") == "keyword" and "ignore_above" not in sub:
            return f"{column}.keyword", "keyword"
        return None
    if spec.get("index") is False:
        return None
    return column, kind


def _leaf(node: Comparison, schema: pa.Schema, properties: dict[str, Any]) -> dict[str, Any] | None:
    index = schema.get_field_index(node.column)
    if index < 0:
        return None
    arrow_type = schema.field(index).type
    if pa.types.is_nested(arrow_type):
        return None
    target = _field_name(node.column, properties)
    if target is None:
        return None
    field, kind = target
    if node.op == "exists":
        clause = {"exists": {"field": field}}
        return clause if node.value else {"bool": {"must_not": [clause]}}
    if kind == "keyword" and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
        return _keyword(node, field)
    if kind in _INTEGER_ES and pa.types.is_integer(arrow_type):
        return _integer(node, field)
    if kind == "boolean" and pa.types.is_boolean(arrow_type):
        if node.op == "eq" and isinstance(node.value, bool):
            return {"term": {field: node.value}}
        return None
    if kind in ("date", "date_nanos") and (pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type)):
        return _date(node, field, arrow_type)
    return None


def _keyword(node: Comparison, field: str) -> dict[str, Any] | None:
    op, value = node.op, node.value
    strings = all(isinstance(v, str) for v in (value if isinstance(value, tuple) else (value,)))
    if not strings:
        return None
    clause = _exact_clause(op, field, value)
    if clause is not None:
        return clause
    if op == "like":
        return {"wildcard": {field: {"value": _like_to_wildcard(value)}}}
    if op == "regex" and _SIMPLE_REGEX.fullmatch(value) and "\\" not in value:
        return {"regexp": {field: {"value": value}}}
    return None


def _like_to_wildcard(pattern: str) -> str:
    """SQL LIKE (``%``, ``_``, ``\\`` escapes, as Arrow's match_like) as a Lucene wildcard."""
    out = []
    chars = iter(pattern)
    for char in chars:
        if char == "\\":
            literal = next(chars, "\\")
            out.append("\\" + literal if literal in "*?\\" else literal)
        elif char == "%":
            out.append("*")
        elif char == "_":
            out.append("?")
        elif char in "*?":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _integer(node: Comparison, field: str) -> dict[str, Any] | None:
    op, value = node.op, node.value
    items = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return _exact_clause(op, field, value)


def _exact_clause(op: str, field: str, value: Any) -> dict[str, Any] | None:
    """term / terms / range clauses for comparisons whose values the field holds exactly."""
    if op == "eq":
        return {"term": {field: value}}
    if op == "neq":
        return {"bool": {"must_not": [{"term": {field: value}}]}}
    if op == "in":
        return {"terms": {field: list(value)}}
    if op == "not_in":
        return {"bool": {"must_not": [{"terms": {field: list(value)}}]}}
    if op in ("gt", "gte", "lt", "lte"):
        return {"range": {field: {op: value}}}
    if op == "between":
        return {"range": {field: {"gte": value[0], "lte": value[1]}}}
    return None


def _epoch_ms(value: Any, arrow_type: pa.DataType, column: str) -> float | None:
    try:
        scalar = coerce_literal(value, arrow_type, column=column)
    except Exception:
        return None
    if pa.types.is_date(arrow_type):
        return scalar.cast(pa.date32()).value * 86_400_000.0
    micros = scalar.cast(pa.timestamp("us", tz=arrow_type.tz)).value
    return micros / 1000.0


def _date(node: Comparison, field: str, arrow_type: pa.DataType) -> dict[str, Any] | None:
    op, value = node.op, node.value
    if op in ("gt", "gte"):
        low = _epoch_ms(value, arrow_type, node.column)
        return None if low is None else {"range": {field: {"gte": math.floor(low), "format": "epoch_millis"}}}
    if op in ("lt", "lte"):
        high = _epoch_ms(value, arrow_type, node.column)
        return None if high is None else {"range": {field: {"lte": math.ceil(high), "format": "epoch_millis"}}}
    if op in ("eq", "between"):
        low_value, high_value = (value, value) if op == "eq" else value
        low = _epoch_ms(low_value, arrow_type, node.column)
        high = _epoch_ms(high_value, arrow_type, node.column)
        if low is None or high is None:
            return None
        return {"range": {field: {"gte": math.floor(low), "lte": math.ceil(high), "format": "epoch_millis"}}}
    return None
