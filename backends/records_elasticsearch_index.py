"""The record index of the Elasticsearch / OpenSearch record store: settings, mapping, documents.

A record is one document whose ``_id`` is the record id::

    {"rid": "<id>",                      keyword: tie-breaker of every sort, search_after key
     "src": "<fields as JSON text>",     storage only (object, enabled: false)
     "meta": "<metadata JSON>" | null,   storage only
     "ix": [{"<key>": {"r": 1, "n": 2.5}, ...}],   the indexed view of the fields
     "created_at": ms, "updated_at": ms} date, epoch_millis

* ``src`` keeps the fields exactly (ints of any size stay ints, floats,
  NaN, dates, datetimes and Decimals tagged, nested lists and dicts), so
  reads never depend on how the index saw a value.
* ``ix`` is what queries see. Records have no schema, so one field may hold
  a string in one record and a number in the next; each value goes to a
  sub-field of its kind, typed by dynamic templates and never in conflict:
  ``s`` keyword (strings), ``n`` double (numbers exactly representable as a
  double), ``b`` boolean, ``d`` integer (date ordinal), ``t`` long (datetime
  as UTC epoch microseconds), ``r`` byte (the kind's rank in the reference
  order: string 0, number 1, boolean 2, date 3, datetime 4, other 5) and
  ``x`` (a value the index cannot hold exactly: a string over
  ``MAX_KEYWORD_CHARS``, a number that is no exact double, NaN, infinity).
  Field names become keys that are never ES metadata and hold no dots:
  ``f<name>`` for names of ``[A-Za-z0-9_-]``, else ``h<hex of UTF-8>``.
* ``ix`` is a one-element array: a bulk ``update`` merges objects but
  replaces arrays, so an update replaces the whole view in one bulk action.

The store's settings (:class:`ElasticsearchRecordSettings`, :func:`split_config`)
and slowlog thresholds (:func:`slowlog_settings`) are here too.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import warnings
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Mapping

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .elasticsearch import ElasticsearchBackend
from .errors import ConfigurationError
from .records_model import Record, RecordError, batch_item

__all__ = [
    "LAYOUT_VERSION",
    "MAX_KEYWORD_CHARS",
    "SLOWLOG_SETTINGS",
    "ElasticsearchRecordSettings",
    "split_config",
    "slowlog_settings",
    "index_body",
    "field_key",
    "encode_values",
    "decode_values",
    "index_view",
    "prepare",
    "record_from_source",
]

#: Written in the mapping's ``_meta.ferry.records_layout``; an index without it is not a record index.
LAYOUT_VERSION = 1
#: Longest string indexed as a keyword (Lucene's term limit is 32766 bytes, 4 bytes a character at most).
MAX_KEYWORD_CHARS = 8191
#: Fields an index may map: each record field maps up to 8 (its object and sub-fields).
TOTAL_FIELDS_LIMIT = 20_000

DATE_TAG = "$date"  # the same tags as the PostgreSQL store
DATETIME_TAG = "$datetime"
DECIMAL_TAG = "$decimal"

#: Kinds of values, numbered by their rank in the reference order.
STRING, NUMBER, BOOLEAN, DATE, DATETIME, OTHER = range(6)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_MICROSECOND = _dt.timedelta(microseconds=1)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

#: Fields of the migration backend a record store takes: the connection and the bulk requests.
_BLOCK_KEYS = (
    "hosts", "cloud_id", "api_key", "username", "password", "ca_certs", "verify_certs",
    "request_timeout_seconds", "max_retries", "retry_on_timeout", "connections", "maxsize", "dialect",
    "max_requests_in_flight", "chunk_max_bytes", "document_max_bytes", "bulk_max_retries",
    "initial_backoff_seconds", "max_backoff_seconds",
)
#: Block fields that are index settings of the record index.
_INDEX_KEYS = ("number_of_shards", "number_of_replicas", "refresh_interval")

#: Every slowlog threshold setting, by its short name (``query.warn``, ``fetch.info``, ``index.debug``).
SLOWLOG_SETTINGS: dict[str, str] = {
    **{
        f"{phase}.{level}": f"index.search.slowlog.threshold.{phase}.{level}"
        for phase in ("query", "fetch")
        for level in ("warn", "info", "debug", "trace")
    },
    **{f"index.{level}": f"index.indexing.slowlog.threshold.index.{level}" for level in ("warn", "info", "debug", "trace")},
}
_TIME_VALUE = re.compile(r"-1|0|\d+(\.\d+)?(nanos|micros|ms|s|m|h|d)")


class ElasticsearchRecordSettings(BaseModel):
    """Record-store settings besides the connection (which is an ElasticsearchBackend's)."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field("records", description="Index holding the records (created on first use).")
    index_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the index when it is created, e.g. number_of_shards, refresh_interval, "
        "max_result_window (the `index.` prefix is optional).",
    )
    refresh: bool | Literal["wait_for"] = Field(
        False, description="`refresh` of bulk requests: false (the guide's advice for bulk indexing), true or wait_for."
    )
    read_your_writes: bool = Field(
        True,
        description="With refresh false: refresh the index before the next search or count after a write made "
        "through this store, so searches see it (reads by id always do).",
    )
    slowlog: dict[str, str | None] = Field(
        default_factory=dict, description="Slowlog thresholds set on the index when the store opens (see set_slowlog)."
    )


