"""Arrow <-> Elasticsearch / OpenSearch: index mappings, documents and hits.

* :func:`index_mapping` builds an index mapping from an Arrow schema with the
  guide's field advice (field types come from
  :func:`ferry.backends.types.arrow_to_elasticsearch`; this module adds the
  job's choices: searchable text, object modes, non-finite floats) and keeps
  the Arrow schema itself in the mapping's ``_meta`` so the index reads back
  exactly.
* :func:`schema_from_mapping` infers an Arrow schema for indexes Ferry did
  not create.
* :func:`encode_documents` turns a record batch into JSON documents,
  column by column (Arrow casts do the formatting, orjson the rest).
* :func:`decode_sources` turns a page of ``_source`` objects into one record
  batch of a fixed schema, column by column, with a per-value slow path only
  for columns whose fast conversion fails.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from decimal import Decimal
from typing import Any, Iterable

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigurationError, DataError
from .types import arrow_to_elasticsearch

#: Key under the mapping's ``_meta`` where Ferry keeps its own information.
META_KEY = "ferry"

#: Values a float field can hold that JSON numbers cannot.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# -----------------------------------------------------------------------------
# Mappings
# -----------------------------------------------------------------------------


def field_mapping(
    name: str,
    arrow_type: pa.DataType,
    *,
    searchable: set[str],
    object_modes: dict[str, str],
    prefix: str = "",
) -> dict[str, Any]:
    """The mapping of one field (recursing into structs and lists of structs)."""
    path = f"{prefix}{name}"
    mode = object_modes.get(path)
    element = arrow_type
    while pa.types.is_list(element) or pa.types.is_large_list(element) or pa.types.is_fixed_size_list(element):
        element = element.value_type
    if mode == "flattened":
        return {"type": "flattened"}
    if mode in ("disabled", "enabled_false"):
        return {"type": "object", "enabled": False}
    if pa.types.is_struct(element):
        properties = {
            f.name: field_mapping(f.name, f.type, searchable=searchable, object_modes=object_modes, prefix=f"{path}.")
            for f in element
        }
        return {"type": "nested" if mode == "nested" else "object", "properties": properties}
    mapping = arrow_to_elasticsearch(element)
    if path in searchable:
        if mapping.get("type") != "keyword":
            raise ConfigurationError(
                f"column {path!r} is marked searchable but is {element}, not a string; "
                "only string columns can be full-text fields",
                path="searchable",
            )
        return {"type": "text", "fields": {"keyword": {"type": "keyword"}}}
    if mapping.get("type") in ("double", "float", "half_float"):
        # JSON has no NaN or infinities: Ferry writes them as the strings
        # "NaN"/"Infinity"/"-Infinity", kept in _source but not indexed.
        mapping = {**mapping, "ignore_malformed": True}
    return mapping


def index_mapping(
    schema: pa.Schema,
    *,
    searchable: Iterable[str] = (),
    object_modes: dict[str, str] | None = None,
    user_mapping: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    product: str = "elasticsearch",
) -> dict[str, Any]:
    """The mapping of a new index for ``schema``; ``user_mapping`` wins field by field.

    OpenSearch calls Elasticsearch's ``flattened`` type ``flat_object``.
    """
    searchable_set = set(searchable)
    modes = dict(object_modes or {})
    unknown = (searchable_set | set(modes)) - _all_paths(schema)
    if unknown:
        raise ConfigurationError(
            f"column(s) {', '.join(sorted(unknown))} are not in the written schema; "
            f"columns: {', '.join(schema.names)}",
            path="searchable" if unknown & searchable_set else "object_fields",
        )
    properties = {
        f.name: field_mapping(f.name, f.type, searchable=searchable_set, object_modes=modes) for f in schema
    }
    if product == "opensearch":
        properties = {name: _opensearch_field(spec) for name, spec in properties.items()}
    mapping: dict[str, Any] = {"dynamic": True, "properties": properties}
    if user_mapping:
        user = dict(user_mapping)
        user_properties = user.pop("properties", {}) or {}
        mapping.update(user)
        mapping["properties"] = {**properties, **user_properties}
    meta_block = dict(mapping.get("_meta") or {})
    meta_block[META_KEY] = {"arrow_schema": encode_schema(schema), **(meta or {})}
    mapping["_meta"] = meta_block
    return mapping


def _opensearch_field(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("type") == "flattened":
        return {**spec, "type": "flat_object"}
    if "properties" in spec:
        return {**spec, "properties": {k: _opensearch_field(v) for k, v in spec["properties"].items()}}
    return spec


def _all_paths(schema: pa.Schema) -> set[str]:
    paths: set[str] = set()

    def walk(prefix: str, t: pa.DataType) -> None:
        while pa.types.is_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        if pa.types.is_struct(t):
            for f in t:
                paths.add(prefix + f.name)
                walk(prefix + f.name + ".", f.type)

    for f in schema:
        paths.add(f.name)
        walk(f.name + ".", f.type)
    return paths


def encode_schema(schema: pa.Schema) -> str:
    """An Arrow schema as base64 IPC (kept in the mapping's ``_meta``)."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    """The inverse of :func:`encode_schema`."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


_ES_TO_ARROW: dict[str, pa.DataType] = {
    "keyword": pa.string(),
    "constant_keyword": pa.string(),
    "wildcard": pa.string(),
    "text": pa.string(),
    "match_only_text": pa.string(),
    "ip": pa.string(),
    "version": pa.string(),
    "long": pa.int64(),
    "integer": pa.int32(),
    "short": pa.int16(),
    "byte": pa.int8(),
    "unsigned_long": pa.uint64(),
    "double": pa.float64(),
    "float": pa.float32(),
    "half_float": pa.float16(),
    "scaled_float": pa.float64(),
    "boolean": pa.bool_(),
    "date": pa.timestamp("ms", tz="UTC"),
    "date_nanos": pa.timestamp("ns", tz="UTC"),
    "binary": pa.binary(),
    "flattened": pa.string(),
    "flat_object": pa.string(),
}


def schema_from_mapping(properties: dict[str, Any], list_paths: set[str], prefix: str = "") -> pa.Schema:
    """Infer an Arrow schema from mapping ``properties`` (indexes Ferry did not create).

    A field is a list when its path is in ``list_paths`` (the job says so or a
    sample of documents showed an array). Types with no Arrow counterpart
    (geo points, flattened, disabled objects...) are read as JSON text.
    """
    fields = []
    for name in sorted(properties):
        spec = properties[name] or {}
        path = f"{prefix}{name}"
        kind = spec.get("type", "object" if "properties" in spec else "keyword")
        if kind in ("object", "nested") and spec.get("enabled", True) is not False and "properties" in spec:
            inner = schema_from_mapping(spec["properties"], list_paths, prefix=path + ".")
            arrow_type: pa.DataType = pa.struct(list(inner))
            if kind == "nested":
                arrow_type = pa.list_(arrow_type)
        elif kind == "alias":
            continue
        else:
            arrow_type = _ES_TO_ARROW.get(kind, pa.string())
        if path in list_paths and not pa.types.is_list(arrow_type):
            arrow_type = pa.list_(arrow_type)
        fields.append(pa.field(name, arrow_type))
    return pa.schema(fields)


def array_paths(sources: Iterable[dict[str, Any]]) -> set[str]:
    """Paths of fields that hold an array in any of ``sources`` (for schema inference)."""
    found: set[str] = set()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                path = prefix + key
                if isinstance(item, list):
                    found.add(path)
                    for element in item:
                        walk(path + ".", element)
                else:
                    walk(path + ".", item)

    for source in sources:
        walk("", source)
    return found


# -----------------------------------------------------------------------------
# Documents (Arrow -> JSON)
# -----------------------------------------------------------------------------


def _json_ready(array: pa.Array) -> pa.Array:
    """A vectorized cast of ``array`` to types whose Python values orjson writes as wanted."""
    t = array.type
    if pa.types.is_dictionary(t):
        return _json_ready(array.cast(t.value_type))
    if pa.types.is_timestamp(t):
        if t.tz is not None:
            # Stored as UTC already: relabel, then write ISO-8601 with a Z.
            utc = array.cast(pa.timestamp(t.unit, tz="UTC"))
            suffix = "Z"
        else:
            utc, suffix = array, ""
        return pc.strftime(utc, format="%Y-%m-%dT%H:%M:%S" + suffix)
    if pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return array.cast(pa.string())
    if pa.types.is_duration(t):
        return array.cast(pa.int64())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return array.cast(pa.string())
    if pa.types.is_struct(t):
        children = [_json_ready(array.field(i)) for i in range(t.num_fields)]
        return pa.StructArray.from_arrays(
            children, fields=[pa.field(f.name, c.type) for f, c in zip(t, children)], mask=array.is_null()
        )
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = _json_ready(array.values)
        if values.type != t.value_type:
            return type(array).from_arrays(array.offsets, values, mask=array.is_null())
        return array
    return array


def _python_column(array: pa.Array) -> list[Any]:
    """Python values of a JSON-ready column; binary as base64, non-finite floats as strings."""
    t = array.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else base64.b64encode(v).decode() for v in array.to_pylist()]
    if t == pa.month_day_nano_interval():
        return [None if v is None else _interval_json(v) for v in array.to_pylist()]
    values = array.to_pylist()
    if pa.types.is_floating(t) and len(array) and not pc.all(pc.or_kleene(pc.is_finite(array), pc.is_null(array))).as_py():
        return [_float_text(v) for v in values]
    if pa.types.is_map(t) or (pa.types.is_nested(t) and _has_nested_special(t)):
        return [_fix_nested(v, t) for v in values]
    return values


