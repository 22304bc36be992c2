"""Tests of ferry.tasks.expressions: grammar, functions, errors."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import pyarrow as pa
import pytest

from ferry.backends.errors import ConfigurationError, DataError
from ferry.tasks.expressions import (
    FUNCTIONS,
    Binary,
    Call,
    Column,
    Literal,
    Unary,
    evaluate_expression,
    first_failing_row,
    parse_expression,
)


@pytest.fixture
def batch():
    return pa.record_batch(
        {
            "a": pa.array([1, 2, None, 4], pa.int64()),
            "b": pa.array([10, 0, 3, -2], pa.int32()),
            "x": pa.array([1.5, -2.25, None, 4.0]),
            "s": pa.array(["  Hello ", "wörld", None, "ABC"]),
            "flag": pa.array([True, False, None, True]),
            "odd name": pa.array(["p", "q", "r", "s"]),
        }
    )


def run(text: str, batch: pa.RecordBatch) -> list:
    result = evaluate_expression(parse_expression(text), batch)
    assert len(result) == batch.num_rows
    return result.to_pylist()


# -- grammar -----------------------------------------------------------------


def test_tree_shape_and_precedence():
    assert parse_expression("a + b * c") == Binary("+", Column("a"), Binary("*", Column("b"), Column("c")))
    assert parse_expression("(a + b) * c") == Binary("*", Binary("+", Column("a"), Column("b")), Column("c"))
    assert parse_expression("a - b - c") == Binary("-", Binary("-", Column("a"), Column("b")), Column("c"))
    assert parse_expression("-a * b") == Binary("*", Unary("-", Column("a")), Column("b"))
    assert parse_expression("not a == 1 and b") == Binary(
        "and", Unary("not", Binary("==", Column("a"), Literal(1))), Column("b")
    )
    assert parse_expression("a or b and c") == Binary("or", Column("a"), Binary("and", Column("b"), Column("c")))
    assert parse_expression("a + 1 > b * 2") == Binary(
        ">", Binary("+", Column("a"), Literal(1)), Binary("*", Column("b"), Literal(2))
    )


def test_literals():
    assert parse_expression("42") == Literal(42)
    assert parse_expression("1.5") == Literal(1.5)
    assert parse_expression("2e3") == Literal(2000.0)
    assert parse_expression("-7") == Literal(-7)
    assert parse_expression("-9223372036854775808") == Literal(-(2**63))
    assert parse_expression("'it''s'") == Literal("it's")
    assert parse_expression("TRUE") == Literal(True)
    assert parse_expression("false") == Literal(False)
    assert parse_expression("Null") == Literal(None)


def test_columns_and_backquotes():
    expr = parse_expression("concat(`odd name`, s, `a``b`)")
    assert expr == Call("concat", (Column("odd name"), Column("s"), Column("a`b")))
    assert expr.columns() == {"odd name", "s", "a`b"}
    assert parse_expression("upper(s) == 'X' and a > b + 1").columns() == {"s", "a", "b"}
    assert parse_expression("1 + 2").columns() == set()


def test_node_sources_are_the_original_text():
    expr = parse_expression("round( a / b , 2)")
    assert expr.source == "round( a / b , 2)"
    assert expr.args[0].source == "a / b"


def test_arithmetic(batch):
    assert run("a + b", batch) == [11, 2, None, 2]
    assert run("a - b", batch) == [-9, 2, None, 6]
    assert run("a * 3", batch) == [3, 6, None, 12]
    assert run("-a", batch) == [-1, -2, None, -4]
    assert run("x * 2 + 1", batch) == [4.0, -3.5, None, 9.0]
    assert run("2 + 3 * 4", batch) == [14] * 4  # constants broadcast


def test_integer_division_gives_float64(batch):
    result = evaluate_expression(parse_expression("a / 2"), batch)
    assert result.type == pa.float64()
    assert result.to_pylist() == [0.5, 1.0, None, 2.0]
    assert run("7 / 2", batch) == [3.5] * 4


def test_remainder_has_the_sign_of_the_dividend(batch):
    data = pa.record_batch({"p": [7, -7, 7, -7], "q": [2, 2, -2, -2]})
    assert run("p % q", data) == [1, -1, 1, -1]
    assert run("x % 1", batch)[:2] == [0.5, -0.25]


def test_remainder_fallback_formula(monkeypatch):
    import pyarrow.compute as pc

    monkeypatch.delattr(pc, "remainder_checked", raising=False)
    data = pa.record_batch({"p": [7, -7, 7, -7], "q": [2, 2, -2, -2], "r": [7.5, -7.5, 1.0, 2.0]})
    assert run("p % q", data) == [1, -1, 1, -1]
    assert run("r % 2", data) == [1.5, -1.5, 1.0, 0.0]


def test_comparisons(batch):
    assert run("a == 2", batch) == [False, True, None, False]
    assert run("a != 2", batch) == [True, False, None, True]
    assert run("a < b", batch) == [True, False, None, False]
    assert run("a <= 2", batch) == [True, True, None, False]
    assert run("a > 1", batch) == [False, True, None, True]
    assert run("a >= 4", batch) == [False, False, None, True]
    assert run("s == 'ABC'", batch) == [False, False, None, True]


def test_boolean_logic_is_kleene(batch):
    assert run("flag and a > 1", batch) == [False, False, None, True]
    assert run("flag or a > 1", batch) == [True, True, None, True]
    assert run("not flag", batch) == [False, True, None, False]
    assert run("is_null(flag) or flag", batch) == [True, False, True, True]


def test_null_literals_take_the_other_type(batch):
    assert run("a + null", batch) == [None] * 4
    assert run("if_else(a > 1, null, a)", batch) == [1, None, None, None]
    assert run("coalesce(null, 5)", batch) == [5] * 4
    result = evaluate_expression(parse_expression("coalesce(a, null)"), batch)
    assert result.type == pa.int64()


def test_decimal_columns_stay_exact():
    money = pa.record_batch({"p": pa.array([Decimal("10.10"), Decimal("0.30")], pa.decimal128(12, 2))})
    result = evaluate_expression(parse_expression("p * 1.1"), money)
    assert pa.types.is_decimal(result.type)
    assert result.to_pylist() == [Decimal("11.110"), Decimal("0.330")]
    assert run("p > '1.5'", money) == [True, False]


def test_string_literals_compare_with_dates_and_timestamps():
    data = pa.record_batch(
        {
            "d": pa.array([dt.date(2024, 1, 1), dt.date(2024, 6, 1)]),
            "t": pa.array([dt.datetime(2024, 1, 1, 9), dt.datetime(2024, 1, 1, 11)], pa.timestamp("us", tz="UTC")),
        }
    )
    assert run("d >= '2024-03-01'", data) == [False, True]
    assert run("'2024-01-01T10:00:00Z' < t", data) == [False, True]


# -- functions -----------------------------------------------------------------


def test_string_functions(batch):
    assert run("upper(s)", batch) == ["  HELLO ", "WÖRLD", None, "ABC"]
    assert run("lower(s)", batch) == ["  hello ", "wörld", None, "abc"]
    assert run("length(s)", batch) == [8, 5, None, 3]
    assert run("trim(s)", batch) == ["Hello", "wörld", None, "ABC"]
    assert run("substr(s, 1, 3)", batch) == [" He", "örl", None, "BC"]
    assert run("substr(s, 2)", batch) == ["Hello ", "rld", None, "C"]
    assert run("concat(trim(s), '-', a)", batch) == ["Hello-1", "wörld-2", None, "ABC-4"]
    assert run("concat(`odd name`)", batch) == ["p", "q", "r", "s"]


def test_concat_mixes_string_types():
    data = pa.record_batch({"l": pa.array(["x", "y"], pa.large_string()), "n": [1, 2]})
    result = evaluate_expression(parse_expression("concat(l, '/', n)"), data)
    assert result.to_pylist() == ["x/1", "y/2"]


def test_numeric_functions(batch):
    assert run("abs(b)", batch) == [10, 0, 3, 2]
    assert run("round(x)", batch) == [2.0, -2.0, None, 4.0]  # half away from zero
    assert run("round(x, 1)", batch) == [1.5, -2.3, None, 4.0]
    assert run("round(1234, -2)", batch) == [1200] * 4
    assert run("floor(x)", batch) == [1.0, -3.0, None, 4.0]
    assert run("ceil(x)", batch) == [2.0, -2.0, None, 4.0]
    assert run("sqrt(a)", batch)[3] == 2.0
    assert run("min(a, b)", batch) == [1, 0, 3, -2]
    assert run("max(a, b, 3)", batch) == [10, 3, 3, 4]


def test_null_functions(batch):
    assert run("coalesce(a, b, 0)", batch) == [1, 2, 3, 4]
    assert run("is_null(a)", batch) == [False, False, True, False]
    assert run("is_valid(s)", batch) == [True, True, False, True]
    assert run("if_else(flag, 'yes', 'no')", batch) == ["yes", "no", None, "yes"]


def test_temporal_functions():
    moments = pa.record_batch(
        {"t": pa.array([dt.datetime(2024, 2, 29, 13, 45, 30), None], pa.timestamp("us")), "s": ["2024-05-06", None]}
    )
    assert run("year(t)", moments) == [2024, None]
    assert run("month(t)", moments) == [2, None]
    assert run("day(t)", moments) == [29, None]
    assert run("hour(t)", moments) == [13, None]
    assert run("minute(t)", moments) == [45, None]
    assert run("second(t)", moments) == [30, None]
    assert run("day_of_week(t)", moments) == [3, None]  # Monday = 0
    assert run("date(t)", moments) == [dt.date(2024, 2, 29), None]
    assert run("date(s)", moments) == [dt.date(2024, 5, 6), None]


def test_cast_function(batch):
    result = evaluate_expression(parse_expression("cast(a, 'int32')"), batch)
    assert result.type == pa.int32()
    assert run("cast(b, 'string')", batch) == ["10", "0", "3", "-2"]
    decimals = evaluate_expression(parse_expression("cast('1.25', 'decimal(5,2)')"), batch)
    assert decimals.type == pa.decimal128(5, 2)


def test_every_allowed_function_is_tested_somewhere():
    tested = {
        "upper", "lower", "length", "trim", "substr", "concat", "abs", "round", "floor", "ceil",
        "sqrt", "coalesce", "if_else", "is_null", "is_valid", "year", "month", "day", "hour",
        "minute", "second", "day_of_week", "date", "cast", "min", "max",
    }  # fmt: skip
    assert tested == set(FUNCTIONS)


def test_function_names_are_case_insensitive(batch):
    assert run("UPPER(s)", batch) == run("upper(s)", batch)


# -- syntax errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("a +", 4, "expected a value"),
        ("a + * b", 5, "found '*'"),
        ("a = 1", 3, "use '=='"),
        ('"x"', 1, "single quotes"),
        ("'abc", 1, "unterminated string"),
        ("`abc", 1, "unterminated column name"),
        ("(a + 1", 7, "expected ')'"),
        ("a b", 3, "expected an operator or the end, found 'b'"),
        ("f(a) + 1", 1, "unknown function 'f'"),
        ("upper(a, b)", 1, "takes 1 argument"),
        ("substr(s)", 1, "takes 2 to 3"),
        ("substr(s, a, 2)", 1, "whole number >= 0"),
        ("round(x, 1.5)", 1, "whole number"),
        ("cast(a, int64)", 1, "type name in quotes"),
        ("cast(a, 'whatever')", 1, "unknown type name"),
        ("concat()", 1, "at least 1"),
        ("a < b < c", 7, "do not chain"),
        ("", 1, "found nothing"),
        ("a & b", 3, "use 'and'"),
        ("99999999999999999999", 1, "int64"),
        ("a +  and", 6, "expected a value"),
        ("min(a,)", 7, "expected a value"),
    ],
)
def test_syntax_errors_report_position(text, position, fragment):
    with pytest.raises(ConfigurationError) as info:
        parse_expression(text)
    assert info.value.position == position
    assert f"at position {position}" in info.value.message
    assert fragment in info.value.message


def test_unknown_function_lists_allowed_ones():
    with pytest.raises(ConfigurationError) as info:
        parse_expression("explode(a)")
    for name in FUNCTIONS:
        assert name in info.value.message


def test_parse_error_carries_source_and_path():
    with pytest.raises(ConfigurationError) as info:
        parse_expression("a +", source="job.yaml", path="transforms[1].derive.total")
    assert str(info.value).startswith("job.yaml: transforms[1].derive.total: invalid expression")


# -- evaluation errors ---------------------------------------------------------


def test_overflow_raises_instead_of_wrapping():
    big = pa.record_batch({"v": pa.array([1, 2**62, 3], pa.int64())})
    with pytest.raises(DataError) as info:
        evaluate_expression(parse_expression("v * 4"), big)
    assert "overflow" in str(info.value)
    assert info.value.column == "v"
    assert info.value.value == 2**62
    assert "at row 1" in str(info.value)
    for text in ("v + 9223372036854775807", "-v - 9223372036854775807", "abs(v - 4611686018427387906 - 4611686018427387906)"):
        with pytest.raises(DataError):
            evaluate_expression(parse_expression(text), big)


def test_negating_the_minimum_overflows():
    data = pa.record_batch({"v": pa.array([-(2**63)], pa.int64())})
    with pytest.raises(DataError, match="overflow"):
        evaluate_expression(parse_expression("-v"), data)


def test_division_by_zero_names_expression_and_row(batch):
    with pytest.raises(DataError) as info:
        evaluate_expression(parse_expression("a / b + 1"), batch)
    message = str(info.value)
    assert "divide by zero" in message
    assert "'a / b'" in message and "'a / b + 1'" in message
    assert info.value.value == "a=2, b=0"
    assert info.value.row == 1
    with pytest.raises(DataError):
        evaluate_expression(parse_expression("x / 0.0"), batch)
    with pytest.raises(DataError):
        evaluate_expression(parse_expression("a % b"), batch)


def test_division_by_zero_workaround_gives_null(batch):
    assert run("a / if_else(b == 0, null, b)", batch) == [0.1, None, None, -2.0]


def test_failed_cast_is_a_data_error():
    data = pa.record_batch({"t": ["1", "x", "300"]})
    with pytest.raises(DataError) as info:
        evaluate_expression(parse_expression("cast(t, 'int8')"), data)
    assert info.value.column == "t"
    assert info.value.value == "x"
    with pytest.raises(DataError):
        evaluate_expression(parse_expression("cast(t, 'int8')"), data.slice(2))


def test_sqrt_of_negative_is_a_data_error(batch):
    with pytest.raises(DataError, match="square root"):
        evaluate_expression(parse_expression("sqrt(b)"), batch)


def test_type_mismatch_is_a_configuration_error(batch):
    with pytest.raises(ConfigurationError, match="upper"):
        evaluate_expression(parse_expression("upper(a)"), batch)
    with pytest.raises(ConfigurationError):
        evaluate_expression(parse_expression("a and flag"), batch)
    with pytest.raises(ConfigurationError):
        evaluate_expression(parse_expression("s + 1"), batch)


def test_constant_failure_is_a_configuration_error(batch):
    with pytest.raises(ConfigurationError, match="always fails"):
        evaluate_expression(parse_expression("a + 1 / 0"), batch)


def test_missing_column_lists_available(batch):
    with pytest.raises(ConfigurationError) as info:
        evaluate_expression(parse_expression("nope + 1"), batch)
    assert "'nope'" in info.value.message
    assert "a, b, x, s, flag, odd name" in info.value.message


def test_empty_batch_gives_typed_empty_result(batch):
    empty = batch.slice(0, 0)
    result = evaluate_expression(parse_expression("a / 2 > 1"), empty)
    assert len(result) == 0 and result.type == pa.bool_()


def test_explain_false_skips_locating(batch):
    with pytest.raises(DataError) as info:
        evaluate_expression(parse_expression("a / b"), batch, explain=False)
    assert info.value.row is None


def test_first_failing_row():
    data = pa.record_batch({"v": list(range(1000))})

    def fails_on_big(part):
        if any(v >= 700 for v in part.column("v").to_pylist()):
            raise DataError("too big")

    assert first_failing_row(fails_on_big, data) == 700
    assert first_failing_row(lambda part: None, data) is None


def test_large_batch():
    n = 200_000
    data = pa.record_batch({"a": pa.array(range(n)), "b": pa.array([2] * n)})
    result = evaluate_expression(parse_expression("if_else(a % b == 0, a / b, -1)"), data)
    assert result[10].as_py() == 5.0 and result[11].as_py() == -1.0
    assert not math.isnan(result[0].as_py())
