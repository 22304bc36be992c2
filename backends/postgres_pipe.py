"""PostgreSQL -> PostgreSQL without decoding: binary COPY piped from the source into the target.

When a job reads PostgreSQL, writes PostgreSQL and only selects, drops or
renames columns, a partition need not become Arrow at all. Each partition
runs ``COPY (SELECT ...) TO STDOUT (FORMAT binary)`` on a source connection
and hands the bytes, untouched, to ``COPY ... FROM STDIN (FORMAT binary)`` on
a target connection (two pooled asyncpg connections joined by a small
bounded queue), inside the same guarantees as the normal path:

* the read is the partition's key or ctid range, in the run's exported
  snapshot (``SET TRANSACTION SNAPSHOT``), with the job's ``where`` in the
  SELECT (only a ``where`` PostgreSQL evaluates exactly takes this path);
* append and replace COPY into the write table and insert the partition's
  ledger row in the same transaction (a retry finds the row and skips);
  upsert COPYs into a temporary staging table (an identity column keeps
  arrival order) and merges it with the same ``INSERT ... ON CONFLICT`` as
  the normal path; replace loads the run's new table and is swapped in by
  ``publish`` as usual;
* binary COPY needs identical column types on both sides: a table this path
  creates gets the source's column types (and Ferry's ``ferry:arrow=``
  column comments, so both read back as the same Arrow types); an existing
  target must have exactly the source's types, or the job takes the normal
  path, and ``ferry plan`` says why.

:func:`plan_copy_pipe` decides (at plan time) whether the path is taken;
:class:`CopyPipe` is the small, picklable decision that travels with every
partition; :func:`copy_partition` runs one partition.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from . import postgres_sql as sql
from .base import Partition, WriteContext, WriteMode, WriteResult
from .errors import ConfigurationError, FerryError, PermanentBackendError
from .filters import Filter
from .postgres_copy import translate_error
from .postgres_write import merge_sql
from .stream import run_together

if TYPE_CHECKING:
    from .postgres import PostgresBackend

#: Chunks of COPY data (tens of KiB each) held between the two connections.
QUEUE_CHUNKS = 16

#: Types created by initdb have OIDs below this (PostgreSQL's FirstNormalObjectId). Their
#: binary form, element OIDs of arrays included, is the same in every database.
FIRST_USER_OID = 16384

#: Columns of a table with what the fast path needs to know of their types.
PIPE_CATALOG_SQL = """
SELECT a.attname AS name,
       format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid),
                   CASE WHEN t.typbasetype <> 0 THEN t.typtypmod ELSE a.atttypmod END) AS type,
       COALESCE(NULLIF(t.typbasetype, 0), a.atttypid)::oid::bigint < {first_user_oid} AS builtin,
       a.attnotnull AS not_null,
       col_description(a.attrelid, a.attnum) AS comment
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
""".format(first_user_oid=FIRST_USER_OID)

_TEMPORAL = re.compile(r"^(date|timestamp)")


@dataclass(frozen=True)
class PipeColumn:
    """One column the fast path copies: its source name, its written name and its PostgreSQL type."""

    source: str
    target: str
    pg_type: str
    not_null: bool = False
    #: Ferry's ``ferry:arrow=`` comment of the source column, carried to a table this path creates.
    comment: str | None = None


@dataclass(frozen=True)
class CopyPipe:
    """The plan's decision to copy PostgreSQL -> PostgreSQL by binary COPY (travels with each partition).

    Implements the flow's direct-copy protocol: :meth:`copy` moves one
    partition and returns its :class:`WriteResult`;
    :meth:`describe_target_schema` shows the DDL of a table it creates.
    """

    mode: WriteMode
    key: tuple[str, ...]
    columns: tuple[PipeColumn, ...]
    where: Filter | None
    #: Schema of the target table (for the plan's DDL).
    target_schema: str

    @property
    def target_names(self) -> list[str]:
        return [c.target for c in self.columns]

    def create_table_sql(self, schema: str, table: str) -> list[str]:
        """CREATE TABLE with the source's column types (and the key as primary key), plus Ferry's comments."""
        sql.check_column_names(self.target_names, table)
        parts = []
        for column in self.columns:
            not_null = " NOT NULL" if (column.not_null or column.target in self.key) else ""
            parts.append(f"{sql.quote_ident(column.target)} {column.pg_type}{not_null}")
        if self.key:
            parts.append("PRIMARY KEY (" + ", ".join(sql.quote_ident(k) for k in self.key) + ")")
        name = sql.qualified(schema, table)
        statements = [f"CREATE TABLE {name} (" + ", ".join(parts) + ")"]
        for column in self.columns:
            if column.comment:
                statements.append(
                    f"COMMENT ON COLUMN {name}.{sql.quote_ident(column.target)} IS {sql.render_text_literal(column.comment)}"
                )
        return statements

    def describe_target_schema(self) -> str:
        """The DDL of a target this path creates (shown by ``ferry plan``)."""
        return ";\n".join(self.create_table_sql(self.target_schema, "<target>")) + ";"

    def mismatches(self, target_columns: dict[str, Any]) -> list[str]:
        """Why an existing table cannot take this path's COPY (empty when every type matches exactly)."""
        problems = []
        for column in self.columns:
            found = target_columns.get(column.target)
            if found is None:
                problems.append(f"the target has no column {column.target!r}")
            elif found["type"] != column.pg_type or not found["builtin"]:
                problems.append(
                    f"target column {column.target!r} is {found['type']} and source column {column.source!r} "
                    f"is {column.pg_type}"
                )
        return problems

    async def fetch_columns(self, conn: Any, schema: str, table: str) -> dict[str, dict[str, Any]]:
        """The columns of ``schema.table`` as :meth:`mismatches` compares them."""
        return await fetch_table_columns(conn, schema, table)

    async def copy(
        self, source: "PostgresBackend", target: "PostgresBackend", partition: Partition, dataset: str, ctx: WriteContext
    ) -> WriteResult:
        """Copy one partition (see :func:`copy_partition`)."""
        return await copy_partition(self, source, target, partition, ctx)


