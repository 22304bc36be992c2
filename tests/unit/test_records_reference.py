"""The reference evaluator agrees with the foundation's Arrow evaluator, and its own rules hold."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa
import pytest

from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import evaluate, parse_filter
from ferry.backends.records_query import Query
from ferry.backends.filters import Comparison
from ferry.backends.records_reference import compile_regex, like_to_regex, matches, run_query, split_filter

_STRINGS = ["", "a", "A", "b", "é", "e\u0301", "Z", "ß", "日本", "😀", "a%b", "a_b", "x.y", "line\nbreak", "abc", "ab", "a1", "9"]


def _typed_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        rows.append(
            {
                "n": rng.choice([None, -2, 0, 1, 1, 3, 10]),
                "x": rng.choice([None, -0.5, 0.0, 1.5, 2.5]),
                "s": rng.choice([None] + _STRINGS),
                "b": rng.choice([None, True, False]),
            }
        )
    return rows


def _typed_filters(rng: random.Random) -> list[dict]:
    leaves = []
    for column, values in (("n", [-2, 0, 1, 3, 10, 2.5]), ("x", [-0.5, 0.0, 1.5, 2]), ("s", _STRINGS[1:]), ("b", [True, False])):
        for _ in range(3):
            value = rng.choice(values)
            for op in ("eq", "neq", "gt", "gte", "lt", "lte"):
                leaves.append({"column": column, "op": op, "value": value})
            leaves.append({"column": column, "op": "in", "value": rng.sample(values, 2)})
            leaves.append({"column": column, "op": "not_in", "value": rng.sample(values, 2)})
            if column != "b":
                leaves.append({"column": column, "op": "between", "value": sorted(rng.sample(values, 2))})
        leaves.append({"column": column, "op": "exists", "value": True})
        leaves.append({"column": column, "op": "exists", "value": False})
    for op in ("eq", "neq", "in", "not_in", "exists"):
        value = [1] if op in ("in", "not_in") else (False if op == "exists" else 1)
        leaves.append({"column": "missing", "op": op, "value": value})
    for pattern in ("a%", "%b", "a_b", "%", "_", "A%", "a\\%b", "a\\_b", "日%", "%😀%", "line%", "line_break", "%.%"):
        leaves.append({"column": "s", "op": "like", "value": pattern})
    for pattern in ("a.*", "[a-z]+", "ab?[cd]?", "(?i)a.*", "日本|😀", "x\\.y", ".*", "[^a]+", "\\d", "\\w+",
                    "[\\d]+", "\\D+", "a{1,2}b?", "(a|b)c?", "line.break", "(?:ab)+", "[]a]+", ".+?"):
        leaves.append({"column": "s", "op": "regex", "value": pattern})
    combined = []
    for _ in range(40):
        a, b = rng.sample(leaves, 2)
        combined += [{"and": [a, b]}, {"or": [a, {"not": b}]}, {"not": {"and": [a, b]}}]
    return leaves + combined


def test_reference_equals_arrow_evaluator_on_typed_columns():
    rng = random.Random(8)
    rows = _typed_rows(rng, 400)
    schema = pa.schema([("n", pa.int64()), ("x", pa.float64()), ("s", pa.string()), ("b", pa.bool_())])
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    filters = _typed_filters(rng)
    assert len(filters) > 150
    for spec in filters:
        node = parse_filter(spec)
        arrow = evaluate(node, batch).to_pylist()
        reference = [matches(node, row) for row in rows]
        assert reference == arrow, spec


def test_null_and_missing_semantics():
    for op, value in (("eq", 1), ("gt", 1), ("gte", 1), ("lt", 1), ("lte", 1), ("in", [1]), ("between", [0, 2])):
        node = parse_filter({"column": "v", "op": op, "value": value})
        assert not matches(node, {"v": None}) and not matches(node, {})
    for op, value in (("like", "%"), ("regex", ".*")):
        node = parse_filter({"column": "v", "op": op, "value": value})
        assert not matches(node, {"v": None}) and not matches(node, {})
    for op, value in (("neq", 1), ("not_in", [1])):
        node = parse_filter({"column": "v", "op": op, "value": value})
        assert matches(node, {"v": None}) and matches(node, {})
    present = parse_filter({"column": "v", "op": "exists"})
    absent = parse_filter({"column": "v", "op": "exists", "value": False})
    assert matches(present, {"v": 0}) and not matches(present, {"v": None}) and not matches(present, {})
    assert matches(absent, {"v": None}) and matches(absent, {}) and not matches(absent, {"v": ""})
    # not is plain two-valued logic: not (v > 5) is true for a null v.
    assert matches(parse_filter({"not": {"v": {"gt": 5}}}), {"v": None})


def test_kinds_are_not_converted():
    assert not matches(parse_filter({"v": {"eq": 1}}), {"v": "1"})
    assert not matches(parse_filter({"v": {"eq": "1"}}), {"v": 1})
    assert matches(parse_filter({"v": {"neq": "1"}}), {"v": 1})
    assert not matches(parse_filter({"v": {"eq": 1}}), {"v": True})  # a boolean is not a number
    assert matches(parse_filter({"v": {"eq": 1}}), {"v": 1.0})  # one number kind
    assert not matches(parse_filter({"v": {"gt": "a"}}), {"v": 5})
    assert not matches(parse_filter({"v": {"like": "%"}}), {"v": 5})
    assert not matches(parse_filter({"v": {"eq": 1}}), {"v": [1]})
    assert not matches(parse_filter({"v": {"eq": 1}}), {"v": float("nan")})


def test_dates_and_times_compare_with_iso_literals():
    aware = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    naive = dt.datetime(2024, 1, 1, 12)
    assert matches(parse_filter({"t": {"gte": "2024-01-01T12:00"}}), {"t": aware})
    assert matches(parse_filter({"t": {"eq": "2024-01-01T14:00+02:00"}}), {"t": naive})
    assert not matches(parse_filter({"t": {"gt": "not a date"}}), {"t": naive})
    assert matches(parse_filter({"t": {"between": ["2023-12-31", "2024-01-02"]}}), {"t": dt.date(2024, 1, 1)})


def test_like_rules():
    assert like_to_regex("a%").fullmatch("a\nb")  # % spans line breaks, as in SQL
    assert like_to_regex("a_c").fullmatch("abc") and not like_to_regex("a_c").fullmatch("ac")
    assert like_to_regex("a\\%").fullmatch("a%") and not like_to_regex("a\\%").fullmatch("ab")
    assert not like_to_regex("A%").fullmatch("abc")  # case-sensitive
    assert like_to_regex("日_").fullmatch("日本")  # _ is one character, not one byte


def test_regex_subset():
    assert compile_regex("a.c").fullmatch("abc") and not compile_regex("a").fullmatch("ab")  # anchored
    assert compile_regex("\\d+").fullmatch("123") and not compile_regex("\\d").fullmatch("٣")  # ASCII digits, as RE2
    assert compile_regex("(?i)abc").fullmatch("ABC")
    for pattern in ("^a", "a$", "\\bword", "(a)\\1", "(?=a)a", "(?P<x>a)", "\\p{L}", "a(?i)b", "\\Aa"):
        with pytest.raises(ConfigurationError, match="outside the common subset"):
            compile_regex(pattern)
    assert compile_regex("[$^]+").fullmatch("$^")  # inside a class they are literal members
    assert compile_regex("a\\$").fullmatch("a$")


def test_run_query_pages_projects_and_breaks_ties_by_id():
    items = [("c", {"k": 1, "v": "x"}), ("a", {"k": 1, "v": "y"}), ("b", {"k": 0}), ("d", {"k": None})]
    assert [k for k, _ in run_query(items, Query().sort("k"))] == ["b", "a", "c", "d"]
    assert [k for k, _ in run_query(items, Query().sort("k", "desc"))] == ["d", "a", "c", "b"]
    assert run_query(items, Query().sort("k").offset(1).limit(2).select("v")) == [("a", {"v": "y"}), ("c", {"v": "x"})]
    assert [k for k, _ in run_query(items, Query({"k": 1}))] == ["c", "a"]  # natural order without sort


def test_split_filter_for_pushdown():
    node = parse_filter({"and": [{"a": 1}, {"b": {"regex": "x.*"}}, {"c": {"gt": 2}}]})
    no_regex = lambda f: not (isinstance(f, Comparison) and f.op == "regex") and all(  # noqa: E731
        not (isinstance(x, Comparison) and x.op == "regex") for x in getattr(f, "items", ())
    )
    pushed, residual = split_filter(node, no_regex)
    assert pushed == parse_filter({"and": [{"a": 1}, {"c": {"gt": 2}}]})
    assert residual == parse_filter({"b": {"regex": "x.*"}})
    assert split_filter(node, lambda f: True) == (node, None)
    assert split_filter(node, lambda f: False) == (None, node)
    assert split_filter(None, lambda f: True) == (None, None)
    rows = [{"a": 1, "b": "xy", "c": 3}, {"a": 1, "b": "y", "c": 3}, {"a": 2, "b": "x", "c": 5}]
    assert [matches(node, r) for r in rows] == [matches(pushed, r) and matches(residual, r) for r in rows]
