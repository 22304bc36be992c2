"""Arrow types in Ferry: job-file spellings, store mappings and schema policies.

This is the one place that knows

* how a type is written in a job file (:func:`parse_arrow_type`,
  :func:`format_arrow_type`),
* which PostgreSQL, Elasticsearch/OpenSearch and Parquet type corresponds to an
  Arrow type (:data:`TYPE_MAPPING`, :func:`arrow_to_postgres`,
  :func:`arrow_to_elasticsearch`; ``docs/type-mapping.md`` is generated from
  :func:`mapping_table_markdown`),
* how a source schema is reconciled with an existing target under the job's
  ``schema_policy`` (:func:`schema_diff`, :func:`unify_for_policy`).

Design choices (see docs/type-mapping.md for the reasoning):

* JSON and UUID values are carried as ``pa.string()``, not as the ``arrow.json``
  / ``arrow.uuid`` extension types: plain strings work with every compute
  function, Parquet reader, PostgreSQL driver and index.
* Elasticsearch gets ``scaled_float`` for decimals of precision <= 15 (exact in
  a double) and ``keyword`` (exact text) above that.
* Timestamps and dates map to Elasticsearch ``date``; it indexes milliseconds
  while ``_source`` keeps the full value.
"""

from __future__ import annotations

import json
import re
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .errors import ConfigurationError, DataError

__all__ = [
    "DIFF_KINDS",
    "MISSING_IN_SOURCE",
    "MISSING_IN_TARGET",
    "NULLABILITY",
    "SCHEMA_POLICIES",
    "TYPE_MAPPING",
    "TYPE_MISMATCH",
    "VALID_TYPE_FORMS",
    "ColumnDiff",
    "SchemaDecision",
    "TypeMapping",
    "arrow_to_elasticsearch",
    "arrow_to_postgres",
    "postgres_to_arrow",
    "format_arrow_type",
    "format_schema_diff",
    "mapping_table_markdown",
    "normalize_type",
    "parse_arrow_type",
    "schema_diff",
    "unify_for_policy",
]

# =============================================================================
# Job-file spellings
# =============================================================================

#: Every accepted spelling, shown when a type cannot be parsed.
VALID_TYPE_FORMS = (
    "int8, int16, int32, int64, uint8, uint16, uint32, uint64, "
    "float16 (halffloat), float32 (real), float64 (float, double), "
    "bool (boolean), string (utf8, str), large_string, binary, large_binary, "
    "fixed_size_binary[N], date (date32), date64, time32[s|ms], time64[us|ns], "
    "timestamp[s|ms|us|ns], timestamp[us, tz=UTC] (or timestamp[us, UTC]), "
    "duration[s|ms|us|ns], interval (month_day_nano_interval), "
    "decimal(p, s), decimal128(p, s), decimal256(p, s), "
    "list<T>, large_list<T>, map<K, V>, struct<a: T, b: T not null>, "
    "json (carried as string), null"
)