# -- planning --------------------------------------------------------------------------------


async def fetch_table_columns(conn: Any, schema: str, table: str) -> dict[str, dict[str, Any]]:
    """Name -> {type, builtin, not_null, comment} of a table's columns ({} when it does not exist)."""
    rows = await conn.fetch(PIPE_CATALOG_SQL, sql.qualified(schema, table))
    return {r["name"]: dict(r) for r in rows}


async def table_columns(backend: "PostgresBackend", dataset: str) -> dict[str, dict[str, Any]]:
    """:func:`fetch_table_columns` of a dataset, on a pooled connection of ``backend``."""
    schema, table = backend._names(dataset)
    async with backend._pool().acquire(timeout=backend.connection_timeout) as conn:
        return await fetch_table_columns(conn, schema, table)


async def plan_copy_pipe(
    source: "PostgresBackend",
    target: "PostgresBackend",
    *,
    source_dataset: str,
    target_dataset: str,
    columns: list[tuple[str, str]],
    where: Filter | None,
    mode: WriteMode,
    key: tuple[str, ...],
    parallel: int,
) -> tuple[CopyPipe | None, str]:
    """Whether the job can stream binary COPY from ``source`` to ``target``: the pipe or None, and why.

    ``columns`` pairs each source column with the name it is written under
    (the job's select, drop and rename steps already applied); ``parallel``
    is the number of partitions that run at once. The caller has checked
    what only the job knows (transforms, ``on_error``, schema policy).
    """
    if source.query:
        return None, "the source is a custom `query`; the fast path copies tables"
    short = _too_few_connections(source, target, mode, parallel)
    if short:
        return None, short
    found = await table_columns(source, source_dataset)
    for name, _ in columns:
        column = found.get(name)
        if column is None or not column["builtin"]:
            kind = column["type"] if column else "unknown"
            return None, (
                f"source column {name!r} has type {kind}, which is not one of PostgreSQL's built-in types "
                "(enums, domains over them and extension types differ between databases)"
            )
    if source.infinite_values == "null" and any(_TEMPORAL.match(found[name]["type"]) for name, _ in columns):
        return None, "the source sets infinite_values: null (infinite dates become nulls), which only the normal path does"
    if where is not None:
        catalog = {n: sql.catalog_column(n, c["type"], False, c["not_null"], c["comment"]) for n, c in found.items()}
        if not sql._exact(where, catalog):
            return None, (
                "part of `where` is evaluated by Ferry, not by PostgreSQL (regex, floats, json or "
                "enum columns, or a column type without exact SQL comparison)"
            )
    pipe = CopyPipe(
        mode=mode,
        key=tuple(key),
        columns=tuple(
            PipeColumn(s, t, found[s]["type"], bool(found[s]["not_null"]), _ferry_comment(found[s]["comment"])) for s, t in columns
        ),
        where=where,
        target_schema=target._names(target_dataset)[0],
    )
    if await target.exists(target_dataset) and await _writes_into_existing(target, target_dataset, mode):
        problems = pipe.mismatches(await table_columns(target, target_dataset))
        if problems:
            return None, "; ".join(problems) + ": binary COPY needs identical column types"
        how = "into the existing table, whose column types match the source's"
    elif mode is WriteMode.REPLACE:
        how = "into a new table with the source's column types, swapped in at publish"
    else:
        how = "into a new table created with the source's column types"
    return pipe, f"taken: each partition streams binary COPY from the source {how} (no decoding)"


