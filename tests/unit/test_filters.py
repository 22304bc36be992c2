"""Tests of ferry.backends.filters: parsing, null semantics, operators, coercion."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pyarrow as pa
import pytest

from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import (
    OPERATORS,
    And,
    Comparison,
    Not,
    Or,
    coerce_literal,
    evaluate,
    filter_batch,
    parse_filter,
)


def mask(data, batch) -> list[bool]:
    result = evaluate(parse_filter(data), batch)
    assert result.null_count == 0
    assert len(result) == batch.num_rows
    return result.to_pylist()


@pytest.fixture
def batch():
    return pa.record_batch(
        {
            "n": pa.array([1, 5, None, 10, 7], pa.int64()),
            "s": pa.array(["apple", "Banana", None, "cherry", "a_b"], pa.string()),
            "f": pa.array([1.5, None, 3.0, -1.0, 2.0]),
            "b": pa.array([True, False, None, True, False]),
        }
    )


# -- parsing ----------------------------------------------------------------


def test_parse_canonical_and_compact_forms_are_equal():
    canonical = parse_filter({"column": "amount", "op": "gt", "value": 10})
    compact = parse_filter({"amount": {"gt": 10}})
    assert canonical == compact == Comparison("amount", "gt", 10)
    assert parse_filter({"status": "active"}) == Comparison("status", "eq", "active")


def test_parse_compound_and_columns():
    f = parse_filter(
        {"and": [{"a": {"gt": 1}}, {"or": [{"b": "x"}, {"not": {"c": {"exists": True}}}]}]}
    )
    assert isinstance(f, And)
    assert isinstance(f.items[1], Or)
    assert isinstance(f.items[1].items[1], Not)
    assert f.columns() == {"a", "b", "c"}


def test_compact_leaf_with_several_operators_is_an_and():
    f = parse_filter({"amount": {"gte": 1, "lt": 5}})
    assert f == And((Comparison("amount", "gte", 1), Comparison("amount", "lt", 5)))


def test_to_dict_is_canonical_json_and_round_trips():
    f = parse_filter(
        {
            "and": [
                {"n": {"in": [1, 2]}},
                {"d": {"between": [dt.date(2024, 1, 1), dt.date(2024, 2, 1)]}},
                {"x": {"exists": False}},
                {"p": {"gt": Decimal("1.50")}},
            ]
        }
    )
    data = f.to_dict()
    assert data["and"][0] == {"column": "n", "op": "in", "value": [1, 2]}
    assert data["and"][1]["value"] == ["2024-01-01", "2024-02-01"]
    assert data["and"][3]["value"] == "1.50"
    json.dumps(data, sort_keys=True)  # serializable
    assert parse_filter(data) == f
    assert parse_filter(data).to_dict() == data


def test_exists_defaults_to_true():
    assert parse_filter({"column": "a", "op": "exists"}) == Comparison("a", "exists", True)
    assert parse_filter({"a": {"exists": None}}).value is True


@pytest.mark.parametrize(
    "data, path, fragment",
    [
        ({"and": [{"a": 1}, {"column": "b", "op": "bogus", "value": 1}]}, "where.and[1].op", "eq, neq, gt"),
        ({"a": {"bogus": 1}}, "where.a", "unknown operator 'bogus'"),
        ({"a": {"between": [1]}}, "where.a.between", "list of 2 values"),
        ({"a": {"between": [1, 2, 3]}}, "where.a.between", "list of 2 values"),
        ({"column": "a", "op": "in", "value": 3}, "where.value", "in takes a list"),
        ({"a": {"not_in": "x"}}, "where.a.not_in", "not_in takes a list"),
        ({"a": {"exists": "yes"}}, "where.a.exists", "true or false"),
        ({"a": {"like": 5}}, "where.a.like", "string pattern"),
        ({"a": {"regex": "(unclosed"}}, "where.a.regex", "invalid regex"),
        ({"a": {"eq": None}}, "where.a.eq", "exists: false"),
        ({"a": {"in": [1, None]}}, "where.a.in[1]", "null"),
        ({"and": []}, "where.and", "non-empty list"),
        ({"or": {"a": 1}}, "where.or", "non-empty list"),
        ({"a": 1, "b": 2}, "where", "exactly one key"),
        ({"column": "a", "value": 1}, "where", "missing op"),
        ({"column": "a", "op": "eq"}, "where", "missing value"),
        ({"column": "", "op": "eq", "value": 1}, "where.column", "column name"),
        ({"column": "a", "op": "eq", "value": 1, "extra": 2}, "where", "unexpected key"),
        ({"a": [1, 2]}, "where.a", "in: [...]"),
        ({"a": {"eq": {"x": 1}}}, "where.a.eq", "expected a string, number"),
        ([1, 2], "where", "expected a filter mapping"),
        ({"not": {"or": [{"a": 1}, {"b": {"gt": []}}]}}, "where.not.or[1].b.gt", "expected a string"),
    ],
)
def test_parse_errors_name_the_field_path(data, path, fragment):
    with pytest.raises(ConfigurationError) as info:
        parse_filter(data)
    assert info.value.path == path
    assert fragment in info.value.message


def test_unknown_operator_lists_all_valid_ones():
    with pytest.raises(ConfigurationError) as info:
        parse_filter({"column": "a", "op": "greater", "value": 1})
    for op in OPERATORS:
        assert op in info.value.message


def test_parse_error_carries_source_and_custom_path():
    with pytest.raises(ConfigurationError) as info:
        parse_filter({"a": {"nope": 1}}, source="job.yaml", path="transforms[0].filter")
    assert info.value.source == "job.yaml"
    assert str(info.value).startswith("job.yaml: transforms[0].filter.a: unknown operator")


# -- operators and null semantics ------------------------------------------


def test_eq_neq(batch):
    assert mask({"n": 5}, batch) == [False, True, False, False, False]
    # null never matches eq; it always matches neq
    assert mask({"n": {"neq": 5}}, batch) == [True, False, True, True, True]


def test_ordering_operators(batch):
    assert mask({"n": {"gt": 5}}, batch) == [False, False, False, True, True]
    assert mask({"n": {"gte": 5}}, batch) == [False, True, False, True, True]
    assert mask({"n": {"lt": 5}}, batch) == [True, False, False, False, False]
    assert mask({"n": {"lte": 5}}, batch) == [True, True, False, False, False]
    assert mask({"f": {"gt": 1.75}}, batch) == [False, False, True, False, True]


def test_numbers_compare_exactly_across_types(batch):
    assert mask({"n": {"gt": 6.5}}, batch) == [False, False, False, True, True]
    # a numeric string is parsed for numeric columns
    assert mask({"n": {"gte": "7"}}, batch) == [False, False, False, True, True]
    int8 = pa.record_batch({"x": pa.array([1, 100, None], pa.int8())})
    assert mask({"x": {"lt": 1000}}, int8) == [True, True, False]


def test_in_and_not_in(batch):
    assert mask({"n": {"in": [1, 10, 99]}}, batch) == [True, False, False, True, False]
    assert mask({"n": {"not_in": [1, 10]}}, batch) == [False, True, True, False, True]
    assert mask({"s": {"in": ["apple", "cherry"]}}, batch) == [True, False, False, True, False]
    # values the column type cannot hold can never be equal: ignored, not an error
    assert mask({"n": {"in": [1.5, 5]}}, batch) == [False, True, False, False, False]
    # empty lists: nothing is in [], everything is not in []
    assert mask({"n": {"in": []}}, batch) == [False] * 5
    assert mask({"n": {"not_in": []}}, batch) == [True] * 5


def test_between_is_inclusive(batch):
    assert mask({"n": {"between": [5, 10]}}, batch) == [False, True, False, True, True]
    assert mask({"s": {"between": ["b", "d"]}}, batch) == [False, False, False, True, False]


def test_like_is_case_sensitive_with_percent_and_underscore(batch):
    assert mask({"s": {"like": "%an%"}}, batch) == [False, True, False, False, False]
    assert mask({"s": {"like": "b%"}}, batch) == [False, False, False, False, False]
    assert mask({"s": {"like": "a_b"}}, batch) == [False, False, False, False, True]
    assert mask({"s": {"like": "_pple"}}, batch) == [True, False, False, False, False]
    assert mask({"s": {"like": "appl"}}, batch) == [False] * 5  # no implicit wildcards


def test_regex_is_anchored(batch):
    assert mask({"s": {"regex": "an"}}, batch) == [False] * 5
    assert mask({"s": {"regex": ".*an.*"}}, batch) == [False, True, False, False, False]
    assert mask({"s": {"regex": "apple|cherry"}}, batch) == [True, False, False, True, False]
    assert mask({"s": {"regex": "[a-z]+"}}, batch) == [True, False, False, True, False]


def test_like_and_regex_need_string_columns(batch):
    with pytest.raises(ConfigurationError, match="needs a string column"):
        mask({"n": {"like": "1%"}}, batch)


def test_exists(batch):
    assert mask({"n": {"exists": True}}, batch) == [True, True, False, True, True]
    assert mask({"n": {"exists": False}}, batch) == [False, False, True, False, False]


def test_booleans(batch):
    assert mask({"b": True}, batch) == [True, False, False, True, False]
    assert mask({"b": {"neq": True}}, batch) == [False, True, True, False, True]


@pytest.mark.parametrize(
    "op, value, expected",
    [
        ("eq", 1, False),
        ("gt", 1, False),
        ("gte", 1, False),
        ("lt", 1, False),
        ("lte", 1, False),
        ("like", "%", False),
        ("regex", ".*", False),
        ("between", [0, 2], False),
        ("in", [1], False),
        ("neq", 1, True),
        ("not_in", [1], True),
        ("exists", True, False),
        ("exists", False, True),
    ],
)
def test_null_and_missing_semantics(op, value, expected):
    nulls = pa.record_batch({"x": pa.array([None, None], pa.string() if op in ("like", "regex") else pa.int64())})
    assert mask({"column": "x", "op": op, "value": value}, nulls) == [expected, expected]
    missing = pa.record_batch({"other": [1, 2]})
    assert mask({"column": "x", "op": op, "value": value}, missing) == [expected, expected]
    all_null_type = pa.record_batch({"x": pa.nulls(2)})
    assert mask({"column": "x", "op": op, "value": value}, all_null_type) == [expected, expected]


def test_and_or_not_are_two_valued(batch):
    # n > 5 is false for the null row, so not(n > 5) is true there
    assert mask({"not": {"n": {"gt": 5}}}, batch) == [True, True, True, False, False]
    assert mask({"and": [{"n": {"gt": 1}}, {"s": {"like": "%e%"}}]}, batch) == [False, False, False, True, False]
    assert mask({"or": [{"n": 1}, {"s": "cherry"}, {"f": 3.0}]}, batch) == [True, False, True, True, False]
    assert mask({"not": {"or": [{"n": 1}, {"n": {"exists": False}}]}}, batch) == [False, True, False, True, True]


def test_empty_combinators_when_built_directly(batch):
    assert evaluate(And(()), batch).to_pylist() == [True] * 5
    assert evaluate(Or(()), batch).to_pylist() == [False] * 5


def test_filter_batch_keeps_order(batch):
    result = filter_batch(batch, parse_filter({"n": {"gte": 5}}))
    assert result.column("n").to_pylist() == [5, 10, 7]
    assert result.schema == batch.schema


def test_strings_compare_by_code_point():
    words = pa.record_batch({"w": ["Zebra", "apple", "éclair", "zoo"]})
    # upper case sorts before lower case, accented letters after z
    assert mask({"w": {"lt": "a"}}, words) == [True, False, False, False]
    assert mask({"w": {"gt": "zzz"}}, words) == [False, False, True, False]


def test_dictionary_columns_are_compared_by_value():
    encoded = pa.record_batch({"c": pa.array(["x", "y", None, "x"]).dictionary_encode()})
    assert mask({"c": "x"}, encoded) == [True, False, False, True]
    assert mask({"c": {"like": "y%"}}, encoded) == [False, True, False, False]


def test_evaluate_accepts_tables():
    table = pa.Table.from_batches([pa.record_batch({"a": [1, 2]}), pa.record_batch({"a": [3, 4]})])
    result = evaluate(parse_filter({"a": {"gt": 1}}), table)
    assert isinstance(result, pa.BooleanArray)
    assert result.to_pylist() == [False, True, True, True]


def test_large_batch_is_vectorized():
    big = pa.record_batch({"v": pa.array(range(200_000))})
    result = evaluate(parse_filter({"v": {"between": [1000, 1999]}}), big)
    assert result.true_count == 1000


# -- literal coercion --------------------------------------------------------


def test_timestamp_literals_with_and_without_zone():
    utc = pa.timestamp("us", tz="UTC")
    events = pa.record_batch(
        {
            "at": pa.array(
                [dt.datetime(2024, 1, 1, 10, tzinfo=dt.timezone.utc), dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc), None],
                utc,
            ),
            "naive": pa.array([dt.datetime(2024, 1, 1, 10), dt.datetime(2024, 1, 1, 12), None], pa.timestamp("ms")),
        }
    )
    # offset-aware literal against an aware column
    assert mask({"at": {"gt": "2024-01-01T12:30:00+02:00"}}, events) == [False, True, False]
    # naive literal against an aware column is UTC
    assert mask({"at": {"gte": "2024-01-01 12:00:00"}}, events) == [False, True, False]
    assert mask({"at": {"gte": "2024-01-01T12:00:00Z"}}, events) == [False, True, False]
    # naive literal against a naive column; aware literal converted to UTC
    assert mask({"naive": {"lt": "2024-01-01T11:00"}}, events) == [True, False, False]
    assert mask({"naive": {"lt": "2024-01-01T13:00:00+02:00"}}, events) == [True, False, False]
    # YAML datetimes and dates
    assert mask({"naive": dt.datetime(2024, 1, 1, 12)}, events) == [False, True, False]
    assert mask({"at": {"between": ["2024-01-01", "2024-01-01T11:00Z"]}}, events) == [True, False, False]


def test_timestamp_literal_more_precise_than_column_is_refused():
    seconds = pa.record_batch({"t": pa.array([0], pa.timestamp("s"))})
    with pytest.raises(ConfigurationError, match="'t'"):
        mask({"t": {"gt": "1970-01-01T00:00:00.5"}}, seconds)


def test_nanosecond_literals_keep_their_precision():
    nanos = pa.record_batch({"t": pa.array([1, 2], pa.timestamp("ns"))})
    assert mask({"t": {"gt": "1970-01-01T00:00:00.000000001"}}, nanos) == [False, True]


def test_date_literals():
    days = pa.record_batch({"d": pa.array([dt.date(2024, 1, 1), dt.date(2024, 3, 1), None])})
    assert mask({"d": {"gte": "2024-02-01"}}, days) == [False, True, False]
    assert mask({"d": dt.date(2024, 1, 1)}, days) == [True, False, False]
    assert mask({"d": {"in": ["2024-03-01", "2025-01-01"]}}, days) == [False, True, False]


def test_decimal_literals_from_numbers_and_strings():
    money = pa.record_batch({"p": pa.array([Decimal("10.50"), Decimal("3.00"), None], pa.decimal128(12, 2))})
    assert mask({"p": {"gt": 10}}, money) == [True, False, False]
    assert mask({"p": {"gt": 10.5}}, money) == [False, False, False]
    assert mask({"p": {"eq": "10.5"}}, money) == [True, False, False]
    assert mask({"p": {"lte": Decimal("3")}}, money) == [False, True, False]
    assert mask({"p": {"in": ["3", "10.505"]}}, money) == [False, True, False]
    assert mask({"p": {"between": ["3.00", 10.49]}}, money) == [False, True, False]


@pytest.mark.parametrize(
    "arrow_type, value",
    [
        (pa.timestamp("us"), "not a time"),
        (pa.date32(), "2024-13-01"),
        (pa.decimal128(12, 2), "ten"),
        (pa.int64(), "abc"),
        (pa.int64(), True),
    ],
)
def test_bad_literal_names_column_and_value(arrow_type, value):
    data = pa.record_batch({"col": pa.array([None], arrow_type)})
    with pytest.raises(ConfigurationError) as info:
        evaluate(parse_filter({"col": {"gt": value}}, path="where"), data)
    assert "'col'" in info.value.message
    assert repr(value) in info.value.message
    assert info.value.path == "where.col.gt"


def test_coerce_literal_directly():
    assert coerce_literal("2024-01-02", pa.date32(), column="d").as_py() == dt.date(2024, 1, 2)
    assert coerce_literal("1.25", pa.decimal128(5, 2), column="p").as_py() == Decimal("1.25")
    assert coerce_literal(None, pa.int32(), column="x").type == pa.int32()
    assert coerce_literal(5, pa.string(), column="s").as_py() == "5"


def test_unsupported_operator_for_type_is_a_configuration_error():
    nested = pa.record_batch({"l": pa.array([[1], [2]])})
    with pytest.raises(ConfigurationError, match="'l'"):
        mask({"l": {"gt": 1}}, nested)
