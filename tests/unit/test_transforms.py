"""Tests of ferry.tasks.transforms: steps, output_schema, failure isolation, hooks."""

from __future__ import annotations

import time
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ferry.backends.errors import ConfigurationError, DataError
from ferry.tasks.transforms import (
    REJECTS_SCHEMA,
    STEP_NAMES,
    CastStep,
    DeriveStep,
    FilterStep,
    PythonStep,
    SelectStep,
    TransformChain,
    parse_steps,
)

HOOKS = "tests.unit.test_transforms"


# -- hooks referenced as tests.unit.test_transforms:<name> ------------------------


def add_one_arrow(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.append_column("plus_one", pc.add(batch.column("n"), 1))


def add_one_pandas(df: pd.DataFrame) -> pd.DataFrame:
    df["plus_one"] = df["n"] + 1
    df["label"] = df["name"].str.upper()
    return df


def reject_thirteen_arrow(batch: pa.RecordBatch) -> pa.RecordBatch:
    # Fails for the whole batch when any row holds 13: only bisection can save the others.
    if 13 in batch.column("n").to_pylist():
        raise ValueError("13 is unlucky")
    return batch


def reject_thirteen_pandas(df: pd.DataFrame) -> pd.DataFrame:
    if (df["n"] == 13).any():
        raise ValueError("13 is unlucky")
    df["double"] = df["n"] * 2
    return df


def keep_even_pandas(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["n"] % 2 == 0]


def returns_nothing(batch):
    return None


def fails_on_empty(df: pd.DataFrame) -> pd.DataFrame:
    df.iloc[0]
    return df


def untyped_object_column(df: pd.DataFrame) -> pd.DataFrame:
    df["obj"] = df["n"].apply(lambda v: f"#{v}")
    return df


def typed_object_column(df: pd.DataFrame) -> pd.DataFrame:
    df["obj"] = df["n"].apply(lambda v: f"#{v}").astype("string")
    return df


NOT_CALLABLE = 42


# -- helpers ---------------------------------------------------------------------


def chain(raw, on_error="fail") -> TransformChain:
    return TransformChain(parse_steps(raw), on_error=on_error)


@pytest.fixture
def batch():
    return pa.record_batch(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "name": pa.array(["ann", "bob", None, "dee"]),
            "amount": pa.array(["10.5", "3", "7.25", None]),
            "debug": pa.array([True, False, True, False]),
        }
    )


# -- parsing -------------------------------------------------------------------------


def test_parse_every_step_kind():
    steps = parse_steps(
        [
            {"select": ["a", "b"]},
            {"rename": {"a": "x"}},
            {"drop": ["b"]},
            {"cast": {"x": "int32"}},
            {"filter": {"x": {"gt": 1}}},
            {"derive": {"y": "x * 2"}},
            {"python": f"{HOOKS}:add_one_arrow"},
            {"python": f"{HOOKS}:add_one_pandas", "api": "pandas"},
        ]
    )
    assert [s.kind for s in steps] == ["select", "rename", "drop", "cast", "filter", "derive", "python", "python"]
    assert [s.index for s in steps] == list(range(8))
    assert steps[3].casts == (("x", "int32", pa.int32()),)
    assert steps[6].function is add_one_arrow and steps[6].api == "arrow"
    assert steps[7].api == "pandas"
    assert parse_steps(None) == [] and parse_steps([]) == []


@pytest.mark.parametrize(
    "raw, path, fragment",
    [
        ([{"selekt": ["a"]}], "transforms[0]", "unknown step 'selekt'"),
        ([{"select": ["a"], "drop": ["b"]}], "transforms[0]", "unknown step 'drop'"),
        (["select"], "transforms[0]", "single-key mapping"),
        ([{"select": []}], "transforms[0].select", "non-empty list"),
        ([{"select": "a"}], "transforms[0].select", "non-empty list"),
        ([{"select": ["a", "a"]}], "transforms[0].select", "listed twice"),
        ([{"drop": [1]}], "transforms[0].drop[0]", "column name"),
        ([{"rename": ["a"]}], "transforms[0].rename", "mapping"),
        ([{"rename": {"a": "x", "b": "x"}}], "transforms[0].rename", "same name"),
        ([{"rename": {"a": None}}], "transforms[0].rename.a", "new column name"),
        ([{"select": ["a"]}, {"cast": {"a": "intt"}}], "transforms[1].cast.a", "unknown type name"),
        ([{"cast": {"a": 5}}], "transforms[0].cast.a", "type name"),
        ([{"filter": {"a": {"nope": 1}}}], "transforms[0].filter.a", "unknown operator"),
        ([{"derive": {"y": "a +"}}], "transforms[0].derive.y", "position 4"),
        ([{"derive": {"y": 5}}], "transforms[0].derive.y", "expression string"),
        ([{"python": "no_colon"}], "transforms[0].python", "package.module:function"),
        ([{"python": "ferry_no_such_module_xyz:f"}], "transforms[0].python", "cannot import module"),
        ([{"python": f"{HOOKS}:missing_fn"}], "transforms[0].python", "no attribute 'missing_fn'"),
        ([{"python": f"{HOOKS}:NOT_CALLABLE"}], "transforms[0].python", "not callable"),
        ([{"python": f"{HOOKS}:add_one_arrow", "api": "polars"}], "transforms[0].api", "api: pandas"),
        ({"select": ["a"]}, "transforms", "list of steps"),
    ],
)
def test_parse_errors(raw, path, fragment):
    with pytest.raises(ConfigurationError) as info:
        parse_steps(raw, source="job.yaml")
    assert info.value.path == path
    assert info.value.source == "job.yaml"
    assert fragment in info.value.message


