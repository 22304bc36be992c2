"""SQL text of the PostgreSQL backend: identifiers, DDL, catalog queries and ``where`` pushdown.

Nothing here talks to a server; :mod:`ferry.backends.postgres` runs what these
functions build. Every identifier goes through :func:`quote_ident` (names
over 63 bytes are refused rather than silently truncated by the server);
every literal of a pushed-down filter goes through a :class:`Params`
collector, which either binds it (``$n``, for asyncpg) or renders it as a
typed, escaped literal (for the ADBC COPY path, because ``COPY (query) TO``
cannot take bind parameters).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .errors import ConfigurationError
from .filters import And, Comparison, Filter, Not, Or, coerce_literal
from .types import arrow_to_postgres, format_arrow_type, normalize_type, postgres_to_arrow

#: PostgreSQL truncates longer identifiers; Ferry refuses them instead.
MAX_IDENTIFIER_BYTES = 63

#: The ledger table (one per target schema) that makes partition writes idempotent.
LEDGER_TABLE = "_ferry_ledger"

#: Column comments Ferry writes to remember an Arrow type the column type cannot say (struct -> jsonb).
ARROW_COMMENT_PREFIX = "ferry:arrow="


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier; refuses names PostgreSQL would truncate."""
    if not name:
        raise ConfigurationError("an empty name cannot be a PostgreSQL identifier")
    if "\x00" in name:
        raise ConfigurationError(f"name {name!r} contains a NUL character; rename it (e.g. with a rename transform)")
    if len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise ConfigurationError(
            f"name {name!r} is {len(name.encode('utf-8'))} bytes long; PostgreSQL identifiers hold at most "
            f"{MAX_IDENTIFIER_BYTES} bytes: rename it (e.g. with a rename transform)"
        )
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    """``"schema"."table"``."""
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def split_dataset(dataset: str, default_schema: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` -> (schema, table)."""
    if "." in dataset:
        schema, table = dataset.split(".", 1)
        return schema, table
    return default_schema, dataset


def check_column_names(names: list[str], table: str) -> None:
    """Refuse names over 63 bytes and names that clash once case-folded."""
    seen: dict[str, str] = {}
    for name in names:
        quote_ident(name)
        folded = name.casefold()
        if folded in seen:
            raise ConfigurationError(
                f"columns {seen[folded]!r} and {name!r} of table {table!r} differ only in case; "
                "tools that fold unquoted names to lower case cannot tell them apart: rename one"
            )
        seen[folded] = name


def helper_table_name(table: str, run_id: str, purpose: str) -> str:
    """A deterministic, <= 63-byte name for a run's helper table (``new`` for replace)."""
    digest = hashlib.sha256(f"{table}\x00{run_id}\x00{purpose}".encode()).hexdigest()[:10]
    stem = table.encode("utf-8")[:36].decode("utf-8", "ignore")
    return f"{stem}__ferry_{purpose}_{digest}"


def column_sql_type(field: pa.Field) -> str:
    """The column type a new table gets for ``field`` (types.py's mapping)."""
    return arrow_to_postgres(field.type)


def declared_arrow_comment(field: pa.Field) -> str | None:
    """A column comment recording the Arrow type when reading the column back would give another type."""
    natural = postgres_to_arrow(column_sql_type(field))
    if normalize_type(natural) == normalize_type(field.type):
        return None
    try:
        return ARROW_COMMENT_PREFIX + format_arrow_type(field.type)
    except ConfigurationError:
        return None


def create_table_sql(schema: str, table: str, arrow_schema: pa.Schema, key: tuple[str, ...], *, temporary: bool = False) -> list[str]:
    """CREATE TABLE (and column comments) for ``arrow_schema``; the key becomes the primary key."""
    check_column_names(arrow_schema.names, table)
    columns = []
    for field in arrow_schema:
        not_null = " NOT NULL" if (not field.nullable or field.name in key) else ""
        columns.append(f"{quote_ident(field.name)} {column_sql_type(field)}{not_null}")
    if key:
        columns.append("PRIMARY KEY (" + ", ".join(quote_ident(k) for k in key) + ")")
    name = quote_ident(table) if temporary else qualified(schema, table)
    statements = [f"CREATE {'TEMPORARY ' if temporary else ''}TABLE {name} (" + ", ".join(columns) + ")"]
    if not temporary:
        for field in arrow_schema:
            comment = declared_arrow_comment(field)
            if comment:
                statements.append(
                    f"COMMENT ON COLUMN {name}.{quote_ident(field.name)} IS {render_text_literal(comment)}"
                )
    return statements


def index_sql(schema: str, table: str, index: Any, columns: list[str]) -> str:
    """CREATE INDEX IF NOT EXISTS for a declared index (``index`` is a PostgresIndex)."""
    missing = [c for c in index.columns if c not in columns]
    if missing:
        raise ConfigurationError(
            f"index on {', '.join(index.columns)}: column(s) {', '.join(missing)} are not written to {table}",
            path="target.indexes",
        )
    name = index.name or f"{table}_{'_'.join(index.columns)}_{index.method}"
    if len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES and not index.name:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = table.encode("utf-8")[:40].decode("utf-8", "ignore") + f"_{index.method}_{digest}"
    unique = "UNIQUE " if index.unique else ""
    text = (
        f"CREATE {unique}INDEX IF NOT EXISTS {quote_ident(name)} ON {qualified(schema, table)} "
        f"USING {index.method} (" + ", ".join(quote_ident(c) for c in index.columns) + ")"
    )
    if index.where:
        text += f" WHERE {index.where}"
    return text


def ledger_sql(schema: str) -> str:
    """CREATE TABLE IF NOT EXISTS for the schema's ledger."""
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, LEDGER_TABLE)} ("
        "job text NOT NULL, run_id text NOT NULL, partition_id text NOT NULL, target text NOT NULL, "
        "rows bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (target, run_id, partition_id, job))"
    )


#: Columns of a table or view: name, type text, enum?, not null, Ferry's Arrow comment.
CATALOG_COLUMNS_SQL = """
SELECT a.attname AS name,
       format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid),
                   CASE WHEN t.typbasetype <> 0 THEN t.typtypmod ELSE a.atttypmod END) AS type,
       (COALESCE(bt.typtype, t.typtype) = 'e'
        OR COALESCE(et.typtype, '') = 'e') AS is_enum,
       a.attnotnull AS not_null,
       col_description(a.attrelid, a.attnum) AS comment
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON bt.oid = NULLIF(t.typbasetype, 0)
LEFT JOIN pg_type et ON et.oid = NULLIF(t.typelem, 0) AND t.typcategory = 'A'
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

#: Primary key columns of a table, in key order.
PRIMARY_KEY_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
ORDER BY k.ord
"""

#: What depends on a table in a way a rename swap would break.
DEPENDENTS_SQL = """
SELECT 'view ' || r.ev_class::regclass::text FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
  WHERE d.refobjid = to_regclass($1) AND d.classid = 'pg_rewrite'::regclass AND r.ev_class <> d.refobjid
UNION
SELECT 'foreign key ' || conname || ' of ' || conrelid::regclass::text FROM pg_constraint
  WHERE confrelid = to_regclass($1) AND contype = 'f'
UNION
SELECT 'publication ' || p.pubname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
  WHERE pr.prrelid = to_regclass($1)
"""


@dataclass
class CatalogColumn:
    """One column as the catalog describes it, with the Arrow type Ferry reads it as."""

    name: str
    pg_type: str
    is_enum: bool
    not_null: bool
    arrow: pa.DataType
    #: The Arrow type the values travel in from the driver before conversion.
    declared: pa.DataType | None = None

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.declared or self.arrow, nullable=not self.not_null)


def catalog_column(name: str, pg_type: str, is_enum: bool, not_null: bool, comment: str | None) -> CatalogColumn:
    """Build a :class:`CatalogColumn`; a Ferry comment on a jsonb column restores a declared struct type."""
    arrow = postgres_to_arrow(pg_type, is_enum=is_enum)
    declared = None
    if comment and comment.startswith(ARROW_COMMENT_PREFIX):
        from .types import parse_arrow_type

        try:
            declared = parse_arrow_type(comment[len(ARROW_COMMENT_PREFIX):])
        except ConfigurationError:
            declared = None
    return CatalogColumn(name, pg_type, is_enum, not_null, arrow, declared)


def select_list(columns: list[CatalogColumn]) -> str:
    """The SELECT list of a bulk read: enums and uuids as text (the driver has no Arrow type for them)."""
    parts = []
    for column in columns:
        name = quote_ident(column.name)
        base = column.pg_type.split("(")[0].strip()
        if column.is_enum or base in ("uuid", "name", '"char"', "citext", "oid"):
            cast = "text[]" if column.pg_type.endswith("[]") else "text"
            if base == "oid":
                cast = "bigint"
            parts.append(f"{name}::{cast} AS {name}")
        else:
            parts.append(name)
    return ", ".join(parts) if parts else "NULL"


# -- where pushdown ---------------------------------------------------------------------

#: Catalog types whose SQL comparisons agree with Ferry's filter semantics.
_PUSHABLE_TYPES = (
    "smallint",
    "integer",
    "bigint",
    "numeric",
    "boolean",
    "text",
    "character varying",
    "date",
    "timestamp without time zone",
    "timestamp with time zone",
)
_TEXT_TYPES = ("text", "character varying")
_SQL_OPERATORS = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class Params:
    """Collects a pushed-down filter's literals: bound (``$n``) or rendered as typed literals."""

    def __init__(self, *, inline: bool, start: int = 1) -> None:
        self.inline = inline
        self.values: list[Any] = []
        self._start = start

    def add(self, value: Any, pg_type: str) -> str:
        """Placeholder (or literal) for ``value`` compared with a ``pg_type`` column."""
        cast = _cast_type(pg_type)
        if self.inline:
            return f"{render_literal(value)}::{cast}"
        self.values.append(value)
        return f"${self._start + len(self.values) - 1}::{cast}"


def _cast_type(pg_type: str) -> str:
    base = pg_type.split("(")[0].strip()
    return {"character varying": "text", "numeric": "numeric"}.get(base, base)


def render_text_literal(text: str) -> str:
    """A standard-conforming string literal (the connection forces standard_conforming_strings=on)."""
    if "\x00" in text:
        raise ConfigurationError("a filter value cannot contain a NUL character")
    return "'" + text.replace("'", "''") + "'"


def render_literal(value: Any) -> str:
    """A SQL literal for a filter value of a supported type (never user SQL)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ConfigurationError("a decimal filter value must be finite")
        return render_text_literal(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError("a float filter value must be finite")
        return repr(value)
    if isinstance(value, dt.datetime):
        return render_text_literal(value.isoformat())
    if isinstance(value, dt.date):
        return render_text_literal(value.isoformat())
    if isinstance(value, str):
        return render_text_literal(value)
    if isinstance(value, (list, tuple)):
        return "ARRAY[" + ", ".join(render_literal(v) for v in value) + "]"
    raise ConfigurationError(f"cannot render filter value {value!r} as SQL")


def filter_to_sql(where: Filter, columns: dict[str, CatalogColumn], params: Params) -> str | None:
    """SQL for the rows ``where`` keeps, or a superset of them; None when nothing can be pushed.

    The caller always applies :func:`ferry.backends.filters.filter_batch`
    afterwards, so a pushed condition may keep extra rows but must never drop
    a row the reference evaluator keeps. Leaves under a ``not`` are made
    null-free (SQL's unknown would otherwise turn into a dropped row), text
    order comparisons use the C collation (code point order, like Ferry).
    """
    return _node_sql(where, columns, params, negated=False)


def _node_sql(node: Filter, columns: dict[str, CatalogColumn], params: Params, *, negated: bool) -> str | None:
    if isinstance(node, Comparison):
        return _leaf_sql(node, columns, params, negated=negated)
    if isinstance(node, And):
        parts = [_node_sql(i, columns, params, negated=negated) for i in node.items]
        if negated:
            # not(a and b) = not a or not b: every part must be exact.
            if any(p is None for p in parts):
                return None
        parts = [p for p in parts if p is not None]
        if not node.items:
            return "true"
        return "(" + " AND ".join(parts) + ")" if parts else None
    if isinstance(node, Or):
        parts = [_node_sql(i, columns, params, negated=negated) for i in node.items]
        if not node.items:
            return "false"
        if any(p is None for p in parts):
            return None
        return "(" + " OR ".join(parts) + ")"
    if isinstance(node, Not):
        inner = _node_sql(node.item, columns, params, negated=not negated)
        if inner is None or not _exact(node.item, columns):
            return None
        return f"(NOT {inner})"
    return None


def _exact(node: Filter, columns: dict[str, CatalogColumn]) -> bool:
    """Whether every leaf under ``node`` is pushed exactly (needed before negating it)."""
    if isinstance(node, Comparison):
        return _leaf_supported(node, columns)
    if isinstance(node, (And, Or)):
        return all(_exact(i, columns) for i in node.items)
    if isinstance(node, Not):
        return _exact(node.item, columns)
    return False


def _leaf_supported(node: Comparison, columns: dict[str, CatalogColumn]) -> bool:
    column = columns.get(node.column)
    if column is None or column.is_enum or column.declared is not None:
        return False
    base = column.pg_type.split("(")[0].strip()
    if base not in _PUSHABLE_TYPES:
        return False
    if node.op == "regex":
        return False  # RE2 and PostgreSQL regular expressions differ
    if node.op == "like" and base not in _TEXT_TYPES:
        return False
    if base == "numeric" and not pa.types.is_decimal(column.arrow):
        return False
    return True


def _leaf_sql(node: Comparison, columns: dict[str, CatalogColumn], params: Params, *, negated: bool) -> str | None:
    if not _leaf_supported(node, columns):
        return None
    column = columns[node.column]
    name = quote_ident(column.name)
    base = column.pg_type.split("(")[0].strip()
    text = base in _TEXT_TYPES
    ordered = f"{name} COLLATE \"C\"" if text else name

    def literal(value: Any) -> Any:
        scalar = coerce_literal(value, column.arrow, column=column.name, path=node.path)
        return scalar.as_py()

    op = node.op
    if op == "exists":
        return f"({name} IS NOT NULL)" if node.value else f"({name} IS NULL)"
    if op == "neq":
        return f"({name} IS DISTINCT FROM {params.add(literal(node.value), column.pg_type)})"
    if op == "not_in":
        values = [literal(v) for v in node.value]
        if not values:
            return "true"
        placeholders = ", ".join(params.add(v, column.pg_type) for v in values)
        return f"({name} IS NULL OR {name} NOT IN ({placeholders}))"
    if op in _SQL_OPERATORS:
        target = ordered if op != "eq" else name
        condition = f"{target} {_SQL_OPERATORS[op]} {params.add(literal(node.value), column.pg_type)}"
    elif op == "between":
        low, high = (params.add(literal(v), column.pg_type) for v in node.value)
        condition = f"{ordered} BETWEEN {low} AND {high}"
    elif op == "in":
        values = [literal(v) for v in node.value]
        if not values:
            return "false"
        condition = f"{name} IN (" + ", ".join(params.add(v, column.pg_type) for v in values) + ")"
    elif op == "like":
        condition = f"{name} LIKE {params.add(node.value, column.pg_type)}"
    else:
        return None
    # A null column gives SQL's unknown: false for Ferry. Under a NOT it must be an explicit false.
    return f"COALESCE({condition}, false)" if negated else f"({condition})"


def json_default(value: Any) -> Any:
    """``json.dumps`` default for values the struct encoder falls back on."""
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def dumps(value: Any) -> str:
    """Compact JSON text for a jsonb value."""
    return json.dumps(value, default=json_default, ensure_ascii=False, separators=(", ", ": "))
