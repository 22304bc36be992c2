"""Filter pushdown of the object-store record store: record filters as pyarrow.dataset expressions.

The expression runs on the typed copies of the fields
(:mod:`ferry.backends.records_objectstore_codec`) and keeps a **superset**
of the matching rows: every row it drops cannot match, and every row it
keeps is checked again by the reference evaluator, so results are exact.

Each leaf is translated for the rows whose value is *known* -- a string,
a number float64 holds exactly, a boolean, null or missing -- where it
gives exactly the reference evaluator's answer; rows whose value is
*unknown* to the typed columns (``o.<field>``: lists, dicts, dates,
Decimals, NaN, huge ints; ``unshredded``) are always kept. To stay a
superset under ``not``, every node carries two expressions: ``possible``
(the node may be true) and ``possibly_false`` (it may be false); ``not``
swaps them, ``and`` / ``or`` combine them. ``None`` stands for "every row".

Exact on known rows: ``eq, neq, gt, gte, lt, lte, between, in, not_in``
(strings by code point, numbers as float64, booleans), ``exists``, ``like``
(Arrow's ``match_like``) and ``regex`` without ``(?i)`` (RE2, anchored;
the common subset reads the same in RE2 and Python). Not pushed (every
row possible): ordering against a number float64 cannot hold exactly, and
``(?i)`` regexes (case folding of non-ASCII letters differs).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .filters import And, Comparison, Filter, Not, Or
from .records_objectstore_codec import BOOLEAN, NUMBER, OTHER, STRING, UNSHREDDED

__all__ = ["prefilter", "pushdown_fields"]

Expression = pads.Expression
_FALSE = pads.scalar(False)


def prefilter(node: Filter | None) -> Expression | None:
    """An expression keeping a superset of the rows matching ``node`` (None: keep every row)."""
    if node is None:
        return None
    possible, _ = _bounds(node)
    return possible


def pushdown_fields(node: Filter | None) -> set[str]:
    """The record fields whose typed columns the expression reads."""
    return set() if node is None else node.columns()


def _bounds(node: Filter) -> tuple[Expression | None, Expression | None]:
    """``(possible, possibly_false)`` of a node."""
    if isinstance(node, Comparison):
        return _leaf(node)
    if isinstance(node, Not):
        possible, possibly_false = _bounds(node.item)
        return possibly_false, possible
    if isinstance(node, (And, Or)):
        pairs = [_bounds(item) for item in node.items]
        trues = [p for p, _ in pairs]
        falses = [f for _, f in pairs]
        if isinstance(node, And):
            return _all(trues), _any(falses)
        return _any(trues), _all(falses)
    raise TypeError(f"not a filter: {node!r}")


def _all(items: list[Expression | None]) -> Expression | None:
    """``and`` where None is true: None items drop out; no items left is None."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    result = kept[0]
    for item in kept[1:]:
        result = result & item
    return result


def _any(items: list[Expression | None]) -> Expression | None:
    """``or`` where None is true: any None item makes the result None; no items is false."""
    if not items:
        return _FALSE
    if any(item is None for item in items):
        return None
    result = items[0]
    for item in items[1:]:
        result = result | item
    return result


def _flag(column: str) -> Expression:
    """True where a bool column is true; never null."""
    field = pads.field(column)
    return field.is_valid() & field


def _present(name: str) -> Expression:
    return (
        pads.field(STRING + name).is_valid()
        | pads.field(NUMBER + name).is_valid()
        | pads.field(BOOLEAN + name).is_valid()
        | _flag(OTHER + name)
    )


def _leaf(node: Comparison) -> tuple[Expression | None, Expression | None]:
    name, op, literal = node.column, node.op, node.value
    unknown_row = _flag(UNSHREDDED)
    if op == "exists":
        exact = _present(name) if literal else ~_present(name)
        return exact | unknown_row, ~exact | unknown_row
    try:
        exact = _exact(name, op, literal)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeEncodeError):
        exact = None  # a literal Arrow cannot hold (a lone surrogate): decided in Python
    if exact is None:
        return None, None
    unknown = _flag(OTHER + name) | unknown_row
    return exact | unknown, ~exact | unknown


def _typed(name: str, value: object) -> tuple[Expression, pa.Scalar] | None:
    """The typed column a literal compares with and the literal as its scalar; None: no known value can compare.

    A number float64 cannot hold exactly raises ValueError (ordering against
    it is not exact in float64).
    """
    if isinstance(value, bool):
        return pads.field(BOOLEAN + name), pa.scalar(value, pa.bool_())
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:
            return None  # NaN equals and orders with nothing
        try:
            converted = float(value)
        except OverflowError:
            raise ValueError("not exact in float64") from None
        if converted != value:
            raise ValueError("not exact in float64")
        return pads.field(NUMBER + name), pa.scalar(converted, pa.float64())
    if isinstance(value, str):
        return pads.field(STRING + name), pa.scalar(value, pa.string())
    return None


def _equal(name: str, value: object) -> Expression:
    try:
        typed = _typed(name, value)
    except ValueError:
        return _FALSE  # no float64 equals a number it cannot hold
    if typed is None:
        return _FALSE
    column, scalar = typed
    return column.is_valid() & (column == scalar)


def _exact(name: str, op: str, literal: object) -> Expression | None:
    """The leaf on rows whose value is known (never null); None when it cannot be said in Arrow."""
    if op in ("eq", "neq"):
        equal = _equal(name, literal)
        return ~equal if op == "neq" else equal
    if op in ("in", "not_in"):
        member = _any([_equal(name, option) for option in literal])
        return ~member if op == "not_in" else member
    if op in ("gt", "gte", "lt", "lte"):
        try:
            typed = _typed(name, literal)
        except ValueError:
            return None
        if typed is None:
            return _FALSE
        column, scalar = typed
        compare = {"gt": column > scalar, "gte": column >= scalar, "lt": column < scalar, "lte": column <= scalar}[op]
        return column.is_valid() & compare
    if op == "between":
        low, high = literal
        try:
            low_typed, high_typed = _typed(name, low), _typed(name, high)
        except ValueError:
            return None
        if low_typed is None or high_typed is None or _kind(low) != _kind(high):
            return _FALSE  # no value is of both bounds' kinds
        column = low_typed[0]
        return column.is_valid() & (column >= low_typed[1]) & (column <= high_typed[1])
    if op == "like":
        column = pads.field(STRING + name)
        return column.is_valid() & pc.match_like(column, literal)
    if op == "regex":
        if literal.startswith("(?i)"):
            return None
        column = pads.field(STRING + name)
        return column.is_valid() & pc.match_substring_regex(column, f"^(?:{literal})$")
    return None


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "string"