def test_unknown_step_lists_valid_ones():
    with pytest.raises(ConfigurationError) as info:
        parse_steps([{"explode": "a"}])
    for name in STEP_NAMES:
        assert name in info.value.message


def test_on_error_is_validated():
    with pytest.raises(ConfigurationError, match="collect"):
        TransformChain([], on_error="ignore")


# -- each step -------------------------------------------------------------------------


def test_identity_chain_returns_the_batch(batch):
    identity = TransformChain([])
    assert identity.is_identity
    result = identity.apply(batch)
    assert result.batch is batch and result.rejects is None
    assert identity.output_schema(batch.schema) == batch.schema
    assert not chain([{"drop": ["debug"]}]).is_identity


def test_select_orders_columns(batch):
    result = chain([{"select": ["name", "id"]}]).apply(batch)
    assert result.batch.schema.names == ["name", "id"]
    assert result.batch.column("id").to_pylist() == [1, 2, 3, 4]


def test_drop(batch):
    assert chain([{"drop": ["debug", "amount"]}]).apply(batch).batch.schema.names == ["id", "name"]


def test_rename_is_simultaneous(batch):
    result = chain([{"rename": {"id": "name", "name": "id"}}]).apply(batch).batch
    assert result.schema.names == ["name", "id", "amount", "debug"]
    assert result.column("name").to_pylist() == [1, 2, 3, 4]


def test_rename_to_existing_name_is_refused(batch):
    with pytest.raises(ConfigurationError, match="duplicate column"):
        chain([{"rename": {"id": "name"}}]).output_schema(batch.schema)


def test_cast(batch):
    result = chain([{"cast": {"amount": "decimal(10,2)", "id": "int32"}}]).apply(batch).batch
    assert result.schema.field("amount").type == pa.decimal128(10, 2)
    assert result.schema.field("id").type == pa.int32()
    assert result.column("amount").to_pylist() == [Decimal("10.50"), Decimal("3.00"), Decimal("7.25"), None]
    assert result.schema.names == batch.schema.names


def test_cast_unsupported_conversion_is_a_configuration_error():
    nested = pa.record_batch({"l": pa.array([[1]])})
    with pytest.raises(ConfigurationError, match="cannot cast column 'l'"):
        chain([{"cast": {"l": "int64"}}]).apply(nested)


def test_filter_step(batch):
    result = chain([{"filter": {"or": [{"id": {"gte": 3}}, {"name": "ann"}]}}]).apply(batch).batch
    assert result.column("id").to_pylist() == [1, 3, 4]


def test_derive_appends_and_replaces_in_place(batch):
    result = chain(
        [{"derive": {"id": "id * 10", "greeting": "concat('hi ', coalesce(name, '?'))", "big": "id > 20"}}]
    ).apply(batch).batch
    assert result.schema.names == ["id", "name", "amount", "debug", "greeting", "big"]
    assert result.column("id").to_pylist() == [10, 20, 30, 40]
    assert result.column("greeting").to_pylist() == ["hi ann", "hi bob", "hi ?", "hi dee"]
    # later expressions see earlier ones of the same step
    assert result.column("big").to_pylist() == [False, False, True, True]


def test_python_hook_arrow(batch):
    data = pa.record_batch({"n": [1, 2, 3], "name": ["a", "b", "c"]})
    result = chain([{"python": f"{HOOKS}:add_one_arrow"}]).apply(data).batch
    assert result.column("plus_one").to_pylist() == [2, 3, 4]