_SIMPLE: dict[str, pa.DataType] = {
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
    # Deliberately not Arrow's naming (where "float" is 32-bit): in job files
    # "float" means what users and SQL's FLOAT usually mean, double precision.
    "float64": pa.float64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "utf8": pa.string(),
    "str": pa.string(),
    "large_string": pa.large_string(),
    "large_utf8": pa.large_string(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "date": pa.date32(),
    "date32": pa.date32(),
    "date64": pa.date64(),
    "interval": pa.month_day_nano_interval(),
    "month_day_nano_interval": pa.month_day_nano_interval(),
    # JSON is carried as text; see the module docstring.
    "json": pa.string(),
    "null": pa.null(),
}

# Canonical spelling of each simple type (what format_arrow_type writes).
_SIMPLE_NAMES: dict[pa.DataType, str] = {
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
    pa.date32(): "date32",
    pa.date64(): "date64",
    pa.month_day_nano_interval(): "interval",
    pa.null(): "null",
}

# Bracketed forms pyarrow itself prints for dates, accepted for convenience.
_DATE_UNITS = {"date32": "day", "date": "day", "date64": "ms"}

_UNITS = {
    "time32": ("s", "ms"),
    "time64": ("us", "ns"),
    "timestamp": ("s", "ms", "us", "ns"),
    "duration": ("s", "ms", "us", "ns"),
}

_TOKEN = re.compile(r'\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<punct>[<>()\[\],:]))')
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Parser:
    """Recursive-descent parser over the job-file type grammar."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    # -- low level ---------------------------------------------------------------
    def fail(self, reason: str) -> ConfigurationError:
        return ConfigurationError(
            f"cannot read Arrow type {self.text!r}: {reason} (at character {self.pos + 1}); "
            f"valid forms: {VALID_TYPE_FORMS}"
        )

    def peek(self) -> tuple[str, str] | None:
        m = _TOKEN.match(self.text, self.pos)
        if not m:
            return None
        kind = m.lastgroup
        return kind, m.group(kind)

    def next(self) -> tuple[str, str]:
        m = _TOKEN.match(self.text, self.pos)
        if not m:
            rest = self.text[self.pos :].strip()
            raise self.fail(f"unexpected {rest[:1]!r}" if rest else "unexpected end")
        self.pos = m.end()
        kind = m.lastgroup
        return kind, m.group(kind)

    def expect(self, punct: str) -> None:
        kind, value = self.next()
        if kind != "punct" or value != punct:
            raise self.fail(f"expected {punct!r}, found {value!r}")

    def accept(self, punct: str) -> bool:
        token = self.peek()
        if token == ("punct", punct):
            self.next()
            return True
        return False

    def at_end(self) -> bool:
        return self.text[self.pos :].strip() == ""

    def integer(self) -> int:
        m = re.compile(r"\s*(-?\d+)").match(self.text, self.pos)
        if not m:
            raise self.fail("expected an integer")
        self.pos = m.end()
        return int(m.group(1))

    def bracket_text(self) -> list[str]:
        """Raw comma-separated parameters up to ']' (time zones contain '/', '+', ':')."""
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self.fail("missing ']'")
        params = [p.strip() for p in self.text[self.pos : end].split(",")]
        self.pos = end + 1
        return params

    # -- grammar -----------------------------------------------------------------
    def parse(self) -> pa.DataType:
        result = self.type_()
        if not self.at_end():
            raise self.fail(f"unexpected text {self.text[self.pos:].strip()!r}")
        return result

    def type_(self) -> pa.DataType:
        kind, value = self.next()
        if kind != "name":
            raise self.fail(f"expected a type name, found {value!r}")
        name = value.lower()
        if name in _UNITS:
            return self.unit_type(name)
        if name in ("decimal", "decimal128", "decimal256"):
            return self.decimal(name)
        if name in ("list", "large_list"):
            return self.list_(name)
        if name == "struct":
            return self.struct()
        if name == "map":
            return self.map_()
        if name == "fixed_size_binary":
            self.expect("[")
            params = self.bracket_text()
            if len(params) != 1 or not params[0].isdigit() or int(params[0]) <= 0:
                raise self.fail("fixed_size_binary needs a positive byte width, e.g. fixed_size_binary[16]")
            return pa.binary(int(params[0]))
        if name in _SIMPLE:
            if name in _DATE_UNITS and self.accept("["):
                params = self.bracket_text()
                if [p.lower() for p in params] != [_DATE_UNITS[name]]:
                    raise self.fail(f"{name} only takes [{_DATE_UNITS[name]}]")
            return _SIMPLE[name]
        raise self.fail(f"unknown type name {value!r}")

    def unit_type(self, name: str) -> pa.DataType:
        if not self.accept("["):
            example = "ms" if name == "time32" else "us"
            raise self.fail(f"{name} needs a unit, e.g. {name}[{example}]")
        params = self.bracket_text()
        unit = params[0].lower()
        if unit not in _UNITS[name]:
            raise self.fail(f"{name} unit must be one of {', '.join(_UNITS[name])}, not {params[0]!r}")
        if name == "timestamp":
            if len(params) > 2:
                raise self.fail("timestamp takes a unit and at most one time zone")
            tz = None
            if len(params) == 2:
                tz = re.sub(r"(?i)^tz\s*=\s*", "", params[1])
                tz = self.time_zone(tz)
            return pa.timestamp(unit, tz=tz)
        if len(params) != 1:
            raise self.fail(f"{name} takes only a unit")
        return {"time32": pa.time32, "time64": pa.time64, "duration": pa.duration}[name](unit)

    def time_zone(self, tz: str) -> str:
        if tz.upper() in ("UTC", "Z"):
            return "UTC"
        if re.fullmatch(r"[+-]\d{2}:\d{2}", tz):
            return tz
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise self.fail(f"unknown time zone {tz!r} (use UTC, an offset like +01:00 or an IANA name)") from None
        return tz

    def decimal(self, name: str) -> pa.DataType:
        self.expect("(")
        precision = self.integer()
        scale = 0
        if self.accept(","):
            scale = self.integer()
        self.expect(")")
        if name == "decimal":
            name = "decimal128" if precision <= 38 else "decimal256"
        limit = 38 if name == "decimal128" else 76
        if not 1 <= precision <= limit:
            raise self.fail(f"{name} precision must be 1..{limit}, not {precision}")
        if scale > precision:
            raise self.fail(f"decimal scale {scale} exceeds precision {precision}")
        return (pa.decimal128 if name == "decimal128" else pa.decimal256)(precision, scale)

    def field_name(self) -> str:
        kind, value = self.next()
        if kind == "name":
            return value
        if kind == "quoted":
            return json.loads(value)
        raise self.fail(f"expected a field name, found {value!r}")

    def nullable_suffix(self) -> bool:
        """Parse an optional 'not null'; returns the field's nullability."""
        m = re.compile(r"\s*not\s+null\b", re.IGNORECASE).match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return False
        return True

    def list_(self, name: str) -> pa.DataType:
        self.expect("<")
        # Either "list<T>" or pyarrow's "list<item: T>"; the ':' decides.
        save = self.pos
        item_name = "item"
        token = self.peek()
        if token and token[0] in ("name", "quoted"):
            candidate = self.field_name()
            if self.accept(":"):
                item_name = candidate
            else:
                self.pos = save
        value_type = self.type_()
        value_field = pa.field(item_name, value_type, nullable=self.nullable_suffix())
        self.expect(">")
        return pa.list_(value_field) if name == "list" else pa.large_list(value_field)

    def struct(self) -> pa.DataType:
        self.expect("<")
        fields: list[pa.Field] = []
        if not self.accept(">"):
            while True:
                fname = self.field_name()
                self.expect(":")
                ftype = self.type_()
                fields.append(pa.field(fname, ftype, nullable=self.nullable_suffix()))
                if self.accept(">"):
                    break
                self.expect(",")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise self.fail("duplicate struct field name")
        return pa.struct(fields)

    def map_(self) -> pa.DataType:
        self.expect("<")
        key = self.type_()
        self.expect(",")
        item = self.type_()
        self.expect(">")
        return pa.map_(key, item)


def parse_arrow_type(text: str) -> pa.DataType:
    """Read a job-file type spelling such as ``decimal(12, 2)`` or ``list<string>``.

    Case-insensitive for type names and units, tolerant of whitespace; field
    names keep their case.  Raises :class:`ConfigurationError` listing the valid
    forms when the text is not a known type.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(f"an Arrow type is required; valid forms: {VALID_TYPE_FORMS}")
    return _Parser(text).parse()


def _format_name(name: str) -> str:
    return name if _IDENT.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _format_field(f: pa.Field, default_name: str | None = None) -> str:
    text = format_arrow_type(f.type)
    if default_name is None or f.name != default_name:
        text = f"{_format_name(f.name)}: {text}"
    return text if f.nullable else f"{text} not null"


def format_arrow_type(t: pa.DataType) -> str:
    """Canonical job-file spelling of ``t``; :func:`parse_arrow_type` reads it back.

    Raises :class:`ConfigurationError` for types with no job-file spelling
    (dictionary, union, extension, view and fixed-size list types).
    """
    if t in _SIMPLE_NAMES:
        return _SIMPLE_NAMES[t]
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, tz={t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    if pa.types.is_time32(t):
        return f"time32[{t.unit}]"
    if pa.types.is_time64(t):
        return f"time64[{t.unit}]"
    if pa.types.is_duration(t):
        return f"duration[{t.unit}]"
    if pa.types.is_decimal128(t) or pa.types.is_decimal256(t):
        name = "decimal128" if pa.types.is_decimal128(t) else "decimal256"
        return f"{name}({t.precision}, {t.scale})"
    if pa.types.is_fixed_size_binary(t) and not pa.types.is_decimal(t):
        return f"fixed_size_binary[{t.byte_width}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        name = "list" if pa.types.is_list(t) else "large_list"
        return f"{name}<{_format_field(t.value_field, default_name='item')}>"
    if pa.types.is_map(t):
        if t.item_field.nullable and t.key_field.name == "key" and t.item_field.name == "value":
            return f"map<{format_arrow_type(t.key_type)}, {format_arrow_type(t.item_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(_format_field(t.field(i)) for i in range(t.num_fields)) + ">"
    raise ConfigurationError(
        f"Arrow type {t} has no job-file spelling; cast it to one of: {VALID_TYPE_FORMS}"
    )


def _type_text(t: pa.DataType) -> str:
    """Job-file spelling when there is one, else pyarrow's own text (for messages)."""
    try:
        return format_arrow_type(t)
    except ConfigurationError:
        return str(t)


def normalize_type(t: pa.DataType) -> pa.DataType:
    """The logical type of ``t``: representation-only differences removed.

    Dictionary encoding is decoded, ``large_*`` and view variants become the
    plain type, date64 becomes date32, extension types become their storage,
    list item names become "item" and nested fields become nullable.  Two
    columns with equal normalized types hold interchangeable values (a cast
    between them is lossless), which is what checksums and schema policies use.
    """
    if pa.types.is_dictionary(t):
        return normalize_type(t.value_type)
    if isinstance(t, pa.BaseExtensionType):
        return normalize_type(t.storage_type)
    if pa.types.is_run_end_encoded(t):
        return normalize_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_date64(t):
        return pa.date32()
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return pa.list_(normalize_type(t.value_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(normalize_type(t.value_type), t.list_size)
    if pa.types.is_map(t):
        return pa.map_(normalize_type(t.key_type), normalize_type(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, normalize_type(f.type)) for f in t])
    return t


# =============================================================================
# Store mappings
# =============================================================================


@dataclass(frozen=True)
class TypeMapping:
    """One row of the type-mapping table: a logical type across the stores.

    ``arrow`` is the Arrow type Ferry carries the values in (an example where
    the type has parameters).  ``writer_default`` says whether
    :func:`arrow_to_postgres` and :func:`arrow_to_elasticsearch` produce exactly
    this row's PostgreSQL and Elasticsearch types for ``arrow``; when False the
    row describes what is *read* (e.g. ``uuid`` is read as text) and a new
    target gets the default for the Arrow type unless the job declares it.
    """

    logical: str
    arrow: pa.DataType
    postgres: str
    elasticsearch: dict[str, Any]
    parquet: str
    notes: str = ""
    writer_default: bool = True


_DATE_ES = {"type": "date", "format": "strict_date"}
_TS_ES = {"type": "date", "format": "strict_date_optional_time||epoch_millis"}
_INTERVAL_ES = {
    "type": "object",
    "properties": {
        "months": {"type": "integer"},
        "days": {"type": "integer"},
        "microseconds": {"type": "long"},
    },
}

#: Largest decimal precision mapped to Elasticsearch ``scaled_float``: every
#: 15-digit decimal is exactly representable as a double (and as a long).
ES_SCALED_FLOAT_MAX_PRECISION = 15

_EXAMPLE_STRUCT = pa.struct([("city", pa.string()), ("express", pa.bool_())])

#: The type-mapping table, one row per logical type (docs/type-mapping.md).
TYPE_MAPPING: list[TypeMapping] = [
    TypeMapping("smallint", pa.int16(), "smallint", {"type": "short"}, "INT32 / INT(16, signed)"),
    TypeMapping("integer", pa.int32(), "integer", {"type": "integer"}, "INT32 / INT(32, signed)"),
    TypeMapping("bigint", pa.int64(), "bigint", {"type": "long"}, "INT64 / INT(64, signed)"),
    TypeMapping(
        "1-byte integer", pa.int8(), "smallint", {"type": "byte"}, "INT32 / INT(8, signed)",
        "PostgreSQL has no 1-byte integer; widened to smallint.",
    ),
    TypeMapping(
        "unsigned 8-bit", pa.uint8(), "smallint", {"type": "short"}, "INT32 / INT(8, unsigned)",
        "PostgreSQL has no unsigned types: the next wider signed type holds every value.",
    ),
    TypeMapping("unsigned 16-bit", pa.uint16(), "integer", {"type": "integer"}, "INT32 / INT(16, unsigned)"),
    TypeMapping("unsigned 32-bit", pa.uint32(), "bigint", {"type": "long"}, "INT32 / INT(32, unsigned)"),
    TypeMapping(
        "unsigned 64-bit", pa.uint64(), "numeric(20,0)", {"type": "unsigned_long"},
        "INT64 / INT(64, unsigned)",
    ),
    TypeMapping(
        "numeric(p, s)", pa.decimal128(12, 2), "numeric(12,2)",
        {"type": "scaled_float", "scaling_factor": 100},
        "FIXED_LEN_BYTE_ARRAY / DECIMAL(12, 2)",
        "Exact. decimal128 up to precision 38, decimal256 up to 76. Elasticsearch: scaled_float "
        "(factor 10^s) when p <= 15, where every value is exact in a double; values are sent as text.",
    ),
    TypeMapping(
        "numeric(p, s), p > 15", pa.decimal128(38, 10), "numeric(38,10)", {"type": "keyword"},
        "FIXED_LEN_BYTE_ARRAY / DECIMAL(38, 10)",
        "Too precise for a double: Elasticsearch keeps the exact decimal text as a keyword.",
    ),
    TypeMapping(
        "numeric (no precision)", pa.string(), "numeric", {"type": "keyword"}, "BYTE_ARRAY / STRING",
        "Unconstrained numeric has no fixed scale, so it is carried as exact decimal text. "
        "New PostgreSQL columns get text unless the job declares a decimal type.",
        writer_default=False,
    ),
    TypeMapping("real", pa.float32(), "real", {"type": "float"}, "FLOAT"),
    TypeMapping("double precision", pa.float64(), "double precision", {"type": "double"}, "DOUBLE"),
    TypeMapping(
        "half float", pa.float16(), "real", {"type": "half_float"}, "FIXED_LEN_BYTE_ARRAY(2) / FLOAT16",
        "PostgreSQL has no 2-byte float; widened to real.",
    ),
    TypeMapping("boolean", pa.bool_(), "boolean", {"type": "boolean"}, "BOOLEAN"),
    TypeMapping(
        "text, varchar(n), char(n)", pa.string(), "text", {"type": "keyword"}, "BYTE_ARRAY / STRING",
        "Length limits are not carried; char(n) values keep their blank padding. "
        "large_string maps the same.",
    ),
    TypeMapping(
        "bytea", pa.binary(), "bytea", {"type": "binary"}, "BYTE_ARRAY",
        "Elasticsearch binary is base64 text, stored but not searchable. large_binary maps the same.",
    ),
    TypeMapping(
        "uuid", pa.string(), "uuid", {"type": "keyword"}, "BYTE_ARRAY / STRING",
        "Canonical 36-character text, not the `arrow.uuid` extension: strings work with every "
        "compute function, reader and index. New PostgreSQL columns get text unless declared uuid.",
        writer_default=False,
    ),
    TypeMapping(
        "date", pa.date32(), "date", _DATE_ES, "INT32 / DATE", "date64 maps the same.",
    ),
    TypeMapping(
        "time", pa.time64("us"), "time", {"type": "keyword"},
        "INT64 / TIME(MICROS, adjustedToUTC=false)",
        "Elasticsearch has no time-of-day type; ISO text `HH:MM:SS.ffffff` sorts correctly. "
        "time32 maps the same.",
    ),
    TypeMapping(
        "timestamp", pa.timestamp("us"), "timestamp", _TS_ES,
        "INT64 / TIMESTAMP(MICROS, adjustedToUTC=false)",
        "Elasticsearch indexes milliseconds; `_source` keeps the full value. "
        "Nanoseconds are truncated to microseconds in PostgreSQL.",
    ),
    TypeMapping(
        "timestamptz", pa.timestamp("us", tz="UTC"), "timestamptz", _TS_ES,
        "INT64 / TIMESTAMP(MICROS, adjustedToUTC=true)",
        "Read as UTC; a timestamp with any other time zone maps the same.",
    ),
    TypeMapping(
        "interval", pa.month_day_nano_interval(), "interval", _INTERVAL_ES,
        "group: months INT32, days INT32, microseconds INT64",
        "Parquet and the indexes cannot hold Arrow intervals; they get that struct "
        "(nanoseconds below a microsecond are dropped, as in PostgreSQL).",
    ),
    TypeMapping(
        "duration", pa.duration("us"), "interval", {"type": "long"}, "INT64",
        "Elasticsearch gets the count in the duration's unit.",
    ),
    TypeMapping(
        "json, jsonb", pa.string(), "jsonb", {"type": "keyword"}, "BYTE_ARRAY / STRING",
        "Carried as JSON text (`pa.string()`, not the `arrow.json` extension). "
        "New PostgreSQL columns get text unless declared jsonb.",
        writer_default=False,
    ),
    TypeMapping(
        "enum", pa.string(), "enum type", {"type": "keyword"}, "BYTE_ARRAY / STRING",
        "Read as the label text (`dictionary<string>` also accepted); new PostgreSQL columns get text.",
        writer_default=False,
    ),
    TypeMapping(
        "array", pa.list_(pa.int64()), "bigint[]", {"type": "long"}, "LIST",
        "Element order is kept. Elasticsearch fields are multi-valued, so a list maps like its "
        "element. Lists of lists, structs or maps become jsonb in PostgreSQL.",
    ),
    TypeMapping(
        "record / object", _EXAMPLE_STRUCT, "jsonb",
        {"type": "object", "properties": {"city": {"type": "keyword"}, "express": {"type": "boolean"}}},
        "group (struct)",
        "A list of structs maps to object too (not nested); declare nested in the index to "
        "query elements independently.",
    ),
    TypeMapping(
        "map", pa.map_(pa.string(), pa.string()), "jsonb", {"type": "flattened"}, "MAP",
        "Keys become JSON object keys.",
    ),
    TypeMapping(
        "null (all values null)", pa.null(), "text", {"type": "keyword"}, "INT32 / NULL",
        "A column with no type information yet.",
    ),
]  # fmt: skip


def _base_type(t: pa.DataType) -> pa.DataType:
    """Strip encodings that do not change values (dictionary, run-end encoding)."""
    while pa.types.is_dictionary(t) or pa.types.is_run_end_encoded(t):
        t = t.value_type
    return t


def arrow_to_postgres(t: pa.DataType) -> str:
    """PostgreSQL column type for a new column of Arrow type ``t``.

    Raises :class:`ConfigurationError` for types with no sensible column type
    (unions, for example).
    """
    t = _base_type(t)
    if isinstance(t, pa.BaseExtensionType):
        name = getattr(t, "extension_name", "")
        if name == "arrow.json":
            return "jsonb"
        if name == "arrow.uuid":
            return "uuid"
        return arrow_to_postgres(t.storage_type)
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20,0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        return "bytea"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_duration(t) or t == pa.month_day_nano_interval():
        return "interval"
    if pa.types.is_null(t):
        return "text"
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        element = _base_type(t.value_type)
        if isinstance(element, pa.BaseExtensionType):
            element = element.storage_type
        # PostgreSQL arrays must be rectangular and hold no composite values
        # without a declared type, so nested elements make the column jsonb.
        if pa.types.is_nested(element):
            return "jsonb"
        return f"{arrow_to_postgres(element)}[]"
    if pa.types.is_struct(t) or pa.types.is_map(t):
        return "jsonb"
    raise ConfigurationError(
        f"Arrow type {t} has no PostgreSQL column type; cast the column "
        "(e.g. to string) or create the target table yourself"
    )


def postgres_to_arrow(pg_type: str, *, is_enum: bool = False) -> pa.DataType:
    """Arrow type in which Ferry reads a PostgreSQL column of type ``pg_type``.

    ``pg_type`` is the catalog's ``format_type()`` text (``numeric(12,2)``,
    ``timestamp with time zone``, ``text[]``...). Follows :data:`TYPE_MAPPING`:
    numeric(p, s) -> decimal, unconstrained numeric, uuid, json/jsonb and enums
    -> string, interval -> month_day_nano, arrays -> lists. Raises
    :class:`ConfigurationError` for types with no Arrow counterpart.
    """
    text = pg_type.strip().lower()
    if is_enum:
        return pa.string()
    if text.endswith("[]"):
        return pa.list_(postgres_to_arrow(text[:-2]))
    base = re.sub(r"\(.*\)", "", text).strip()
    simple = {
        "smallint": pa.int16(),
        "integer": pa.int32(),
        "bigint": pa.int64(),
        "real": pa.float32(),
        "double precision": pa.float64(),
        "boolean": pa.bool_(),
        "text": pa.string(),
        "character varying": pa.string(),
        "character": pa.string(),
        "name": pa.string(),
        '"char"': pa.string(),
        "citext": pa.string(),
        "bytea": pa.binary(),
        "uuid": pa.string(),
        "json": pa.string(),
        "jsonb": pa.string(),
        "date": pa.date32(),
        "time without time zone": pa.time64("us"),
        "timestamp without time zone": pa.timestamp("us"),
        "timestamp with time zone": pa.timestamp("us", tz="UTC"),
        "interval": pa.month_day_nano_interval(),
        "oid": pa.int64(),
    }
    # Short spellings (what arrow_to_postgres writes and users type).
    aliases = {
        "int2": "smallint", "int4": "integer", "int": "integer", "int8": "bigint",
        "float4": "real", "float8": "double precision", "bool": "boolean",
        "varchar": "character varying", "char": "character", "bpchar": "character",
        "time": "time without time zone", "timestamp": "timestamp without time zone",
        "timestamptz": "timestamp with time zone", "decimal": "numeric",
    }  # fmt: skip
    base = aliases.get(base, base)
    text = "numeric" + text[len("decimal"):] if text.startswith("decimal") else text
    if base in simple:
        return simple[base]
    if base == "numeric":
        match = re.fullmatch(r"numeric\((\d+),(\d+)\)", text.replace(" ", ""))
        if match is None:
            return pa.string()  # unconstrained: exact decimal text
        precision, scale = int(match.group(1)), int(match.group(2))
        if precision <= 38:
            return pa.decimal128(precision, scale)
        return pa.decimal256(min(precision, 76), scale) if precision <= 76 else pa.string()
    raise ConfigurationError(
        f"PostgreSQL type {pg_type!r} has no Arrow mapping; cast the column in a custom `query` "
        "(e.g. `col::text`) or leave it out with `columns`"
    )


def arrow_to_elasticsearch(t: pa.DataType) -> dict[str, Any]:
    """Elasticsearch/OpenSearch field mapping for Arrow type ``t``.

    Strings are ``keyword``; decimals ``scaled_float`` up to precision 15 and
    ``keyword`` above; dates and timestamps ``date``; structs ``object`` with
    properties; lists map like their element (fields are multi-valued).
    """
    t = _base_type(t)
    if isinstance(t, pa.BaseExtensionType):
        return arrow_to_elasticsearch(t.storage_type)
    simple = {
        pa.int8(): "byte",
        pa.int16(): "short",
        pa.int32(): "integer",
        pa.int64(): "long",
        pa.uint8(): "short",
        pa.uint16(): "integer",
        pa.uint32(): "long",
        pa.uint64(): "unsigned_long",
        pa.float16(): "half_float",
        pa.float32(): "float",
        pa.float64(): "double",
        pa.bool_(): "boolean",
    }
    if t in simple:
        return {"type": simple[t]}
    if pa.types.is_decimal(t):
        if 0 <= t.scale and t.precision <= ES_SCALED_FLOAT_MAX_PRECISION:
            return {"type": "scaled_float", "scaling_factor": 10**t.scale}
        return {"type": "keyword"}
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
        or pa.types.is_time(t)
    ):
        return {"type": "keyword"}
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        return {"type": "binary"}
    if pa.types.is_date(t):
        return dict(_DATE_ES)
    if pa.types.is_timestamp(t):
        return dict(_TS_ES)
    if pa.types.is_duration(t):
        return {"type": "long"}
    if t == pa.month_day_nano_interval():
        return json.loads(json.dumps(_INTERVAL_ES))  # a fresh deep copy
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return arrow_to_elasticsearch(t.value_type)
    if pa.types.is_struct(t):
        return {"type": "object", "properties": {f.name: arrow_to_elasticsearch(f.type) for f in t}}
    if pa.types.is_map(t):
        return {"type": "flattened"}
    raise ConfigurationError(
        f"Arrow type {t} has no Elasticsearch mapping; cast the column (e.g. to string) "
        "or create the index mapping yourself"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def mapping_table_markdown() -> str:
    """The :data:`TYPE_MAPPING` table as Markdown (embedded in docs/type-mapping.md)."""
    lines = [
        "| Logical type | Arrow | PostgreSQL | Elasticsearch / OpenSearch | Parquet (physical / logical) | Notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in TYPE_MAPPING:
        es = json.dumps(row.elasticsearch, separators=(", ", ": "))
        cells = [
            row.logical,
            f"`{format_arrow_type(row.arrow)}`",
            f"`{row.postgres}`",
            f"`{es}`",
            row.parquet,
            row.notes,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# =============================================================================
# Schema differences and schema_policy
# =============================================================================

#: The source has the column, the target does not.
MISSING_IN_TARGET = "missing_in_target"
#: The target has the column, the source does not.
MISSING_IN_SOURCE = "missing_in_source"
#: Both have the column with different (logical) types.
TYPE_MISMATCH = "type_mismatch"
#: The source column may hold nulls, the target column is NOT NULL.
NULLABILITY = "nullability"
DIFF_KINDS = (MISSING_IN_TARGET, MISSING_IN_SOURCE, TYPE_MISMATCH, NULLABILITY)

#: Valid values of a job's ``schema_policy``.
SCHEMA_POLICIES = ("strict", "evolve", "ignore_extra")


@dataclass(frozen=True)
class ColumnDiff:
    """One column that differs between the source and the target schema."""

    column: str
    kind: str
    source: pa.Field | None
    target: pa.Field | None

    @property
    def allowed_by(self) -> tuple[str, ...]:
        """The schema policies that accept this difference."""
        if self.kind == MISSING_IN_TARGET:
            return ("evolve", "ignore_extra")
        if self.kind == MISSING_IN_SOURCE:
            # Rows written without the column get nulls, so it must be nullable.
            return ("evolve",) if self.target is not None and self.target.nullable else ()
        if self.kind == NULLABILITY:
            # Accepted up front; each batch is checked for actual nulls on write.
            return ("evolve", "ignore_extra")
        return ()

    @property
    def remedy(self) -> str:
        """What the user can do about it, for messages."""
        if self.allowed_by:
            return "allowed by schema_policy " + " or ".join(self.allowed_by)
        if self.kind == MISSING_IN_SOURCE:
            return "target column is NOT NULL: add the column to the source or drop the constraint"
        return "no policy allows it: cast the source column to the target type or change the target"


def _field_text(f: pa.Field | None) -> str:
    if f is None:
        return "-"
    text = _type_text(f.type)
    return text if f.nullable else f"{text} not null"


def schema_diff(expected: pa.Schema, actual: pa.Schema) -> list[ColumnDiff]:
    """Column-by-column differences between a target and a source schema.

    ``expected`` is the target's schema (what the store holds), ``actual`` the
    source's (what arrives).  Columns match by name.  Representation-only
    differences (see :func:`normalize_type`) are not differences.  Returns
    diffs in source column order, then target-only columns in target order.
    """
    target = {f.name: f for f in expected}
    source = {f.name: f for f in actual}
    diffs: list[ColumnDiff] = []
    for name, src in source.items():
        tgt = target.get(name)
        if tgt is None:
            diffs.append(ColumnDiff(name, MISSING_IN_TARGET, src, None))
        elif normalize_type(src.type) != normalize_type(tgt.type):
            diffs.append(ColumnDiff(name, TYPE_MISMATCH, src, tgt))
        elif src.nullable and not tgt.nullable:
            diffs.append(ColumnDiff(name, NULLABILITY, src, tgt))
    for name, tgt in target.items():
        if name not in source:
            diffs.append(ColumnDiff(name, MISSING_IN_SOURCE, None, tgt))
    return diffs


def format_schema_diff(diffs: list[ColumnDiff]) -> str:
    """A readable, aligned column-by-column table of ``diffs``."""
    if not diffs:
        return "(schemas match)"
    header = ("column", "difference", "source", "target", "what to do")
    rows = [(d.column, d.kind, _field_text(d.source), _field_text(d.target), d.remedy) for d in diffs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


@dataclass
class SchemaDecision:
    """How batches are written to the target under a schema policy.

    ``write_schema`` is the schema every written batch has (the target's
    columns first, in target order, then added columns).  ``added_columns``
    are source columns the target gains (policy evolve), ``dropped_columns``
    source columns that are not written (policy ignore_extra) and
    ``null_filled_columns`` target columns the source lacks, written as nulls.
    """

    policy: str
    write_schema: pa.Schema
    added_columns: list[str] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)
    null_filled_columns: list[str] = field(default_factory=list)
    diffs: list[ColumnDiff] = field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per change the caller should report to the user."""
        out = []
        if self.added_columns:
            out.append(f"adding column(s) to the target: {', '.join(self.added_columns)}")
        if self.dropped_columns:
            out.append(f"not writing source column(s) the target lacks: {', '.join(self.dropped_columns)}")
        if self.null_filled_columns:
            out.append(f"writing nulls to target column(s) the source lacks: {', '.join(self.null_filled_columns)}")
        return out

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Reorder, drop, null-fill and cast ``batch`` to :attr:`write_schema`.

        Zero-copy for columns that already have the right type.  Raises
        :class:`DataError` when a value cannot be cast or a NOT NULL column
        would receive nulls.
        """
        index = {}
        for i, name in enumerate(batch.schema.names):
            index.setdefault(name, i)
        n = batch.num_rows
        arrays = []
        for f in self.write_schema:
            i = index.get(f.name)
            if i is None:
                if f.name not in self.null_filled_columns:
                    raise DataError(
                        "batch lacks a column of the write schema; every batch must have the "
                        "source schema the policy was decided on",
                        column=f.name,
                    )
                column = pa.nulls(n, f.type)
            else:
                column = batch.column(i)
                if column.type != f.type:
                    column = _cast(column, f)
            if not f.nullable and column.null_count:
                raise DataError(
                    "null values for a NOT NULL target column; filter or fill them in the job, "
                    "or make the target column nullable",
                    column=f.name,
                    rows=column.null_count,
                )
            arrays.append(column)
        if isinstance(batch, pa.Table):
            return pa.Table.from_arrays(arrays, schema=self.write_schema)
        return pa.RecordBatch.from_arrays(arrays, schema=self.write_schema)


def _cast(column: pa.Array, f: pa.Field) -> pa.Array:
    try:
        return column.cast(f.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise DataError(f"cannot convert values to {_type_text(f.type)}: {exc}", column=f.name) from None


def unify_for_policy(source: pa.Schema, target: pa.Schema | None, policy: str) -> SchemaDecision:
    """Decide how source batches are written to a target under ``schema_policy``.

    * ``strict``: any difference fails.
    * ``evolve``: source columns the target lacks are added (as nullable
      columns); target columns the source lacks are written as nulls (they
      must be nullable); type mismatches fail.
    * ``ignore_extra``: source columns the target lacks are dropped (listed in
      ``dropped_columns``); anything else that differs fails.

    In every policy a nullable source column may feed a NOT NULL target column;
    :meth:`SchemaDecision.conform` rejects batches that actually carry nulls
    there (strict refuses it up front).  ``target=None`` (a new target) accepts
    the source schema as is.  Failures raise :class:`ConfigurationError` whose
    message holds the column-by-column diff and which policy would allow it.
    """
    if policy not in SCHEMA_POLICIES:
        raise ConfigurationError(
            f"unknown schema_policy {policy!r}; use one of: {', '.join(SCHEMA_POLICIES)}",
            path="schema_policy",
        )
    if target is None:
        return SchemaDecision(policy, source)

    diffs = schema_diff(target, source)
    refused = [d for d in diffs if policy not in d.allowed_by]
    if refused:
        raise ConfigurationError(
            f"the source schema does not fit the target under schema_policy {policy!r}; "
            f"{len(refused)} of {len(diffs)} difference(s) are not allowed:\n"
            + format_schema_diff(diffs),
            path="schema_policy",
        )

    added = [d.source for d in diffs if d.kind == MISSING_IN_TARGET and policy == "evolve"]
    dropped = [d.column for d in diffs if d.kind == MISSING_IN_TARGET and policy == "ignore_extra"]
    null_filled = [d.column for d in diffs if d.kind == MISSING_IN_SOURCE]
    # Existing target rows have no value for an added column: it must be nullable.
    write_fields = list(target) + [f.with_nullable(True) for f in added]
    return SchemaDecision(
        policy=policy,
        write_schema=pa.schema(write_fields, metadata=target.metadata),
        added_columns=[f.name for f in added],
        dropped_columns=dropped,
        null_filled_columns=null_filled,
        diffs=diffs,
    )
