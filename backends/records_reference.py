"""The reference evaluator of record queries, in plain Python (docs/records.md, "Semantics").

Every record store must return exactly what :func:`run_query` returns for
the same records and query: the same ids, in the same order. The memory
store uses these functions directly; other stores push what they can down
and are checked against this module by the record contract suite.

Records have no schema, so unlike a typed Arrow column a literal is never
converted to text or number: a value matches a literal only when both are
of the same kind (numbers -- int, float, Decimal, not bool -- compare with
numbers, strings with strings, booleans with booleans). The one conversion
is for date and time values: an ISO-8601 literal is parsed to compare with
a ``datetime`` / ``date`` value (a naive literal against an aware value is
read as UTC, an aware literal against a naive value is converted to UTC, as
:func:`ferry.backends.filters.coerce_literal` does).

Null semantics are the filter model's: a null or missing field never
matches eq, gt, gte, lt, lte, between, in, like or regex and always matches
neq and not_in; ``exists`` is the only presence test. A value of another
kind than the literal behaves like a null (no match, except for neq and
not_in) -- this is also how PostgreSQL's jsonb containment and jsonpath
behave, so the stores can push those operators down.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import math
import re
from decimal import Decimal
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .errors import ConfigurationError
from .filters import And, Comparison, Filter, Not, Or
from .records_query import Query, SortKey

__all__ = [
    "compile_filter",
    "matches",
    "like_to_regex",
    "compile_regex",
    "sort_key",
    "order_items",
    "project",
    "run_query",
    "split_filter",
]

Predicate = Callable[[Mapping[str, Any]], bool]

# Kinds, in the order mixed kinds sort in (PostgreSQL jsonb's order: string < number < boolean).
_STRING, _NUMBER, _BOOLEAN, _DATE, _DATETIME, _OTHER = range(6)


def _kind(value: Any) -> int:
    if isinstance(value, str):
        return _STRING
    if isinstance(value, bool):
        return _BOOLEAN
    if isinstance(value, (int, float, Decimal)):
        return _NUMBER
    if isinstance(value, _dt.datetime):
        return _DATETIME
    if isinstance(value, _dt.date):
        return _DATE
    return _OTHER


# --------------------------------------------------------------------------
# Literals
# --------------------------------------------------------------------------


def _literal_for(value: Any, literal: Any) -> Any:
    """``literal`` made comparable with ``value``, or ``_NO`` when their kinds differ."""
    kind = _kind(value)
    if kind == _OTHER:
        return _NO
    if kind == _DATETIME:
        return _datetime_literal(literal, value.tzinfo is not None)
    if kind == _DATE:
        return _date_literal(literal)
    if _kind(literal) != kind:
        return _NO
    if kind == _NUMBER and (_is_nan(literal) or _is_nan(value)):
        return _NO  # NaN equals nothing and orders with nothing
    return literal


class _NoMatch:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no match>"


_NO = _NoMatch()


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value) or isinstance(value, Decimal) and value.is_nan()


@lru_cache(maxsize=1024)
def _parse_datetime(text: str) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _datetime_literal(literal: Any, aware: bool) -> Any:
    if not isinstance(literal, str):
        return _NO
    moment = _parse_datetime(literal)
    if moment is None:
        return _NO
    if aware and moment.tzinfo is None:
        return moment.replace(tzinfo=_dt.timezone.utc)
    if not aware and moment.tzinfo is not None:
        return moment.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return moment


def _date_literal(literal: Any) -> Any:
    if not isinstance(literal, str):
        return _NO
    try:
        return _dt.date.fromisoformat(literal.strip())
    except ValueError:
        return _NO


# --------------------------------------------------------------------------
# like and regex
# --------------------------------------------------------------------------


@lru_cache(maxsize=512)
def like_to_regex(pattern: str) -> re.Pattern[str]:
    r"""SQL LIKE as an anchored Python regex: ``%`` any run, ``_`` one character, ``\`` escapes."""
    out = []
    chars = iter(pattern)
    for char in chars:
        if char == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
    # DOTALL: % and _ match line breaks too, as in SQL.
    return re.compile("".join(out), re.DOTALL)


# Constructs RE2 accepts but Python's re reads differently or refuses; outside the subset.
_OUTSIDE_SUBSET = re.compile(r"\\[pPQEzCAZbBGKRX]|\\[0-9]")


@lru_cache(maxsize=512)
def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile an anchored regex of the documented common subset (docs/records.md).

    The subset: literals and escaped metacharacters, ``.``, classes ``[...]``
    / ``[^...]`` with ranges, ``\\d``, ``\\w``, ``\\s`` and their negations
    (ASCII classes, as in RE2), ``* + ? {n} {n,} {n,m}`` and their lazy forms,
    ``|``, groups ``( )`` and ``(?: )``, and a leading ``(?i)``. Anything else
    raises ConfigurationError: stores would not agree on it.
    """
    flags = 0
    body = pattern
    if body.startswith("(?i)"):
        flags, body = re.IGNORECASE, body[4:]
    if _OUTSIDE_SUBSET.search(body) or "(?" in body.replace("(?:", "") or _has_anchor(body):
        raise ConfigurationError(
            f"regex {pattern!r} uses a construct outside the common subset every store agrees on "
            "(no anchors ^ $, \\b, \\A, \\z, \\p{..}, \\Q..\\E, backreferences, lookarounds, named groups, "
            "or flags other than a leading (?i)); patterns are anchored already -- see docs/records.md",
            path="query.filter",
        )
    try:
        return re.compile(f"(?:{_ascii_classes(body)})", flags)
    except re.error as exc:
        raise ConfigurationError(f"invalid regex {pattern!r}: {exc}", path="query.filter") from None