def test_python_hook_pandas_keeps_types():
    data = pa.record_batch({"n": pa.array([1, None, 3], pa.int64()), "name": ["a", "b", None]})
    steps = chain([{"python": f"{HOOKS}:add_one_pandas", "api": "pandas"}])
    schema = steps.output_schema(data.schema)
    result = steps.apply(data).batch
    assert result.schema == schema
    # pandas made n float64 because of the null and name large_string: both come back
    assert schema.field("n").type == pa.int64()
    assert schema.field("name").type == pa.string()
    assert result.column("n").to_pylist() == [1, None, 3]
    assert result.column("plus_one").to_pylist() == [2, None, 4]
    assert result.column("label").to_pylist() == ["A", "B", None]
    assert result.schema.metadata is None


def test_python_hook_that_drops_rows():
    data = pa.record_batch({"n": [1, 2, 3, 4]})
    result = chain([{"python": f"{HOOKS}:keep_even_pandas", "api": "pandas"}]).apply(data)
    assert result.batch.column("n").to_pylist() == [2, 4]


def test_python_hook_must_return_a_batch():
    with pytest.raises(ConfigurationError, match="must return a pyarrow.RecordBatch"):
        chain([{"python": f"{HOOKS}:returns_nothing"}]).apply(pa.record_batch({"n": [1]}))


def test_python_hook_failing_on_empty_batch_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="empty batch"):
        chain([{"python": f"{HOOKS}:fails_on_empty", "api": "pandas"}]).output_schema(pa.schema([("n", pa.int64())]))


def test_python_hook_untyped_object_column_needs_an_explicit_type():
    data = pa.record_batch({"n": [1, 2]})
    with pytest.raises(ConfigurationError, match="explicit type"):
        chain([{"python": f"{HOOKS}:untyped_object_column", "api": "pandas"}]).apply(data)
    typed = chain([{"python": f"{HOOKS}:typed_object_column", "api": "pandas"}]).apply(data).batch
    assert typed.column("obj").to_pylist() == ["#1", "#2"]


# -- output_schema ----------------------------------------------------------------------


def test_output_schema_follows_the_chain(batch):
    steps = chain(
        [
            {"rename": {"amount": "amount_text"}},
            {"cast": {"amount_text": "decimal(10,2)"}},
            {"drop": ["debug"]},
            {"derive": {"eur": "amount_text * 2", "upper": "upper(name)", "id": "id / 2"}},
            {"filter": {"eur": {"gt": 1}}},
            {"select": ["id", "eur", "upper"]},
        ]
    )
    schema = steps.output_schema(batch.schema)
    assert schema.names == ["id", "eur", "upper"]
    assert schema.field("id").type == pa.float64()
    assert pa.types.is_decimal(schema.field("eur").type)
    assert schema.field("upper").type == pa.string()
    assert steps.apply(batch).batch.schema == schema


@pytest.mark.parametrize(
    "raw, path, missing",
    [
        ([{"drop": ["debug"]}, {"select": ["id", "debug"]}], "transforms[1].select", "debug"),
        ([{"drop": ["nope"]}], "transforms[0].drop", "nope"),
        ([{"rename": {"nope": "x"}}], "transforms[0].rename", "nope"),
        ([{"cast": {"nope": "int64"}}], "transforms[0].cast", "nope"),
        ([{"filter": {"nope": 1}}], "transforms[0].filter", "nope"),
        ([{"select": ["id"]}, {"derive": {"x": "name + 1"}}], "transforms[1].derive.x", "name"),
    ],
)
def test_output_schema_missing_column(batch, raw, path, missing):
    with pytest.raises(ConfigurationError) as info:
        chain(raw).output_schema(batch.schema)
    assert info.value.path == path
    assert f"'{missing}'" in info.value.message
    assert "available columns" in info.value.message


def test_missing_column_message_names_step_and_lists_columns(batch):
    with pytest.raises(ConfigurationError) as info:
        chain([{"select": ["id", "nope"]}]).output_schema(batch.schema)
    assert "step 0 (select)" in info.value.message
    assert "available columns: id, name, amount, debug" in info.value.message


def test_type_mismatch_in_derive_found_by_output_schema(batch):
    with pytest.raises(ConfigurationError) as info:
        chain([{"derive": {"x": "upper(id)"}}]).output_schema(batch.schema)
    assert info.value.path == "transforms[0].derive.x"