async def _writes_into_existing(target: "PostgresBackend", dataset: str, mode: WriteMode) -> bool:
    """Whether the COPY's rows end up in the existing table's columns (not a table this path creates)."""
    if mode is not WriteMode.REPLACE:
        return True
    if target.replace_strategy == "truncate":
        return True
    if target.replace_strategy == "swap":
        return False
    schema, table = target._names(dataset)
    async with target._pool().acquire(timeout=target.connection_timeout) as conn:
        dependents = await conn.fetch(sql.DEPENDENTS_SQL, sql.qualified(schema, table))
    # With dependents, replace runs TRUNCATE + INSERT ... SELECT from the new table into the old one.
    return bool(dependents)


def _too_few_connections(source: "PostgresBackend", target: "PostgresBackend", mode: WriteMode, parallel: int) -> str | None:
    """Why the asyncpg pools cannot serve the fast path without waiting on themselves, or None.

    Each partition in flight holds a source and a target connection at once;
    the source's exported snapshot and a replace run's lock each hold one
    more for the whole run. Source and target with the same settings share
    one pool.
    """
    snapshot = 1 if source.consistent_snapshot else 0
    run_lock = 1 if mode is WriteMode.REPLACE else 0
    if source.config_hash() == target.config_hash():
        needs = [("source and target", source, 2 * parallel + snapshot + run_lock)]
    else:
        needs = [("source", source, parallel + snapshot), ("target", target, parallel + run_lock)]
    for side, backend, needed in needs:
        if needed > backend.max_connections:
            return (
                f"the fast path needs {needed} connections of the {side} pool (one per partition in flight on each "
                f"side, plus one held for the run's snapshot or replace lock) and max_connections is "
                f"{backend.max_connections}; raise max_connections or lower parallel"
            )
    return None


def _ferry_comment(comment: str | None) -> str | None:
    return comment if comment and comment.startswith(sql.ARROW_COMMENT_PREFIX) else None


# -- one partition ---------------------------------------------------------------------------

#: Marks the end of the COPY data in the queue.
_END = object()