def _interval_json(value: Any) -> dict[str, int]:
    # The object types.py maps intervals to; nanoseconds below a microsecond are dropped.
    return {"months": value.months, "days": value.days, "microseconds": value.nanoseconds // 1000}


def _float_text(value: Any) -> Any:
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _has_nested_special(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(_has_nested_special(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_nested_special(t.value_type)
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_floating(t)
        or pa.types.is_map(t)
        or t == pa.month_day_nano_interval()
    )


def _fix_nested(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_struct(t):
        return {f.name: _fix_nested(value.get(f.name), f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_fix_nested(v, t.value_type) for v in value]
    if pa.types.is_map(t):
        # A map is written as a JSON object (the flattened field of types.py); keys become text.
        return {str(k): _fix_nested(v, t.item_type) for k, v in value}
    if t == pa.month_day_nano_interval():
        return _interval_json(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float):
        return _float_text(value)
    return value


def encode_documents(batch: pa.RecordBatch) -> list[bytes]:
    """One JSON document per row of ``batch`` (nulls written as null)."""
    names = batch.schema.names
    try:
        columns = [_python_column(_json_ready(batch.column(i))) for i in range(batch.num_columns)]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"cannot turn the batch into JSON documents: {exc}") from None
    dumps = orjson.dumps
    return [dumps(dict(zip(names, row))) for row in zip(*columns)] if columns else [b"{}"] * batch.num_rows


def key_ids(batch: pa.RecordBatch, key: tuple[str, ...]) -> list[str]:
    """Deterministic document ids from the key columns (a retry overwrites, never duplicates)."""
    parts = []
    for name in key:
        column = batch.column(batch.schema.get_field_index(name))
        if column.null_count:
            raise DataError("a key column holds nulls; document ids need every key value", column=name, rows=column.null_count)
        parts.append(_json_ready(column).cast(pa.string()).to_pylist())
    if len(parts) == 1:
        return parts[0]
    # Several key columns: a JSON array is unambiguous whatever the values hold.
    return [orjson.dumps(list(values)).decode() for values in zip(*parts)]


# -----------------------------------------------------------------------------
# Hits (JSON -> Arrow)
# -----------------------------------------------------------------------------


def decode_sources(sources: list[dict[str, Any]], schema: pa.Schema, ids: list[str] | None = None) -> pa.RecordBatch:
    """One record batch of ``schema`` from a page of ``_source`` objects.

    Column by column: the values of a field are gathered with one list
    comprehension and converted by Arrow in one call; a field whose fast
    conversion fails (a string date, a decimal held as text, a single value
    where a list is expected) takes the per-value path for that page only.
    Missing fields are nulls, so every page has the same schema.
    """
    arrays = []
    for f in schema:
        if f.name == "_id" and ids is not None:
            arrays.append(pa.array(ids, pa.string()))
            continue
        name = f.name
        values = [s.get(name) for s in sources]
        arrays.append(_to_array(values, f.type, name))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _to_array(values: list[Any], t: pa.DataType, name: str) -> pa.Array:
    fast = _fast_type(t)
    if fast is not None:
        try:
            array = pa.array(values, type=fast)
            return array if fast == t else _cast_text(array, t)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
            pass
    try:
        return pa.array([_to_python(v, t) for v in values], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError, ArithmeticError) as exc:
        raise DataError(f"a document value does not fit the column type {t}: {exc}", column=name) from None


def _fast_type(t: pa.DataType) -> pa.DataType | None:
    """The type Arrow can build straight from JSON values, or None when only the slow path works."""
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t):
        return pa.string()
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_time(t)
        or pa.types.is_duration(t)
        or pa.types.is_map(t)
        or t == pa.month_day_nano_interval()
    ):
        return None
    if pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        return t if not _has_special(t) else None
    return t


def _has_special(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(_has_special(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_special(t.value_type)
    return _fast_type(t) != t


def _cast_text(array: pa.Array, t: pa.DataType) -> pa.Array:
    """Text written by Ferry (ISO dates, decimal text) to ``t``; raises when the text differs."""
    return array.cast(t)


def _to_python(value: Any, t: pa.DataType) -> Any:
    """One JSON value as the Python value Arrow expects for ``t`` (the slow path)."""
    if value is None:
        return None
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        items = value if isinstance(value, list) else [value]
        return [_to_python(v, t.value_type) for v in items]
    if isinstance(value, list):
        if not value:
            return None
        if len(value) == 1:
            value = value[0]
        else:
            raise ValueError(f"an array {value!r} where one value was expected; list the field in `list_fields`")
    if pa.types.is_struct(t):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return {f.name: _to_python(value.get(f.name), f.type) for f in t}
    if pa.types.is_map(t):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object for a map, got {value!r}")
        return [(_to_python(k, t.key_type), _to_python(v, t.item_type)) for k, v in value.items()]
    if t == pa.month_day_nano_interval():
        return pa.MonthDayNano([value["months"], value["days"], value["microseconds"] * 1000])
    if pa.types.is_timestamp(t):
        return _timestamp(value, t)
    if pa.types.is_date(t):
        if isinstance(value, (int, float)):
            return dt.date(1970, 1, 1) + dt.timedelta(milliseconds=value)
        return dt.date.fromisoformat(str(value)[:10])
    if pa.types.is_decimal(t):
        return Decimal(str(value))
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return base64.b64decode(value)
    if pa.types.is_time(t):
        return dt.time.fromisoformat(str(value))
    if pa.types.is_duration(t):
        return pa.scalar(int(value), pa.int64()).cast(t).as_py()
    if pa.types.is_floating(t):
        if isinstance(value, str):
            return _NON_FINITE[value] if value in _NON_FINITE else float(value)
        return float(value)
    if pa.types.is_integer(t):
        return int(value) if not isinstance(value, str) else int(Decimal(value))
    if pa.types.is_boolean(t):
        if isinstance(value, str):
            return value == "true"
        return bool(value)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if isinstance(value, (dict, list)):
            return orjson.dumps(value).decode()
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    return value


def _timestamp(value: Any, t: pa.TimestampType) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=value)
    else:
        text = str(value)
        if text.isdigit():
            moment = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=int(text))
        else:
            scalar = pa.scalar(text.replace(" ", "T"))
            try:
                return scalar.cast(pa.timestamp("ns", tz="UTC") if t.tz else pa.timestamp("ns")).cast(t).as_py()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    if t.tz is None:
        return moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return moment