def test_output_schema_of_empty_result_when_everything_is_rejected():
    data = pa.record_batch({"v": ["a", "b"]})
    steps = chain([{"cast": {"v": "int64"}}, {"derive": {"w": "v + 1"}}], on_error="collect")
    result = steps.apply(data)
    assert result.batch.num_rows == 0
    assert result.batch.schema == steps.output_schema(data.schema)
    assert result.rejected_count == 2


# -- failure handling ---------------------------------------------------------------------


def big_batch(n=10_000, bad=None):
    values = [str(i) for i in range(n)]
    for position, value in (bad or {}).items():
        values[position] = value
    return pa.record_batch({"id": pa.array(range(n), pa.int64()), "v": pa.array(values)})


def test_cast_failure_fails_with_step_column_and_example():
    data = big_batch(bad={4321: "abc"})
    with pytest.raises(DataError) as info:
        chain([{"select": ["id", "v"]}, {"cast": {"v": "int64"}}]).apply(data)
    message = str(info.value)
    assert "transforms[1].cast" in message
    assert "input row 4321" in message
    assert info.value.column == "v"
    assert info.value.value == "abc"


def test_bisection_isolates_exactly_the_bad_rows():
    # 10,000 rows whose values are their index (all fit int16), three of them bad:
    # unparsable, garbage, and an int16 overflow.
    data = big_batch(bad={17: "abc", 5000: "1e99x", 9999: "40000"})
    result = chain([{"cast": {"v": "int16"}}], on_error="collect").apply(data)
    assert result.batch.num_rows == 9_997
    assert result.batch.column("id").to_pylist() == [i for i in range(10_000) if i not in (17, 5000, 9999)]
    assert result.batch.schema.field("v").type == pa.int16()
    rejects = result.rejects
    assert rejects.schema == REJECTS_SCHEMA
    assert rejects.column("row_index").to_pylist() == [17, 5000, 9999]
    assert rejects.column("value").to_pylist() == ["abc", "1e99x", "40000"]
    assert set(rejects.column("step").to_pylist()) == {"cast"}
    assert set(rejects.column("column").to_pylist()) == {"v"}
    assert set(rejects.column("error_class").to_pylist()) == {"ArrowInvalid"}
    assert all("int16" in reason for reason in rejects.column("reason").to_pylist())
    assert result.batch.column("v").to_pylist()[:18] == list(range(17)) + [18]


def test_safe_cast_refuses_overflow_and_truncation():
    data = pa.record_batch({"i": pa.array([1, 300, 5]), "f": pa.array([1.0, 2.0, 2.5])})
    result = chain([{"cast": {"i": "int8", "f": "int64"}}], on_error="collect").apply(data)
    assert result.batch.column("i").to_pylist() == [1]
    assert result.rejects.column("row_index").to_pylist() == [1, 2]
    assert result.rejects.column("column").to_pylist() == ["i", "f"]
    assert result.rejects.column("value").to_pylist() == ["300", "2.5"]


def test_bisection_cost_is_logarithmic():
    calls = {"n": 0}
    step = CastStep(casts=(("v", "int64", pa.int64()),))
    original = CastStep.apply

    def counting(self, batch):
        calls["n"] += 1
        return original(self, batch)

    CastStep.apply = counting
    try:
        TransformChain([step], on_error="collect").apply(big_batch(n=100_000, bad={77_777: "x"}))
    finally:
        CastStep.apply = original
    assert calls["n"] < 3 * 17 + 5  # about 2 calls per level of a 17-level bisection


def test_derive_failures_are_collected_with_input_row_index():
    data = pa.record_batch({"a": pa.array([10, 20, 30, 40, 50, 2**62]), "b": pa.array([1, 0, 3, 4, 0, 1])})
    steps = chain(
        [{"filter": {"a": {"gte": 20}}}, {"derive": {"ratio": "a / b", "twice": "a * 4"}}],
        on_error="collect",
    )
    result = steps.apply(data)
    assert result.batch.column("a").to_pylist() == [30, 40]
    rows = result.rejects.to_pylist()
    assert [r["row_index"] for r in rows] == [1, 4, 5]  # indexes in the input, despite the filter
    assert [r["column"] for r in rows] == ["ratio", "ratio", "twice"]
    assert rows[0]["value"] == "a=20, b=0"
    assert rows[2]["value"] == str(2**62)
    assert "divide by zero" in rows[0]["reason"] and "overflow" in rows[2]["reason"]
    assert {r["step"] for r in rows} == {"derive"}
    assert result.batch.schema == steps.output_schema(data.schema)


def test_derive_failure_fails_by_default():
    data = pa.record_batch({"a": [1, 2], "b": [1, 0]})
    with pytest.raises(DataError) as info:
        chain([{"derive": {"ratio": "a / b"}}]).apply(data)
    assert "transforms[0].derive failed on input row 1" in str(info.value)
    assert info.value.column == "ratio"