async def copy_partition(
    pipe: CopyPipe, source: "PostgresBackend", target: "PostgresBackend", partition: Partition, ctx: WriteContext
) -> WriteResult:
    """Stream one partition from ``source`` into the run's write table on ``target``; idempotent per (run, partition).

    One target transaction holds the ledger check, the COPY (and for upsert
    the merge) and the ledger row. A partition the ledger shows committed is
    skipped (its row count comes from the ledger).
    """
    started = time.perf_counter()
    state = ctx.state.get("postgres")
    if state is None:
        raise ConfigurationError("write without begin_write: call begin_write(dataset, ctx) first")
    schema, table = state["schema"], state["write_table"]
    ledger = sql.qualified(schema, sql.LEDGER_TABLE)
    catalog = [sql.catalog_column(*c) for c in partition.spec["columns"]]
    select = source._read_sql(partition, catalog, [c.source for c in pipe.columns], pipe.where, raw=True)
    snapshot = partition.spec.get("snapshot")
    upsert = ctx.mode is WriteMode.UPSERT
    what = f"copying partition {partition.id} of {partition.dataset!r} to {schema}.{table}"
    try:
        async with target._pool().acquire(timeout=target.connection_timeout) as conn:
            async with conn.transaction():
                done = await conn.fetchval(
                    f"SELECT rows FROM {ledger} WHERE target = $1 AND run_id = $2 AND partition_id = $3 AND job = $4",
                    table,
                    ctx.run_id,
                    partition.id,
                    ctx.job_name,
                )
                if done is not None:
                    return WriteResult(partition.id, rows_written=done, skipped=True)
                into_schema, into_table = schema, table
                if upsert:
                    await conn.execute(
                        f"CREATE TEMPORARY TABLE ferry_stage (LIKE {sql.qualified(schema, table)}) ON COMMIT DROP"
                    )
                    # COPY assigns the identity in arrival order: the merge keeps the last row per key.
                    await conn.execute("ALTER TABLE pg_temp.ferry_stage ADD COLUMN __ferry_seq bigint GENERATED ALWAYS AS IDENTITY")
                    into_schema, into_table = "pg_temp", "ferry_stage"
                rows, nbytes = await _pipe(source, select, snapshot, conn, into_schema, into_table, pipe.target_names, what)
                if upsert:
                    await conn.execute(merge_sql(schema, table, pipe.target_names, {}, ctx.key, upsert=True))
                await conn.execute(
                    f"INSERT INTO {ledger} (job, run_id, partition_id, target, rows) VALUES ($1, $2, $3, $4, $5)",
                    ctx.job_name,
                    ctx.run_id,
                    partition.id,
                    table,
                    rows,
                )
    except FerryError:
        raise
    except Exception as exc:
        raise translate_error(exc, what) from None
    return WriteResult(
        partition.id, rows_written=rows, bytes_written=nbytes, duration_seconds=time.perf_counter() - started
    )


async def _pipe(
    source: "PostgresBackend",
    select: str,
    snapshot: str | None,
    target_conn: Any,
    schema: str,
    table: str,
    columns: list[str],
    what: str,
) -> tuple[int, int]:
    """COPY ``select`` out of the source and into ``schema.table`` on ``target_conn``: (rows, bytes)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
    copied = {"bytes": 0}

    async def produce() -> int:
        async with source._pool().acquire(timeout=source.connection_timeout) as conn:
            # The transaction starts before any other statement on the connection (see the read path).
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                if snapshot:
                    try:
                        await conn.execute(f"SET TRANSACTION SNAPSHOT {sql.render_text_literal(snapshot)}")
                    except Exception as exc:
                        if "snapshot" in str(exc).lower():
                            raise PermanentBackendError(
                                f"{what}: the exported snapshot {snapshot} is gone (the planning connection "
                                "closed); rerun the job, or set consistent_snapshot: false"
                            ) from None
                        raise
                # Pushed-down literals are rendered for COPY, which takes no bind parameters.
                await conn.execute("SET LOCAL standard_conforming_strings = on")
                status = await conn.copy_from_query(select, output=queue.put, format="binary")
        await queue.put(_END)
        return _copied_rows(status)

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            chunk = await queue.get()
            if chunk is _END:
                return
            copied["bytes"] += len(chunk)
            yield chunk

    async def consume() -> int:
        status = await target_conn.copy_to_table(
            table, source=chunks(), columns=columns, schema_name=schema, format="binary"
        )
        return _copied_rows(status)

    rows_out, rows_in = await run_together(produce(), consume())
    if rows_out != rows_in:
        raise PermanentBackendError(f"{what}: the source sent {rows_out} rows but the target took {rows_in}")
    return rows_in, copied["bytes"]


def _copied_rows(status: str) -> int:
    """The row count of a ``COPY n`` command status."""
    match = re.search(r"(\d+)\s*$", status or "")
    if match is None:
        raise PermanentBackendError(f"PostgreSQL answered COPY with {status!r}, not a row count")
    return int(match.group(1))


__all__ = ["CopyPipe", "PipeColumn", "copy_partition", "plan_copy_pipe", "table_columns"]
