"""Query translation of the Elasticsearch / OpenSearch record store: filters and sorts.

:func:`translate` turns a filter into a ``bool.filter`` query on the indexed
view (:mod:`ferry.backends.records_elasticsearch_index`). It computes for
every subtree an upper bound (matches at least what the reference evaluator
matches) and a lower bound (at most), so ``not`` of an inexact subtree stays
a superset. A leaf is exact unless its literal cannot be held exactly (a
number that is no exact double), it is a ``(?i)`` regex or one outside the
translatable subset, or its field holds ``x`` values (the store checks with
one request). The store sends the upper bound and, when the whole is not
exact, finishes with the reference evaluator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .elasticsearch_query import _like_to_wildcard  # SQL LIKE as a Lucene wildcard, escapes kept
from .filters import And, Comparison, Filter, Not, Or
from .records_elasticsearch_index import MAX_KEYWORD_CHARS, OTHER, exact_double, field_key, micros
from .records_query import SortKey
from .records_reference import _NO, _date_literal, _datetime_literal, compile_regex

__all__ = [
    "MATCH_ALL",
    "value_columns",
    "inexact_clause",
    "unsortable_clause",
    "translate",
    "sort_clauses",
    "regex_to_lucene",
]

#: Lucene refuses longer regexps by default (``index.max_regex_length``).
MAX_REGEX_LENGTH = 1000

MATCH_ALL: dict[str, Any] = {"match_all": {}}
MATCH_NONE: dict[str, Any] = {"match_none": {}}


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


def _path(column: str, sub: str) -> str:
    return f"ix.{field_key(column)}.{sub}"


def value_columns(node: Filter | None) -> set[str]:
    """Columns compared by value (every operator but ``exists``): where ``x`` values matter."""
    if node is None:
        return set()
    if isinstance(node, Comparison):
        return set() if node.op == "exists" else {node.column}
    if isinstance(node, (And, Or)):
        return set().union(*(value_columns(item) for item in node.items))
    if isinstance(node, Not):
        return value_columns(node.item)
    return set()


def inexact_clause(column: str) -> dict[str, Any]:
    """Records whose ``column`` holds a value the index cannot hold exactly."""
    return {"term": {_path(column, "x"): True}}


def unsortable_clause(column: str) -> dict[str, Any]:
    """Records whose ``column`` the index cannot order as the reference does (x values, lists, dicts)."""
    return _any_of([inexact_clause(column), {"term": {_path(column, "r"): OTHER}}])


def _all_of(clauses: Iterable[dict[str, Any]]) -> dict[str, Any]:
    kept = []
    for clause in clauses:
        if clause == MATCH_NONE:
            return MATCH_NONE
        if clause != MATCH_ALL:
            kept.append(clause)
    if not kept:
        return MATCH_ALL
    return kept[0] if len(kept) == 1 else {"bool": {"filter": kept}}


def _any_of(clauses: Iterable[dict[str, Any]]) -> dict[str, Any]:
    kept = []
    for clause in clauses:
        if clause == MATCH_ALL:
            return MATCH_ALL
        if clause != MATCH_NONE:
            kept.append(clause)
    if not kept:
        return MATCH_NONE
    return kept[0] if len(kept) == 1 else {"bool": {"should": kept, "minimum_should_match": 1}}


def _none_of(clause: dict[str, Any]) -> dict[str, Any]:
    if clause == MATCH_ALL:
        return MATCH_NONE
    if clause == MATCH_NONE:
        return MATCH_ALL
    return {"bool": {"must_not": [clause]}}


@dataclass(frozen=True)
class _Bounds:
    upper: dict[str, Any]  # matches at least the records the filter matches
    lower: dict[str, Any]  # matches only records the filter matches
    exact: bool  # upper and lower match the same records

    def negated(self) -> "_Bounds":
        return _Bounds(_none_of(self.lower), _none_of(self.upper), self.exact)


def translate(node: Filter | None, inexact_columns: set[str]) -> tuple[dict[str, Any], bool]:
    """``(query, exact)``: a filter-context query matching at least what ``node`` matches.

    ``exact`` is True when it matches exactly that; ``inexact_columns`` are
    the columns known to hold ``x`` values (see :func:`inexact_clause`).
    """
    if node is None:
        return MATCH_ALL, True
    bounds = _bounds(node, inexact_columns)
    query = bounds.upper
    if query != MATCH_ALL:
        query = {"bool": {"filter": [query]}}  # filter context: no scoring (the guide's advice)
    return query, bounds.exact


def _bounds(node: Filter, inexact: set[str]) -> _Bounds:
    if isinstance(node, And):
        parts = [_bounds(item, inexact) for item in node.items]
        return _Bounds(_all_of(p.upper for p in parts), _all_of(p.lower for p in parts), all(p.exact for p in parts))
    if isinstance(node, Or):
        parts = [_bounds(item, inexact) for item in node.items]
        return _Bounds(_any_of(p.upper for p in parts), _any_of(p.lower for p in parts), all(p.exact for p in parts))
    if isinstance(node, Not):
        return _bounds(node.item, inexact).negated()
    if isinstance(node, Comparison):
        return _leaf(node, inexact)
    raise TypeError(f"not a filter: {node!r}")


def _leaf(node: Comparison, inexact: set[str]) -> _Bounds:
    column, op, value = node.column, node.op, node.value
    if op == "exists":
        present = {"exists": {"field": _path(column, "r")}}
        clause = present if value else _none_of(present)
        return _Bounds(clause, clause, True)
    if op in ("neq", "not_in"):
        positive = Comparison(column, "eq" if op == "neq" else "in", value)
        return _leaf(positive, inexact).negated()
    base = _base_clause(column, op, value)
    if base is None:  # no exact clause: any record holding a value may match
        return _Bounds({"exists": {"field": _path(column, "r")}}, MATCH_NONE, False)
    if column in inexact:
        return _Bounds(_any_of([base, inexact_clause(column)]), base, False)
    return _Bounds(base, base, True)


def _base_clause(column: str, op: str, value: Any) -> dict[str, Any] | None:
    """The clause matching exactly the records whose indexed value satisfies ``op``; None if none can."""
    if op == "eq":
        return _equals(column, value)
    if op == "in":
        options = [_equals(column, item) for item in value]
        return None if any(o is None for o in options) else _any_of(options)
    if op in ("gt", "gte", "lt", "lte"):
        return _range(column, ((op, value),))
    if op == "between":
        return _range(column, (("gte", value[0]), ("lte", value[1])))
    if op == "like":
        return {"wildcard": {_path(column, "s"): {"value": _like_to_wildcard(value)}}}
    if op == "regex":
        lucene = regex_to_lucene(value)
        return None if lucene is None else {"regexp": {_path(column, "s"): {"value": lucene}}}
    raise ValueError(f"unknown operator {op!r}")


def _equals(column: str, literal: Any) -> dict[str, Any] | None:
    if isinstance(literal, bool):
        return {"term": {_path(column, "b"): literal}}
    if isinstance(literal, (int, float)):
        if isinstance(literal, float) and math.isnan(literal):
            return MATCH_NONE
        double = exact_double(literal)
        return None if double is None else {"term": {_path(column, "n"): double}}
    if isinstance(literal, str):
        options = []
        if len(literal) <= MAX_KEYWORD_CHARS:
            options.append({"term": {_path(column, "s"): literal}})
        day = _date_literal(literal)
        if day is not _NO:
            options.append({"term": {_path(column, "d"): day.toordinal()}})
        moment = _datetime_literal(literal, True)
        if moment is not _NO:
            options.append({"term": {_path(column, "t"): micros(moment)}})
        return _any_of(options)
    return MATCH_NONE  # a literal of no kind a value can have matches nothing


_COMPARE = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _range(column: str, bounds: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """``value <op> literal`` for every (op, literal), per kind; a kind all literals fit is a range on it."""
    literals = [literal for _, literal in bounds]
    options: list[dict[str, Any]] = []
    if all(isinstance(v, bool) for v in literals):
        # Lucene has no range on booleans; Python orders False < True.
        allowed = [b for b in (False, True) if all(_COMPARE[op](b, lit) for op, lit in bounds)]
        if len(allowed) == 2:
            options.append({"exists": {"field": _path(column, "b")}})
        elif allowed:
            options.append({"term": {_path(column, "b"): allowed[0]}})
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in literals):
        if any(isinstance(v, float) and math.isnan(v) for v in literals):
            return MATCH_NONE  # NaN orders with nothing
        doubles = [exact_double(v) for v in literals]
        if any(d is None for d in doubles):
            return None
        options.append({"range": {_path(column, "n"): {op: d for (op, _), d in zip(bounds, doubles)}}})
    elif all(isinstance(v, str) for v in literals):
        options.append({"range": {_path(column, "s"): dict(bounds)}})
        days = [_date_literal(v) for v in literals]
        if all(d is not _NO for d in days):
            options.append({"range": {_path(column, "d"): {op: d.toordinal() for (op, _), d in zip(bounds, days)}}})
        moments = [_datetime_literal(v, True) for v in literals]
        if all(m is not _NO for m in moments):
            options.append({"range": {_path(column, "t"): {op: micros(m) for (op, _), m in zip(bounds, moments)}}})
    return _any_of(options)


# --------------------------------------------------------------------------
# regex -> Lucene regexp
# --------------------------------------------------------------------------

_SHORTHANDS = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\t\n\f\r "}  # ASCII classes, as the reference reads them
_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def _literal(char: str) -> str:
    # Lucene reads a backslash before any character as that character; ASCII punctuation
    # may be an operator (@ & ~ < > # " and the regex ones), so every one is escaped.
    if char.isascii() and not char.isalnum():
        return "\\" + char
    return char


def _class_member(char: str) -> str:
    return "".join(_literal(c) for c in char)


def regex_to_lucene(pattern: str) -> str | None:
    """A pattern of the common subset as a Lucene regexp with the reference's meaning, or None.

    Lucene regexps are anchored like the reference's. ``.`` becomes
    ``[^\\n]`` (Python's dot), ``\\d \\w \\s`` their ASCII classes, lazy
    quantifiers greedy ones (a whole-value match does not depend on
    laziness), ``(?:`` a plain group and every ASCII punctuation character
    is escaped. None (not pushed down) for ``(?i)`` (Lucene and Python fold
    case differently), escapes other than the classes, punctuation and
    ``\\n \\t \\r \\f \\v``, Python's ``{,n}``, and results over Lucene's
    default length limit.
    """
    compile_regex(pattern)  # refuses what is outside the subset, with the reference's message
    if pattern.startswith("(?i)"):
        return None
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            piece = _escape(pattern[i + 1 : i + 2], in_class=False)
            if piece is None:
                return None
            out.append(piece)
            i += 2
        elif char == "[":
            end, piece = _char_class(pattern, i)
            if piece is None:
                return None
            out.append(piece)
            i = end
        elif char == "(":
            out.append("(")
            i += 3 if pattern.startswith("(?:", i) else 1
        elif char in ")|":
            out.append(char)
            i += 1
        elif char == ".":
            out.append("[^\n]")
            i += 1
        elif char in "*+?":
            out.append(char)
            i += 1
            if pattern[i : i + 1] == "?":  # lazy
                i += 1
        elif char == "{":
            match = _QUANTIFIER.match(pattern, i)
            if pattern.startswith("{,", i):
                return None  # Python reads {,n} as {0,n}; RE2 and Lucene do not
            if match is None:
                out.append(_literal(char))
                i += 1
            else:
                out.append(match.group(0))
                i = match.end()
                if pattern[i : i + 1] == "?":
                    i += 1
        else:
            out.append(_literal(char))
            i += 1
    text = "".join(out)
    return text if len(text) <= MAX_REGEX_LENGTH else None


def _escape(letter: str, *, in_class: bool) -> str | None:
    if not letter:
        return None
    if letter.lower() in _SHORTHANDS:
        members = _class_member(_SHORTHANDS[letter.lower()]).replace("\\-", "-")
        if letter.islower():
            return members if in_class else f"[{members}]"
        return None if in_class else f"[^{members}]"
    if letter in _CONTROL_ESCAPES:
        return _literal(_CONTROL_ESCAPES[letter])
    if letter.isascii() and letter.isalnum():
        return None  # \x.., \u...., \a...: not translated
    return _literal(letter)


def _class_char(pattern: str, i: int) -> tuple[int, str | None, bool]:
    """(next index, Lucene text, is a single character) of one class member at ``i``."""
    if pattern[i] == "\\":
        letter = pattern[i + 1 : i + 2]
        piece = _escape(letter, in_class=True)
        return i + 2, piece, letter.lower() not in _SHORTHANDS
    return i + 1, _literal(pattern[i]), True


def _char_class(pattern: str, start: int) -> tuple[int, str | None]:
    i, n = start + 1, len(pattern)
    negated = pattern[i : i + 1] == "^"
    if negated:
        i += 1
    members: list[str] = []
    first = True
    while i < n and (pattern[i] != "]" or first):
        first = False
        i, piece, single = _class_char(pattern, i)
        if piece is None:
            return i, None
        if single and pattern[i : i + 1] == "-" and i + 1 < n and pattern[i + 1] != "]":
            i, high, high_single = _class_char(pattern, i + 1)
            if high is None or not high_single:
                return i, None
            piece = f"{piece}-{high}"
        members.append(piece)
    if i >= n:
        return i, None
    return i + 1, "[" + ("^" if negated else "") + "".join(members) + "]"


# --------------------------------------------------------------------------
# Sorting
# --------------------------------------------------------------------------

_SUB_FIELDS = (("s", "keyword"), ("n", "double"), ("b", "boolean"), ("d", "integer"), ("t", "long"))


def sort_clauses(keys: Sequence[SortKey]) -> list[dict[str, Any]]:
    """ES sort of the reference order: per key the kind's rank, then the kind's value; ties by id.

    Ascending puts missing values (null, missing) last and descending first,
    as the reference does. Only values the index holds exactly can be
    ordered here; the store checks for others first (:func:`unsortable_clause`).
    """
    clauses: list[dict[str, Any]] = []
    for key in keys:
        order = key.order
        missing = "_first" if key.descending else "_last"
        clauses.append({_path(key.field, "r"): {"order": order, "missing": missing, "unmapped_type": "byte"}})
        for sub, kind in _SUB_FIELDS:
            clauses.append({_path(key.field, sub): {"order": order, "unmapped_type": kind}})
    clauses.append({"rid": {"order": "asc"}})
    return clauses