# RE2's Perl classes are ASCII-only; Python's are Unicode-aware, so spell them out.
_CLASS_BODIES = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\f\\r "}


def _ascii_classes(pattern: str) -> str:
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            letter = pattern[i + 1]
            if letter.lower() in _CLASS_BODIES:
                members = _CLASS_BODIES[letter.lower()]
                if letter.islower():
                    out.append(members if in_class else f"[{members}]")
                elif in_class:
                    raise ConfigurationError(
                        f"\\{letter} inside [...] is outside the common regex subset; write the negated class out",
                        path="query.filter",
                    )
                else:
                    out.append(f"[^{members}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if not in_class and char == "[":
            in_class = True
            out.append(char)
            i += 1
            for lead in ("^", "]"):
                if pattern[i : i + 1] == lead:
                    out.append(lead)
                    i += 1
            continue
        if in_class and char == "]":
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def _has_anchor(pattern: str) -> bool:
    """Whether ``pattern`` has an unescaped ``^`` or ``$`` outside a character class."""
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # a leading ']' is a member, not the end
                i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif char in "^$":
            return True
        i += 1
    return False


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


def compile_filter(node: Filter | None) -> Predicate:
    """A function ``fields -> bool`` implementing ``node`` (None: always true)."""
    if node is None:
        return lambda fields: True
    if isinstance(node, Comparison):
        return _compile_leaf(node)
    if isinstance(node, And):
        items = [compile_filter(item) for item in node.items]
        return lambda fields: all(item(fields) for item in items)
    if isinstance(node, Or):
        items = [compile_filter(item) for item in node.items]
        return lambda fields: any(item(fields) for item in items)
    if isinstance(node, Not):
        item = compile_filter(node.item)
        return lambda fields: not item(fields)
    raise TypeError(f"not a filter: {node!r}")


def split_filter(
    node: Filter | None, can_push: Callable[[Filter], bool]
) -> tuple[Filter | None, Filter | None]:
    """Split ``node`` into ``(pushed, residual)`` with ``node == pushed and residual``.

    For a store's pushdown: ``can_push(subtree)`` says whether the store
    translates that subtree with exactly this module's results. A top-level
    ``and`` is split item by item; anything else is pushed whole or not at
    all. The store filters with ``pushed`` and evaluates ``residual`` (with
    :func:`compile_filter`) on what comes back, while streaming.
    """
    if node is None:
        return None, None
    if can_push(node):
        return node, None
    if isinstance(node, And):
        pushed = [item for item in node.items if can_push(item)]
        rest = [item for item in node.items if not can_push(item)]
        return _and_of(pushed), _and_of(rest)
    return None, node


def _and_of(items: list[Filter]) -> Filter | None:
    if not items:
        return None
    return items[0] if len(items) == 1 else And(tuple(items))


def matches(node: Filter | None, fields: Mapping[str, Any]) -> bool:
    """Whether a record's fields match ``node``."""
    return compile_filter(node)(fields)


def _compile_leaf(node: Comparison) -> Predicate:
    column, op, literal = node.column, node.op, node.value
    if op == "exists":
        wanted = bool(literal)
        return lambda fields: (fields.get(column) is not None) == wanted
    test = _value_test(op, literal)
    null_result = op in ("neq", "not_in")

    def leaf(fields: Mapping[str, Any]) -> bool:
        value = fields.get(column)
        if value is None:
            return null_result
        return test(value)

    return leaf


def _value_test(op: str, literal: Any) -> Callable[[Any], bool]:
    if op in ("eq", "neq"):
        negate = op == "neq"

        def equal(value: Any) -> bool:
            lit = _literal_for(value, literal)
            return (lit is not _NO and value == lit) != negate

        return equal
    if op in ("gt", "gte", "lt", "lte"):
        compare = _ORDERINGS[op]

        def ordered(value: Any) -> bool:
            lit = _literal_for(value, literal)
            return lit is not _NO and compare(value, lit)

        return ordered
    if op == "between":
        low, high = literal

        def between(value: Any) -> bool:
            lo, hi = _literal_for(value, low), _literal_for(value, high)
            return lo is not _NO and hi is not _NO and lo <= value <= hi

        return between
    if op in ("in", "not_in"):
        negate = op == "not_in"
        options = tuple(literal)

        def member(value: Any) -> bool:
            found = any((lit := _literal_for(value, item)) is not _NO and value == lit for item in options)
            return found != negate

        return member
    if op == "like":
        regex = like_to_regex(literal)
        return lambda value: isinstance(value, str) and regex.fullmatch(value) is not None
    if op == "regex":
        regex = compile_regex(literal)
        return lambda value: isinstance(value, str) and regex.fullmatch(value) is not None
    raise ConfigurationError(f"unknown operator {op!r}", path="query.filter")


_ORDERINGS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


# --------------------------------------------------------------------------
# Sorting, paging and projection
# --------------------------------------------------------------------------


class _Descending:
    """Wraps a key so that it sorts in reverse (used per key, so keys can mix orders)."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __lt__(self, other: "_Descending") -> bool:
        return other.key < self.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.key == other.key


def _value_key(value: Any) -> tuple:
    """Total order of one field's values: kinds by rank, then the value; nulls come last."""
    if value is None:
        return (1,)
    kind = _kind(value)
    if kind == _NUMBER:
        if _is_nan(value):
            return (0, kind, 1, 0)  # NaN after every number, as in PostgreSQL
        return (0, kind, 0, value)
    if kind == _DATETIME:
        # Aware and naive moments cannot be compared: naive ones are read as UTC.
        moment = value if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)
        return (0, kind, moment)
    if kind == _OTHER:
        return (0, kind, repr(value))
    return (0, kind, value)


def sort_key(keys: Sequence[SortKey]) -> Callable[[tuple[str, Mapping[str, Any]]], tuple]:
    """Key function over ``(id, fields)`` items for the sort keys, ties broken by id.

    Ascending puts nulls (and missing fields) last, descending puts them first
    (PostgreSQL's default ``NULLS LAST`` / ``NULLS FIRST``). Strings compare by
    code point. Equal keys are ordered by record id (ascending, code point), so
    every store returns ties in the same order.
    """

    def key(item: tuple[str, Mapping[str, Any]]) -> tuple:
        record_id, fields = item
        parts: list[Any] = []
        for spec in keys:
            value_key = _value_key(fields.get(spec.field))
            parts.append(_Descending(value_key) if spec.descending else value_key)
        parts.append(record_id)
        return tuple(parts)

    return key


def order_items(
    items: Iterable[tuple[str, Mapping[str, Any]]],
    keys: Sequence[SortKey],
    *,
    offset: int = 0,
    limit: int | None = None,
) -> list[tuple[str, Mapping[str, Any]]]:
    """Sort ``items`` by ``keys`` and apply offset/limit (a heap when a limit bounds the work)."""
    key = sort_key(keys)
    if limit is not None:
        top = heapq.nsmallest(offset + limit, items, key=key)
        return top[offset:]
    ordered = sorted(items, key=key)
    return ordered[offset:] if offset else ordered


def ordered_batches(records: Mapping[str, Any], query: Query, batch_size: int) -> Iterator[list[Any]]:
    """Records (id -> record with ``fields``) in the query's order, offset, limit and select applied, in batches.

    For stores that sort their matches in process; the records' ``fields`` are
    replaced by their projection.
    """
    ordered = order_items(
        ((key, record.fields) for key, record in records.items()),
        query.sort_keys,
        offset=query.offset_value,
        limit=query.limit_value,
    )
    select = query.select_fields
    for start in range(0, len(ordered), batch_size):
        batch = []
        for key, fields in ordered[start : start + batch_size]:
            record = records[key]
            record.fields = project(fields, select)
            batch.append(record)
        yield batch


class PageWindow:
    """Offset, limit and batching over matches that arrive in query order (stores that filter as they scan).

    Per match: ``skips()`` says whether it falls inside the offset (and counts
    it); otherwise ``add(item)`` takes it and returns a full batch when one is
    ready. ``full`` says the limit is reached; ``rest()`` is the last partial
    batch.
    """

    def __init__(self, offset: int, limit: int | None, batch_size: int) -> None:
        self.offset, self.limit, self.batch_size = offset, limit, batch_size
        self.skipped = self.produced = 0
        self._pending: list[Any] = []

    @property
    def full(self) -> bool:
        return self.limit is not None and self.produced >= self.limit

    def skips(self) -> bool:
        if self.skipped < self.offset:
            self.skipped += 1
            return True
        return False

    def add(self, item: Any) -> list[Any] | None:
        self._pending.append(item)
        self.produced += 1
        if len(self._pending) >= self.batch_size:
            return self.rest()
        return None

    def rest(self) -> list[Any]:
        batch, self._pending = self._pending, []
        return batch


def project(fields: Mapping[str, Any], select: Sequence[str] | None) -> dict[str, Any]:
    """The selected fields that the record has (all of them when ``select`` is None)."""
    if select is None:
        return dict(fields)
    return {name: fields[name] for name in select if name in fields}


def run_query(items: Iterable[tuple[str, Mapping[str, Any]]], query: Query | None) -> list[tuple[str, dict[str, Any]]]:
    """The reference answer: ``(id, projected fields)`` of the matching items, in order.

    Without sort keys, records come in the store's natural order -- for the
    reference, the order of ``items``; stores without an insertion order must
    be compared with a sort.
    """
    query = query or Query()
    predicate = compile_filter(query.filter_spec)
    matching = [(record_id, fields) for record_id, fields in items if predicate(fields)]
    if query.sort_keys:
        matching = order_items(matching, query.sort_keys, offset=query.offset_value, limit=query.limit_value)
    else:
        stop = None if query.limit_value is None else query.offset_value + query.limit_value
        matching = matching[query.offset_value : stop]
    return [(record_id, project(fields, query.select_fields)) for record_id, fields in matching]