_RECORD_KEYS = set(ElasticsearchRecordSettings.model_fields)


def split_config(config: Any, block_class: type[ElasticsearchBackend]) -> tuple[ElasticsearchBackend, ElasticsearchRecordSettings]:
    """The connection block and the record settings of a dict, a saved block or a settings-file section."""
    if isinstance(config, ElasticsearchBackend):
        return config.fresh(), ElasticsearchRecordSettings()
    if isinstance(config, BaseModel):
        config = config.model_dump(exclude_none=True)
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"{block_class.kind} store settings are a mapping such as {{'hosts': ['http://localhost:9200'], "
            f"'index': 'records'}}, a saved block, or a databases.elasticsearch section; got {type(config).__name__}",
            path="config",
        )
    accepted = {*_BLOCK_KEYS, *_INDEX_KEYS, *_RECORD_KEYS, "timeout", "pool"}
    unknown = sorted(set(map(str, config)) - accepted)
    if unknown:
        raise ConfigurationError(
            f"invalid {block_class.kind} store settings: unknown key(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted))}",
            path="config",
        )
    data = dict(config)
    record = {k: data.pop(k) for k in list(data) if k in _RECORD_KEYS}
    index = record.get("index")
    if isinstance(index, Mapping):  # a settings file's `index:` section: settings of the index, not its name
        record["index_settings"] = {**index, **(record.get("index_settings") or {})}
        del record["index"]
    index_settings = {k: data.pop(k) for k in _INDEX_KEYS if k in data}
    if index_settings:
        record["index_settings"] = {**index_settings, **(record.get("index_settings") or {})}
    if "timeout" in data:  # the guide's name of the request timeout
        data.setdefault("request_timeout_seconds", data["timeout"])
        del data["timeout"]
    pool = data.pop("pool", None) or {}
    if not isinstance(pool, Mapping):
        raise ConfigurationError("`pool` is a mapping such as {'connections': 10, 'maxsize': 20}", path="config.pool")
    sizes = {k: data.pop(k) for k in ("connections", "maxsize") if data.get(k) is not None}
    sizes = sizes or {k: pool[k] for k in ("connections", "maxsize") if pool.get(k) is not None}
    if sizes:
        data["connections"] = _per_node(sizes, block_class.kind)
    try:
        settings = ElasticsearchRecordSettings.model_validate(record)
        block = block_class.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid {block_class.kind} store settings: {problems}", path="config") from None
    slowlog_settings(settings.slowlog)  # refuses a bad key or value now
    return block, settings


def _per_node(sizes: Mapping[str, Any], kind: str) -> Any:
    """The client's one pool size per node from the guide's ``connections`` / ``maxsize`` (maxsize wins)."""
    if len(set(map(str, sizes.values()))) > 1:
        # The guide's configs give both (e.g. 20 and 50); the client has one size per node.
        warnings.warn(
            f"{kind} store: connections ({sizes['connections']}) has no effect: the client keeps one pool of "
            f"connections per node and maxsize ({sizes['maxsize']}) sets it",
            UserWarning,
            stacklevel=4,
        )
    return sizes.get("maxsize", sizes.get("connections"))