def test_python_hook_failure_fail_mode_names_the_hook():
    data = pa.record_batch({"n": [1, 13, 2]})
    with pytest.raises(DataError) as info:
        chain([{"python": f"{HOOKS}:reject_thirteen_arrow"}]).apply(data)
    assert f"{HOOKS}:reject_thirteen_arrow" in str(info.value)
    assert "ValueError" in str(info.value)
    assert "input row 1" in str(info.value)


@pytest.mark.parametrize("api", ["arrow", "pandas"])
def test_python_hook_failures_are_bisected(api):
    n = 1000
    values = list(range(100, 100 + n))  # 13 only where planted
    values[100] = values[900] = 13
    data = pa.record_batch({"n": pa.array(values, pa.int64())})
    hook = "reject_thirteen_arrow" if api == "arrow" else "reject_thirteen_pandas"
    result = chain([{"python": f"{HOOKS}:{hook}", "api": api}], on_error="collect").apply(data)
    assert result.batch.num_rows == n - 2
    assert 13 not in result.batch.column("n").to_pylist()
    rows = result.rejects.to_pylist()
    assert [r["row_index"] for r in rows] == [100, 900]
    assert {r["error_class"] for r in rows} == {"ValueError"}
    assert {r["step"] for r in rows} == {"python"}
    assert all("13 is unlucky" in r["reason"] for r in rows)
    if api == "pandas":
        assert result.batch.column("double").to_pylist()[:3] == [200, 202, 204]


def test_constant_failure_is_not_bisected(batch):
    with pytest.raises(ConfigurationError, match="always fails"):
        chain([{"derive": {"x": "id + 1 / 0"}}], on_error="collect").apply(batch)


def test_row_order_is_kept_across_steps_with_rejects():
    data = big_batch(n=2000, bad={3: "x", 1500: "y"})
    steps = chain(
        [
            {"cast": {"v": "int64"}},
            {"filter": {"v": {"neq": 10}}},
            {"derive": {"inv": "1000 / (v - 999)"}},
        ],
        on_error="collect",
    )
    result = steps.apply(data)
    expected_ids = [i for i in range(2000) if i not in (3, 1500, 10, 999)]
    assert result.batch.column("id").to_pylist() == expected_ids
    assert result.rejects.column("row_index").to_pylist() == [3, 1500, 999]
    assert result.rejects.column("step").to_pylist() == ["cast", "cast", "derive"]


def test_fast_path_is_vectorized():
    n = 200_000
    data = pa.record_batch({"id": pa.array(range(n)), "v": pa.array([str(i) for i in range(n)])})
    steps = chain(
        [
            {"cast": {"v": "int64"}},
            {"derive": {"w": "v * 2 + id", "s": "concat('#', v)"}},
            {"filter": {"w": {"gt": 10}}},
            {"select": ["id", "w", "s"]},
        ],
        on_error="collect",
    )
    start = time.perf_counter()
    result = steps.apply(data)
    elapsed = time.perf_counter() - start
    assert result.rejects is None
    assert result.batch.num_rows == n - 4
    assert elapsed < 2.0  # one vectorized call per step; a Python loop would take far longer


def test_steps_can_be_built_directly():
    from ferry.backends.filters import parse_filter
    from ferry.tasks.expressions import parse_expression

    steps = [
        SelectStep(columns=("a",)),
        DeriveStep(items=(("b", parse_expression("a + 1")),), index=1),
        FilterStep(filter=parse_filter({"b": {"gt": 2}}), index=2),
    ]
    result = TransformChain(steps).apply(pa.record_batch({"a": [1, 2, 3], "z": [0, 0, 0]}))
    assert result.batch.to_pydict() == {"a": [2, 3], "b": [3, 4]}
    assert PythonStep(ref="x:y", function=add_one_arrow) == PythonStep(ref="x:y", function=None)


def test_rejects_after_a_row_dropping_hook_have_null_row_index():
    data = pa.record_batch({"n": [1, 2, 3, 4], "v": ["1", "x", "3", "4"]})
    result = chain(
        [{"python": f"{HOOKS}:keep_even_pandas", "api": "pandas"}, {"cast": {"v": "int64"}}],
        on_error="collect",
    ).apply(data)
    assert result.batch.column("n").to_pylist() == [4]
    assert result.rejects.column("row_index").to_pylist() == [None]
    assert result.rejects.column("value").to_pylist() == ["x"]
