"""Arrow type spellings, store mappings, schema diffs and schema policies."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ferry.backends.errors import ConfigurationError, DataError
from ferry.backends.types import (
    MISSING_IN_SOURCE,
    MISSING_IN_TARGET,
    NULLABILITY,
    TYPE_MAPPING,
    TYPE_MISMATCH,
    arrow_to_elasticsearch,
    arrow_to_postgres,
    format_arrow_type,
    format_schema_diff,
    mapping_table_markdown,
    normalize_type,
    parse_arrow_type,
    schema_diff,
    unify_for_policy,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "type-mapping.md"

# --- parse / format --------------------------------------------------------------

PARSE_CASES = {
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "halffloat": pa.float16(),
    "float32": pa.float32(),
    "real": pa.float32(),
    "float64": pa.float64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "utf8": pa.string(),
    "str": pa.string(),
    "large_string": pa.large_string(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "fixed_size_binary[16]": pa.binary(16),
    "date": pa.date32(),
    "date32": pa.date32(),
    "date32[day]": pa.date32(),
    "date64": pa.date64(),
    "time32[s]": pa.time32("s"),
    "time32[ms]": pa.time32("ms"),
    "time64[us]": pa.time64("us"),
    "time64[ns]": pa.time64("ns"),
    "timestamp[s]": pa.timestamp("s"),
    "timestamp[ms]": pa.timestamp("ms"),
    "timestamp[us]": pa.timestamp("us"),
    "timestamp[ns]": pa.timestamp("ns"),
    "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
    "timestamp[ms, tz=Europe/Berlin]": pa.timestamp("ms", tz="Europe/Berlin"),
    "timestamp[ns, +05:30]": pa.timestamp("ns", tz="+05:30"),
    "duration[s]": pa.duration("s"),
    "duration[us]": pa.duration("us"),
    "interval": pa.month_day_nano_interval(),
    "month_day_nano_interval": pa.month_day_nano_interval(),
    "decimal(12,2)": pa.decimal128(12, 2),
    "decimal(10)": pa.decimal128(10, 0),
    "decimal(50, 4)": pa.decimal256(50, 4),
    "decimal128(38, 10)": pa.decimal128(38, 10),
    "decimal256(76, 0)": pa.decimal256(76, 0),
    "list<int64>": pa.list_(pa.int64()),
    "list<item: string>": pa.list_(pa.string()),
    "list<element: string>": pa.list_(pa.field("element", pa.string())),
    "list<string not null>": pa.list_(pa.field("item", pa.string(), nullable=False)),
    "large_list<list<float>>": pa.large_list(pa.list_(pa.float64())),
    "map<string, int64>": pa.map_(pa.string(), pa.int64()),
    "struct<a: int64, b: string>": pa.struct([("a", pa.int64()), ("b", pa.string())]),
    "struct<>": pa.struct([]),
    'struct<"order id": int64 not null, Nested: struct<x: list<decimal(5,1)>>>': pa.struct(
        [
            pa.field("order id", pa.int64(), nullable=False),
            pa.field("Nested", pa.struct([("x", pa.list_(pa.decimal128(5, 1)))])),
        ]
    ),
    "json": pa.string(),
    "null": pa.null(),
}


@pytest.mark.parametrize("text", sorted(PARSE_CASES))
def test_parse(text):
    assert parse_arrow_type(text) == PARSE_CASES[text]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  INT64  ", pa.int64()),
        ("Timestamp[ US , Tz = utc ]", pa.timestamp("us", tz="UTC")),
        ("DECIMAL ( 12 , 2 )", pa.decimal128(12, 2)),
        ("List < Struct < Name : String > >", pa.list_(pa.struct([("Name", pa.string())]))),
        ("struct<a:int64,b:list<bool>>", pa.struct([("a", pa.int64()), ("b", pa.list_(pa.bool_()))])),
        ("list<string NOT NULL>", pa.list_(pa.field("item", pa.string(), nullable=False))),
    ],
)
def test_parse_is_whitespace_and_case_tolerant(text, expected):
    assert parse_arrow_type(text) == expected


@pytest.mark.parametrize("text", sorted(PARSE_CASES))
def test_format_round_trips(text):
    t = PARSE_CASES[text]
    formatted = format_arrow_type(t)
    assert parse_arrow_type(formatted) == t
    assert format_arrow_type(parse_arrow_type(formatted)) == formatted


@pytest.mark.parametrize(
    "t, text",
    [
        (pa.float64(), "float64"),
        (pa.float32(), "float32"),
        (pa.timestamp("us", tz="UTC"), "timestamp[us, tz=UTC]"),
        (pa.decimal128(12, 2), "decimal128(12, 2)"),
        (pa.list_(pa.string()), "list<string>"),
        (pa.struct([pa.field("a b", pa.int8(), nullable=False)]), 'struct<"a b": int8 not null>'),
        (pa.month_day_nano_interval(), "interval"),
    ],
)
def test_format_canonical_spelling(t, text):
    assert format_arrow_type(t) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "int65",
        "varchar",
        "int64 extra",
        "timestamp",
        "timestamp[fortnights]",
        "timestamp[us, tz=Mars/Olympus_Mons]",
        "timestamp[us, UTC, extra]",
        "time32[us]",
        "time64[s]",
        "date64[day]",
        "decimal(0, 0)",
        "decimal(5, 7)",
        "decimal128(39, 2)",
        "decimal256(77, 2)",
        "decimal(12, 2",
        "list<>",
        "list<int64",
        "struct<a int64>",
        "struct<a: int64, a: string>",
        "map<string>",
        "fixed_size_binary[0]",
        "list<int64>>",
    ],
)
def test_parse_errors(text):
    with pytest.raises(ConfigurationError) as info:
        parse_arrow_type(text)
    message = str(info.value)
    assert "valid forms" in message
    assert "decimal(p, s)" in message and "timestamp[us, tz=UTC]" in message


def test_parse_rejects_non_strings():
    with pytest.raises(ConfigurationError):
        parse_arrow_type(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "t",
    [
        pa.dictionary(pa.int32(), pa.string()),
        pa.string_view(),
        pa.list_(pa.int32(), 3),
        pa.json_(),
        pa.dense_union([pa.field("a", pa.int8())]),
    ],
)
def test_format_unsupported(t):
    with pytest.raises(ConfigurationError, match="no job-file spelling"):
        format_arrow_type(t)


# --- normalize ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, expected",
    [
        (pa.dictionary(pa.int8(), pa.large_string()), pa.string()),
        (pa.string_view(), pa.string()),
        (pa.large_binary(), pa.binary()),
        (pa.date64(), pa.date32()),
        (pa.large_list(pa.field("element", pa.large_string(), nullable=False)), pa.list_(pa.string())),
        (pa.struct([pa.field("a", pa.large_string(), nullable=False)]), pa.struct([("a", pa.string())])),
        (pa.json_(), pa.string()),
        (pa.int32(), pa.int32()),
        (pa.timestamp("ms"), pa.timestamp("ms")),
    ],
)
def test_normalize_type(t, expected):
    assert normalize_type(t) == expected


# --- store mappings --------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, expected",
    [
        (pa.int8(), "smallint"),
        (pa.int16(), "smallint"),
        (pa.int32(), "integer"),
        (pa.int64(), "bigint"),
        (pa.uint8(), "smallint"),
        (pa.uint16(), "integer"),
        (pa.uint32(), "bigint"),
        (pa.uint64(), "numeric(20,0)"),
        (pa.float16(), "real"),
        (pa.float32(), "real"),
        (pa.float64(), "double precision"),
        (pa.decimal128(12, 2), "numeric(12,2)"),
        (pa.decimal256(60, 10), "numeric(60,10)"),
        (pa.bool_(), "boolean"),
        (pa.string(), "text"),
        (pa.large_string(), "text"),
        (pa.dictionary(pa.int32(), pa.string()), "text"),
        (pa.binary(), "bytea"),
        (pa.binary(16), "bytea"),
        (pa.date32(), "date"),
        (pa.date64(), "date"),
        (pa.time64("us"), "time"),
        (pa.timestamp("us"), "timestamp"),
        (pa.timestamp("us", tz="UTC"), "timestamptz"),
        (pa.timestamp("ns", tz="Europe/Berlin"), "timestamptz"),
        (pa.duration("us"), "interval"),
        (pa.month_day_nano_interval(), "interval"),
        (pa.list_(pa.int64()), "bigint[]"),
        (pa.large_list(pa.string()), "text[]"),
        (pa.list_(pa.timestamp("us", tz="UTC")), "timestamptz[]"),
        (pa.list_(pa.list_(pa.int64())), "jsonb"),
        (pa.list_(pa.struct([("a", pa.int8())])), "jsonb"),
        (pa.struct([("a", pa.int8())]), "jsonb"),
        (pa.map_(pa.string(), pa.string()), "jsonb"),
        (pa.json_(), "jsonb"),
        (pa.uuid(), "uuid"),
        (pa.null(), "text"),
    ],
)
def test_arrow_to_postgres(t, expected):
    assert arrow_to_postgres(t) == expected


@pytest.mark.parametrize(
    "t, expected",
    [
        (pa.int8(), {"type": "byte"}),
        (pa.int16(), {"type": "short"}),
        (pa.int32(), {"type": "integer"}),
        (pa.int64(), {"type": "long"}),
        (pa.uint64(), {"type": "unsigned_long"}),
        (pa.float16(), {"type": "half_float"}),
        (pa.float32(), {"type": "float"}),
        (pa.float64(), {"type": "double"}),
        (pa.bool_(), {"type": "boolean"}),
        (pa.string(), {"type": "keyword"}),
        (pa.dictionary(pa.int8(), pa.string()), {"type": "keyword"}),
        (pa.binary(), {"type": "binary"}),
        (pa.decimal128(12, 2), {"type": "scaled_float", "scaling_factor": 100}),
        (pa.decimal128(15, 0), {"type": "scaled_float", "scaling_factor": 1}),
        (pa.decimal128(16, 2), {"type": "keyword"}),
        (pa.decimal256(50, 2), {"type": "keyword"}),
        (pa.date32(), {"type": "date", "format": "strict_date"}),
        (pa.timestamp("us", tz="UTC"), {"type": "date", "format": "strict_date_optional_time||epoch_millis"}),
        (pa.time64("us"), {"type": "keyword"}),
        (pa.duration("ms"), {"type": "long"}),
        (pa.list_(pa.int32()), {"type": "integer"}),
        (pa.map_(pa.string(), pa.int64()), {"type": "flattened"}),
        (
            pa.struct([("city", pa.string()), ("tags", pa.list_(pa.string())), ("n", pa.struct([("x", pa.bool_())]))]),
            {
                "type": "object",
                "properties": {
                    "city": {"type": "keyword"},
                    "tags": {"type": "keyword"},
                    "n": {"type": "object", "properties": {"x": {"type": "boolean"}}},
                },
            },
        ),
    ],
)
def test_arrow_to_elasticsearch(t, expected):
    assert arrow_to_elasticsearch(t) == expected


def test_mapping_functions_reject_unions():
    union = pa.dense_union([pa.field("a", pa.int8())])
    with pytest.raises(ConfigurationError):
        arrow_to_postgres(union)
    with pytest.raises(ConfigurationError):
        arrow_to_elasticsearch(union)


def test_mapping_results_are_fresh_copies():
    mapping = arrow_to_elasticsearch(pa.month_day_nano_interval())
    mapping["properties"]["months"]["type"] = "changed"
    assert arrow_to_elasticsearch(pa.month_day_nano_interval())["properties"]["months"]["type"] == "integer"


@pytest.mark.parametrize("row", TYPE_MAPPING, ids=[r.logical for r in TYPE_MAPPING])
def test_type_mapping_rows_agree_with_functions(row):
    produced = (arrow_to_postgres(row.arrow), arrow_to_elasticsearch(row.arrow))
    assert (produced == (row.postgres, row.elasticsearch)) == row.writer_default
    parse_arrow_type(format_arrow_type(row.arrow))  # every row has a job-file spelling


def test_type_mapping_covers_required_logical_types():
    logical = " ".join(r.logical for r in TYPE_MAPPING)
    for name in (
        "smallint", "integer", "bigint", "numeric", "real", "double precision", "boolean",
        "text", "varchar", "char", "bytea", "uuid", "date", "time", "timestamp",
        "timestamptz", "interval", "json", "jsonb", "array", "record", "enum",
    ):  # fmt: skip
        assert name in logical, name


def test_docs_contain_the_generated_table():
    text = DOC.read_text(encoding="utf-8")
    table = mapping_table_markdown()
    begin = "<!-- BEGIN TYPE_MAPPING (generated by mapping_table_markdown) -->\n"
    end = "<!-- END TYPE_MAPPING -->"
    assert begin + table + end in text, "docs/type-mapping.md is stale: regenerate the table"
    assert table.count("\n") == len(TYPE_MAPPING) + 2


# --- schema_diff ----------------------------------------------------------------------

SOURCE = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        ("name", pa.string()),
        ("amount", pa.decimal128(12, 2)),
        ("status", pa.dictionary(pa.int32(), pa.string())),
        ("new_col", pa.string()),
        ("maybe_null", pa.int32()),
    ]
)
TARGET = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        ("name", pa.large_string()),  # representation only: not a difference
        ("amount", pa.float64()),
        ("status", pa.string()),
        pa.field("maybe_null", pa.int32(), nullable=False),
        ("legacy", pa.int64()),
    ]
)


def test_schema_diff_kinds():
    diffs = schema_diff(TARGET, SOURCE)
    assert [(d.column, d.kind) for d in diffs] == [
        ("amount", TYPE_MISMATCH),
        ("new_col", MISSING_IN_TARGET),
        ("maybe_null", NULLABILITY),
        ("legacy", MISSING_IN_SOURCE),
    ]
    amount = diffs[0]
    assert amount.source.type == pa.decimal128(12, 2) and amount.target.type == pa.float64()
    assert diffs[1].target is None and diffs[3].source is None


def test_schema_diff_of_equal_schemas_is_empty():
    assert schema_diff(SOURCE, SOURCE) == []
    assert format_schema_diff([]) == "(schemas match)"


def test_format_schema_diff_is_a_table():
    text = format_schema_diff(schema_diff(TARGET, SOURCE))
    lines = text.splitlines()
    assert lines[0].split() == ["column", "difference", "source", "target", "what", "to", "do"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + 4
    amount = next(line for line in lines if line.startswith("amount"))
    assert "type_mismatch" in amount and "decimal128(12, 2)" in amount and "float64" in amount
    assert "no policy allows it" in amount
    assert "evolve or ignore_extra" in next(line for line in lines if line.startswith("new_col"))
    assert "int32 not null" in next(line for line in lines if line.startswith("maybe_null"))


# --- schema policies --------------------------------------------------------------------


def test_new_target_accepts_everything():
    for policy in ("strict", "evolve", "ignore_extra"):
        decision = unify_for_policy(SOURCE, None, policy)
        assert decision.write_schema == SOURCE
        assert decision.added_columns == decision.dropped_columns == decision.null_filled_columns == []


def test_unknown_policy():
    with pytest.raises(ConfigurationError, match="strict, evolve, ignore_extra") as info:
        unify_for_policy(SOURCE, TARGET, "lenient")
    assert info.value.path == "schema_policy"


def test_strict_accepts_representation_differences():
    source = pa.schema([("a", pa.dictionary(pa.int8(), pa.string())), ("b", pa.large_list(pa.int64()))])
    target = pa.schema([("a", pa.string()), ("b", pa.list_(pa.int64()))])
    decision = unify_for_policy(source, target, "strict")
    assert decision.write_schema == target
    batch = pa.record_batch(
        [pa.array(["x", None]).dictionary_encode(), pa.array([[1], None], pa.large_list(pa.int64()))],
        schema=source,
    )
    out = decision.conform(batch)
    assert out.schema == target
    assert out.column("a").to_pylist() == ["x", None]


def test_strict_fails_with_column_by_column_diff():
    with pytest.raises(ConfigurationError) as info:
        unify_for_policy(SOURCE, TARGET, "strict")
    message = str(info.value)
    assert "schema_policy 'strict'" in message
    for column in ("amount", "new_col", "maybe_null", "legacy"):
        assert column in message
    assert "allowed by schema_policy evolve" in message
    assert "no policy allows it" in message


def test_evolve_adds_and_null_fills():
    source = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("extra", pa.string(), nullable=False)])
    target = pa.schema([("old", pa.float64()), pa.field("id", pa.int64(), nullable=False)])
    decision = unify_for_policy(source, target, "evolve")
    assert decision.added_columns == ["extra"]
    assert decision.null_filled_columns == ["old"]
    assert decision.dropped_columns == []
    assert decision.write_schema.names == ["old", "id", "extra"]
    assert decision.write_schema.field("extra").nullable  # existing rows have no value
    assert any("adding column" in m for m in decision.messages())
    batch = pa.record_batch([pa.array([1, 2]), pa.array(["a", "b"])], schema=source)
    out = decision.conform(batch)
    assert out.schema == decision.write_schema
    assert out.column("old").to_pylist() == [None, None]
    assert out.column("id").to_pylist() == [1, 2]


def test_evolve_still_fails_on_type_mismatch():
    with pytest.raises(ConfigurationError, match="type_mismatch"):
        unify_for_policy(
            pa.schema([("a", pa.string())]), pa.schema([("a", pa.int64())]), "evolve"
        )


def test_evolve_cannot_null_fill_a_not_null_column():
    target = pa.schema([("a", pa.int64()), pa.field("b", pa.int64(), nullable=False)])
    with pytest.raises(ConfigurationError, match="target column is NOT NULL"):
        unify_for_policy(pa.schema([("a", pa.int64())]), target, "evolve")


def test_ignore_extra_drops_source_columns():
    source = pa.schema([("b", pa.string()), ("a", pa.int64()), ("junk", pa.float64())])
    target = pa.schema([("a", pa.int64()), ("b", pa.string())])
    decision = unify_for_policy(source, target, "ignore_extra")
    assert decision.dropped_columns == ["junk"]
    assert decision.added_columns == decision.null_filled_columns == []
    assert decision.write_schema == target
    assert any("junk" in m for m in decision.messages())
    batch = pa.record_batch([pa.array(["x"]), pa.array([1]), pa.array([0.5])], schema=source)
    out = decision.conform(batch)
    assert out.schema == target and out.to_pylist() == [{"a": 1, "b": "x"}]


def test_ignore_extra_fails_when_source_lacks_a_target_column():
    with pytest.raises(ConfigurationError, match="missing_in_source"):
        unify_for_policy(
            pa.schema([("a", pa.int64())]), pa.schema([("a", pa.int64()), ("b", pa.int64())]), "ignore_extra"
        )


@pytest.mark.parametrize("policy", ["evolve", "ignore_extra"])
def test_nullability_is_checked_per_batch(policy):
    source = pa.schema([("a", pa.int64())])
    target = pa.schema([pa.field("a", pa.int64(), nullable=False)])
    decision = unify_for_policy(source, target, policy)
    assert decision.conform(pa.record_batch([pa.array([1, 2])], schema=source)).num_rows == 2
    with pytest.raises(DataError, match="NOT NULL") as info:
        decision.conform(pa.record_batch([pa.array([1, None, None])], schema=source))
    assert info.value.column == "a" and info.value.rows == 2
    with pytest.raises(ConfigurationError, match="nullability"):
        unify_for_policy(source, target, "strict")


def test_conform_reports_bad_casts_and_missing_columns():
    source = pa.schema([("a", pa.dictionary(pa.int8(), pa.string()))])
    target = pa.schema([("a", pa.string())])
    decision = unify_for_policy(source, target, "strict")
    with pytest.raises(DataError, match="batch lacks a column"):
        decision.conform(pa.record_batch([pa.array([1])], names=["other"]))
    with pytest.raises(DataError, match="cannot convert") as info:
        decision.conform(pa.record_batch([pa.array([[1]])], names=["a"]))
    assert info.value.column == "a"


def test_conform_accepts_tables_and_keeps_data_zero_copy():
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    decision = unify_for_policy(schema, schema, "strict")
    table = pa.table({"b": ["x", "y"], "a": [1, 2]})
    out = decision.conform(table)
    assert isinstance(out, pa.Table) and out.schema == schema
    batch = pa.record_batch([pa.array([1]), pa.array(["x"])], schema=schema)
    assert decision.conform(batch).column(0).buffers()[1].address == batch.column(0).buffers()[1].address