def slowlog_settings(thresholds: Mapping[str, str | None] | None = None, **short: str | None) -> dict[str, str | None]:
    """Index settings for slowlog thresholds given by full name, short name or keyword.

    ``{"index.search.slowlog.threshold.query.warn": "10s"}`` (the guide's
    form), ``{"query.warn": "10s"}`` and ``query_warn="10s"`` say the same.
    A value is an ES time value (``500ms``, ``2s``, ``-1`` to disable) or
    None to reset the threshold to the cluster default.
    """
    given = dict(thresholds or {})
    given.update({name.replace("_", ".", 1): value for name, value in short.items()})
    settings: dict[str, str | None] = {}
    for name, value in given.items():
        full = SLOWLOG_SETTINGS.get(name, name)
        if full not in SLOWLOG_SETTINGS.values():
            raise ConfigurationError(
                f"unknown slowlog threshold {name!r}; use {', '.join(SLOWLOG_SETTINGS)} (or their full "
                "index.search.slowlog.threshold.* / index.indexing.slowlog.threshold.index.* names)",
                path="slowlog",
            )
        if value is not None and (not isinstance(value, str) or not _TIME_VALUE.fullmatch(value)):
            raise ConfigurationError(
                f"slowlog threshold {name!r} takes a time value such as '500ms', '2s' or '-1', or None; got {value!r}",
                path="slowlog",
            )
        settings[full] = value
    return settings


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def index_body(index_settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings and mappings of a new record index (``index_settings`` win over the defaults)."""
    settings: dict[str, Any] = {"index.mapping.total_fields.limit": TOTAL_FIELDS_LIMIT}
    for name, value in index_settings.items():
        settings[name if name.startswith("index.") else f"index.{name}"] = value
    typed = {"s": {"type": "keyword", "ignore_above": MAX_KEYWORD_CHARS}, "n": {"type": "double"},
             "b": {"type": "boolean"}, "d": {"type": "integer"}, "t": {"type": "long"},
             "r": {"type": "byte"}, "x": {"type": "boolean"}}
    templates: list[dict[str, Any]] = [
        {f"ix_{sub}": {"path_match": f"ix.*.{sub}", "mapping": mapping}} for sub, mapping in typed.items()
    ]
    templates.append({"strings_as_keyword": {"match_mapping_type": "string", "mapping": {"type": "keyword"}}})
    stored = {"type": "object", "enabled": False}  # the guide's "storage-only fields"
    return {
        "settings": settings,
        "mappings": {
            "dynamic": "strict",
            "_meta": {"ferry": {"records_layout": LAYOUT_VERSION}},
            "dynamic_templates": templates,
            "properties": {
                "rid": {"type": "keyword"},
                "src": stored,
                "meta": stored,
                "ix": {"type": "object", "dynamic": True},
                "created_at": {"type": "date", "format": "epoch_millis"},
                "updated_at": {"type": "date", "format": "epoch_millis"},
            },
        },
    }


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-]{1,200}")


def field_key(name: str) -> str:
    """The key of a record field under ``ix``: no dots, never an ES metadata name, one per name."""
    if _PLAIN_NAME.fullmatch(name):
        return "f" + name
    return "h" + name.encode("utf-8").hex()


# --------------------------------------------------------------------------
# Encoding of src and meta
# --------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return {DATETIME_TAG: value.isoformat()}
    if isinstance(value, _dt.date):
        return {DATE_TAG: value.isoformat()}
    if isinstance(value, Decimal):
        return {DECIMAL_TAG: str(value)}
    raise TypeError(
        f"a {type(value).__name__} value cannot be stored; use str, number, bool, date, datetime, Decimal, list or dict"
    )


_ENCODER = json.JSONEncoder(default=_default, allow_nan=True, ensure_ascii=False, separators=(",", ":"))


def _check_keys(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"field names and object keys are strings, got {key!r}")
            _check_keys(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_keys(item)


def encode_values(values: Mapping[str, Any]) -> str:
    """JSON text of fields or metadata (TypeError / ValueError says why a value cannot be stored).

    orjson first; the standard encoder decides when orjson refuses (an int
    beyond 64 bits, a non-string key, a lone surrogate) or when the text
    holds a ``null`` (orjson writes NaN and infinities as null; the standard
    encoder writes ``NaN`` / ``Infinity``, which :func:`decode_values` reads back).
    """
    try:
        text = orjson.dumps(values, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME).decode()
        if "null" not in text:
            return text
    except TypeError:
        pass
    _check_keys(values)
    text = _ENCODER.encode(values)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate, which is not valid UTF-8") from None
    return text


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        (key, value), = obj.items()
        if isinstance(value, str):
            if key == DATETIME_TAG:
                return _dt.datetime.fromisoformat(value)
            if key == DATE_TAG:
                return _dt.date.fromisoformat(value)
            if key == DECIMAL_TAG:
                return Decimal(value)
    return obj


_SLOW_TEXT = re.compile(r'"\$d|NaN|Infinity|\d{19}')


def decode_values(text: str | None) -> dict[str, Any]:
    """The values of a stored JSON text (tags back to date, datetime, Decimal; exact big ints)."""
    if not text:
        return {}
    if _SLOW_TEXT.search(text):  # tags, non-finite floats, or ints orjson would read as floats
        return json.loads(text, object_hook=_hook)
    return orjson.loads(text)


# --------------------------------------------------------------------------
# The indexed view
# --------------------------------------------------------------------------


def _kind(value: Any) -> int:
    if isinstance(value, str):
        return STRING
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, (int, float, Decimal)):
        return NUMBER
    if isinstance(value, _dt.datetime):
        return DATETIME
    if isinstance(value, _dt.date):
        return DATE
    return OTHER


def exact_double(value: Any) -> float | None:
    """``value`` as a double when the double equals it exactly (``-0.0`` as ``0.0``), else None."""
    try:
        double = float(value)
    except (OverflowError, ValueError, InvalidOperation):
        return None
    if not math.isfinite(double) or double != value:
        return None
    return double + 0.0  # Lucene orders -0.0 before 0.0; the reference finds them equal


def micros(moment: _dt.datetime) -> int:
    """UTC epoch microseconds (a naive moment is read as UTC, as the reference does)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def _indexed(value: Any) -> dict[str, Any]:
    kind = _kind(value)
    if kind == STRING:
        return {"r": kind, "s": value} if len(value) <= MAX_KEYWORD_CHARS else {"r": kind, "x": True}
    if kind == NUMBER:
        double = exact_double(value)
        return {"r": kind, "n": double} if double is not None else {"r": kind, "x": True}
    if kind == BOOLEAN:
        return {"r": kind, "b": value}
    if kind == DATETIME:
        return {"r": kind, "t": micros(value)}
    if kind == DATE:
        return {"r": kind, "d": value.toordinal()}
    return {"r": kind}


def index_view(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ix`` object of a record's fields (null values are left out: they are missing to queries)."""
    return {field_key(name): _indexed(value) for name, value in fields.items() if value is not None}


# --------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------


def record_from_source(record_id: str, source: Mapping[str, Any]) -> Record:
    """The record of a hit's or a document's ``_source`` (its ``src`` and ``meta``)."""
    record = Record.__new__(Record)
    record.id = record_id
    record.fields = decode_values(source.get("src"))
    record.metadata = decode_values(source.get("meta"))
    return record


def prepare(index: int, item: Any, *, pairs: bool) -> tuple[str | None, dict[str, Any]] | RecordError:
    """``(id or None, document fields)`` of one item (src, meta and the indexed view), or why it cannot be stored."""
    try:
        record_id, record = batch_item(item, pairs=pairs)
        for name in record.fields:
            if type(name) is not str:
                raise TypeError(f"field names are strings, got {name!r}")
        doc = {
            "src": encode_values(record.fields),
            "meta": encode_values(record.metadata) if record.metadata else None,
            "ix": [index_view(record.fields)],
        }
        return record_id, doc
    except ConfigurationError as exc:
        return RecordError(index, exc.message, None)
    except (TypeError, ValueError) as exc:
        return RecordError(index, f"this record cannot be stored: {exc}", _safe_id(item))


def _safe_id(item: Any) -> str | None:
    try:
        return item.storage_id() if isinstance(item, Record) else None
    except Exception:
        return None
