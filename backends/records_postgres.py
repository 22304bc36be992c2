"""The PostgreSQL record store: the guide's document layout, batch writes by COPY, pushdown, cursors.

* Layout (created on first use, idempotently, under an advisory lock): one
  table (``table``, default ``records``) with ``id text COLLATE "C" PRIMARY
  KEY``, ``data jsonb`` (the fields), ``metadata jsonb``, ``created_at``,
  ``updated_at``; a GIN index on ``data`` and a btree on ``created_at``.
* Connections: the migration backend's settings and pool. The config is a
  :class:`~ferry.backends.postgres.PostgresBackend` (a dict of its fields, a
  saved block, or a settings file's ``databases.postgres`` section); the
  asyncpg pool comes from the pool manager under the block's kind and
  configuration hash, one per configuration and event loop, so a store and a
  migration with the same settings share it.
* Batches take a constant number of round trips whatever their size: small
  batches one statement over ``unnest`` arrays; large ones one ``COPY``
  straight into the table, fed while the records are encoded, and only when
  an id exists already a ``COPY`` into a temporary staging table and one
  ``INSERT ... SELECT ... ON CONFLICT``; reads ``id = ANY($1)``. Results come back in input order with per-record
  errors (an existing id, a value jsonb cannot hold).
* Queries push down what PostgreSQL answers exactly
  (:mod:`ferry.backends.records_postgres_sql`) with bound parameters
  (asyncpg prepares and caches each statement shape per connection); the rest
  is evaluated by the reference evaluator on the rows as they stream from a
  server-side cursor, ``batch_size`` rows per fetch.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, ClassVar, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import records_postgres_sql as rsql
from .errors import ConfigurationError, FerryError
from .pools import pool_manager
from .postgres import POOL_KIND, PostgresBackend, _asyncpg_stats
from .postgres_copy import translate_error
from .postgres_sql import quote_ident
from .records import AsyncDatabase, coerce_ids
from .records_model import BatchResult, Record, RecordError, batch_item, normalize_id
from .records_query import Query
from .records_reference import PageWindow, compile_filter, ordered_batches, project, split_filter

__all__ = ["PostgresRecordStore", "RecordIndex", "PostgresRecordSettings"]

#: Batches up to this many records are one ``unnest`` statement; larger ones go through COPY.
COPY_THRESHOLD = 2_000
STAGE_TABLE = "ferry_records_stage"
#: ``_copy_in``'s answer when every row was inserted.
ALL = object()


class RecordIndex(BaseModel):
    """An index ``ensure_indexes()`` adds to the record table."""

    model_config = ConfigDict(extra="forbid")

    fields: list[str] = Field(default_factory=list, description="Record fields indexed as ``data -> 'field'``, in order.")
    expression: str | None = Field(
        None, description="A SQL index expression instead of fields, e.g. ``(data ->> 'status')`` (settings text, not escaped)."
    )
    method: Literal["btree", "gin", "hash", "brin"] = Field("btree", description="Index access method.")
    unique: bool = Field(False, description="A unique index.")
    where: str | None = Field(
        None, description="Predicate of a partial index, e.g. ``data ->> 'status' = 'active'`` (settings text, not escaped)."
    )
    name: str | None = Field(None, description="Index name; derived from the table and fields when omitted.")

    @model_validator(mode="after")
    def _one_target(self) -> "RecordIndex":
        if bool(self.fields) == bool(self.expression):
            raise ValueError("an index takes either `fields` (a list of record fields) or `expression`, not both or neither")
        return self


class PostgresRecordSettings(BaseModel):
    """Record-store settings besides the connection (which is a PostgresBackend's)."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field("records", description="Table holding the records (in the connection's `schema`).")
    indexes: list[RecordIndex] = Field(
        default_factory=list, description="Indexes ensure_indexes() adds besides the layout's GIN and created_at ones."
    )


_RECORD_KEYS = set(PostgresRecordSettings.model_fields)


def _allowed_keys() -> set[str]:
    """Connection fields of PostgresBackend (and their aliases), the record settings, and ``pool``."""
    keys = {*_RECORD_KEYS, "pool"}
    for name, info in PostgresBackend.model_fields.items():
        keys.add(name)
        alias = info.validation_alias
        keys.update(getattr(alias, "choices", ()) or ())
    return keys


def _split_config(config: Any) -> tuple[PostgresBackend, PostgresRecordSettings]:
    """The connection block and the record settings of a dict, a block or a settings-file section."""
    if isinstance(config, PostgresBackend):
        return config.fresh(), PostgresRecordSettings()
    if isinstance(config, BaseModel):
        config = config.model_dump(exclude_none=True)
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            "postgres store settings are a mapping such as {'host': 'localhost', 'database': 'test'}, a saved "
            f"PostgresBackend block, or a databases.postgres section; got {type(config).__name__}",
            path="config",
        )
    unknown = sorted(set(config) - _allowed_keys())
    if unknown:
        raise ConfigurationError(
            f"invalid postgres store settings: unknown key(s) {', '.join(map(str, unknown))}; "
            f"accepted: {', '.join(sorted(_allowed_keys()))}",
            path="config",
        )
    connection = {k: v for k, v in config.items() if k not in _RECORD_KEYS and k != "pool"}
    pool = config.get("pool") or {}
    if not isinstance(pool, Mapping):
        raise ConfigurationError("`pool` is a mapping such as {'min_size': 5, 'max_size': 15}", path="config.pool")
    # The settings files' `pool:` section (min_size, max_size, timeout, ...) sets the same pool fields.
    connection.update({k: v for k, v in pool.items() if v is not None})
    try:
        record_settings = PostgresRecordSettings.model_validate({k: v for k, v in config.items() if k in _RECORD_KEYS})
        backend = PostgresBackend.model_validate(connection)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid postgres store settings: {problems}", path="config") from None
    quote_ident(record_settings.table)
    return backend, record_settings


class PostgresRecordStore(AsyncDatabase):
    """Records in one PostgreSQL table of the guide's document layout (see the module docstring)."""

    backend: ClassVar[str] = "postgres"

    def __init__(self, connection: PostgresBackend, settings: PostgresRecordSettings) -> None:
        self.connection = connection
        self.settings = settings
        self.schema = connection.schema_name
        self.table = settings.table
        self.target = f"{quote_ident(self.schema)}.{quote_ident(self.table)}"
        self._key = connection.config_hash()
        self._pool: Any = None

    @classmethod
    async def open(cls, config: Any) -> "PostgresRecordStore":
        """Connect (through the pool manager) and create the layout if it is missing."""
        connection, settings = _split_config(config)
        store = cls(connection, settings)
        store._pool = await pool_manager.acquire(
            POOL_KIND,
            store._key,
            connection._create_pool,
            closer=lambda p: p.close(),
            stats=_asyncpg_stats,
            limits=connection._pool_limits(),
        )
        try:
            await store._create_layout()
        except BaseException:
            await store.close()
            raise
        return store

    async def _create_layout(self) -> None:
        async with self._acquire() as conn:
            async with conn.transaction():
                # Two stores opening at once must not race on CREATE TABLE IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"ferry-records:{self.target}")
                for statement in rsql.layout_sql(self.schema, self.table):
                    await conn.execute(statement)

    def _acquire(self) -> Any:
        if self._pool is None:
            raise ConfigurationError("this record store is closed; open a new one with AsyncDatabase.create")
        return self._pool.acquire(timeout=self.connection.connection_timeout)

    async def close(self) -> None:
        """Give the pool back to the pool manager (the last user closes it)."""
        if self._pool is not None:
            self._pool = None
            await pool_manager.release(POOL_KIND, self._key)

    def _error(self, exc: BaseException, what: str) -> FerryError:
        return translate_error(exc, f"{what} in {self.schema}.{self.table}")

    # -- writes ------------------------------------------------------------------------

    async def create_batch(self, records: Iterable[Record]) -> BatchResult:
        items = records if isinstance(records, list) else list(records)
        ids: list[str | None] = [None] * len(items)
        errors: list[RecordError] = []
        rows: list[tuple[int, str, str, str | None]] = []  # (index, id, data, metadata) to insert
        seen: set[str] = set()
        pending = iter(enumerate(items))

        def take(index: int, item: Any) -> tuple[int, str, str, str | None] | None:
            prepared = _prepare_one(index, item, pairs=False)
            if isinstance(prepared, RecordError):
                errors.append(prepared)
                return None
            _, record_id, data, metadata = prepared
            if record_id is None:
                record_id = uuid.uuid4().hex
            elif record_id in seen:
                errors.append(
                    RecordError(index, f"a record with id {record_id!r} already exists (earlier in this batch)", record_id)
                )
                return None
            seen.add(record_id)
            row = (index, record_id, data, metadata)
            rows.append(row)
            return row

        async def copy_source() -> AsyncIterator[tuple[str, str, str | None]]:
            # Records are encoded while COPY sends the previous ones: the server works meanwhile.
            for index, item in pending:
                row = take(index, item)
                if row is not None:
                    yield row[1:]

        try:
            if len(items) > COPY_THRESHOLD:
                inserted = await self._copy_in(copy_source())
                if inserted is None:  # an id exists already: the COPY left nothing behind
                    for index, item in pending:  # what COPY had not read yet
                        take(index, item)
                    inserted = await self._insert(rows)
            else:
                for index, item in pending:
                    take(index, item)
                inserted = await self._insert(rows) if rows else set()
        except FerryError:
            raise
        except Exception as exc:
            raise self._error(exc, "writing records") from None
        for index, record_id, _data, _metadata in rows:
            if inserted is ALL or record_id in inserted:
                ids[index] = record_id
            else:
                errors.append(RecordError(index, f"a record with id {record_id!r} already exists", record_id))
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def _copy_in(self, source: AsyncIterator[tuple[str, str, str | None]]) -> Any:
        """COPY rows straight into the table: ``ALL`` when every row went in, None when an id existed.

        The ids of a batch are unique already, so this COPY only fails on an
        id that is stored; COPY is atomic, so nothing of the batch is left then.
        """
        import asyncpg

        async with self._acquire() as conn:
            try:
                await conn.copy_records_to_table(
                    self.table, schema_name=self.schema, records=source, columns=["id", "data", "metadata"]
                )
            except asyncpg.UniqueViolationError:
                return None
        return ALL

    async def _insert(self, rows: list[tuple[int, str, str, str | None]]) -> set[str]:
        """Insert rows, leaving existing ids alone; returns the ids inserted. A constant number of round trips.

        Up to ``COPY_THRESHOLD`` rows: one ``INSERT ... SELECT FROM unnest(...)
        ON CONFLICT DO NOTHING RETURNING id``. More: ``COPY`` into a temporary
        staging table and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING
        RETURNING id``.
        """
        async with self._acquire() as conn:
            if len(rows) <= COPY_THRESHOLD:
                found = await conn.fetch(
                    f"INSERT INTO {self.target} (id, data, metadata) "
                    "SELECT * FROM unnest($1::text[], $2::jsonb[], $3::jsonb[]) "
                    "ON CONFLICT (id) DO NOTHING RETURNING id",
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                    [r[3] for r in rows],
                )
                return {r[0] for r in found}
            async with conn.transaction():
                await conn.execute(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_TABLE} "
                    "(id text, data jsonb, metadata jsonb) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table(
                    STAGE_TABLE, records=[r[1:] for r in rows], columns=["id", "data", "metadata"]
                )
                found = await conn.fetch(
                    f"INSERT INTO {self.target} (id, data, metadata) SELECT id, data, metadata FROM {STAGE_TABLE} "
                    "ON CONFLICT (id) DO NOTHING RETURNING id"
                )
            return {r[0] for r in found}

    async def update_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return await self._replace(items, insert=False)

    async def upsert_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return await self._replace(items, insert=True)

    async def _replace(self, items: Iterable[Any], *, insert: bool) -> BatchResult:
        prepared, ids, errors = _prepare(items, pairs=True)
        latest: dict[str, tuple[str, str | None]] = {}  # the last write of an id in the batch wins
        targets: list[tuple[int, str]] = []
        for index, record_id, data, metadata in prepared:
            if record_id is None:
                if not insert:
                    errors.append(RecordError(index, "an update needs the record's id: pass (id, record)"))
                    continue
                record_id = uuid.uuid4().hex
            latest[record_id] = (data, metadata)
            targets.append((index, record_id))
        if latest:
            keys = list(latest)
            arrays = ([k for k in keys], [latest[k][0] for k in keys], [latest[k][1] for k in keys])
            if insert:
                statement = (
                    f"INSERT INTO {self.target} AS t (id, data, metadata) "
                    "SELECT * FROM unnest($1::text[], $2::jsonb[], $3::jsonb[]) "
                    "ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, metadata = EXCLUDED.metadata, "
                    "updated_at = now() RETURNING t.id"
                )
            else:
                statement = (
                    f"UPDATE {self.target} AS t SET data = u.data, metadata = u.metadata, updated_at = now() "
                    "FROM unnest($1::text[], $2::jsonb[], $3::jsonb[]) AS u(id, data, metadata) "
                    "WHERE t.id = u.id RETURNING t.id"
                )
            try:
                async with self._acquire() as conn:
                    done = {r[0] for r in await conn.fetch(statement, *arrays)}
            except Exception as exc:
                raise self._error(exc, "updating records" if not insert else "upserting records") from None
            for index, record_id in targets:
                if record_id in done:
                    ids[index] = record_id
                else:
                    errors.append(RecordError(index, f"no record with id {record_id!r} to update", record_id))
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def delete_batch(self, ids: Iterable[str | int]) -> list[bool]:
        keys = coerce_ids(ids)
        if not keys:
            return []
        try:
            async with self._acquire() as conn:
                deleted = {
                    r[0] for r in await conn.fetch(f"DELETE FROM {self.target} WHERE id = ANY($1::text[]) RETURNING id", list(set(keys)))
                }
        except Exception as exc:
            raise self._error(exc, "deleting records") from None
        result = []
        for key in keys:  # a repeated id was deleted once: True the first time only
            result.append(key in deleted)
            deleted.discard(key)
        return result

    async def clear(self) -> None:
        try:
            async with self._acquire() as conn:
                await conn.execute(f"TRUNCATE {self.target}")
        except Exception as exc:
            raise self._error(exc, "clearing records") from None

    # -- reads -------------------------------------------------------------------------

    async def read_batch(self, ids: Iterable[str | int]) -> list[Record | None]:
        keys = coerce_ids(ids)
        if not keys:
            return []
        try:
            async with self._acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT id, data::text, metadata::text FROM {self.target} WHERE id = ANY($1::text[])", list(set(keys))
                )
        except Exception as exc:
            raise self._error(exc, "reading records") from None
        found = {row[0]: row for row in rows}
        # One Record per position: a repeated id gives independent copies.
        return [None if (row := found.get(key)) is None else _record(row[0], row[1], row[2]) for key in keys]

    async def exists(self, id: str | int) -> bool:
        key = normalize_id(id)
        async with self._acquire() as conn:
            return await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {self.target} WHERE id = $1)", key)

    async def count(self, query: Query | None = None) -> int:
        query = query or Query()
        compile_filter(query.filter_spec)  # refuses a bad regex before any SQL runs
        pushed, residual = split_filter(query.filter_spec, rsql.can_push)
        if residual is not None:
            total = 0
            async for batch in self._read_batches(query, 10_000):
                total += len(batch)
            return total
        params = rsql.Params()
        where = f" WHERE {rsql.filter_sql(pushed, params)}" if pushed is not None else ""
        if query.offset_value or query.limit_value is not None:
            page = _page_sql(query, params)
            statement = f"SELECT count(*) FROM (SELECT 1 FROM {self.target}{where}{page}) AS page"
        else:
            statement = f"SELECT count(*) FROM {self.target}{where}"
        try:
            async with self._acquire() as conn:
                return await conn.fetchval(statement, *params.values)
        except Exception as exc:
            raise self._error(exc, "counting records") from None

    async def _read_batches(self, query: Query, batch_size: int) -> AsyncIterator[list[Record]]:
        compile_filter(query.filter_spec)  # refuses a bad regex before any SQL runs
        pushed, residual = split_filter(query.filter_spec, rsql.can_push)
        keep = compile_filter(residual) if residual is not None else None
        select = query.select_fields
        offset, limit = query.offset_value, query.limit_value
        if limit == 0:
            return
        async with self._acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                if query.sort_keys and await self._sorts_other_kinds(conn, query, pushed):
                    async for batch in self._sorted_in_process(conn, query, pushed, keep, batch_size):
                        yield batch
                    return
                params = rsql.Params()
                exact = keep is None
                columns = "id, data::text, metadata::text"
                if exact and select is not None:
                    columns = f"id, ({rsql.projection_sql(select, params)})::text, metadata::text"
                statement = f"SELECT {columns} FROM {self.target}"
                if pushed is not None:
                    statement += f" WHERE {rsql.filter_sql(pushed, params)}"
                statement += f" ORDER BY {rsql.order_sql(query.sort_keys, params)}"
                if exact:
                    statement += _page_sql(query, params)
                try:
                    cursor = await conn.cursor(statement, *params.values)
                except Exception as exc:
                    raise self._error(exc, "searching records") from None
                window = PageWindow(offset, limit, batch_size)
                while True:
                    try:
                        rows = await cursor.fetch(batch_size)
                    except Exception as exc:
                        raise self._error(exc, "searching records") from None
                    if not rows:
                        break
                    if exact:
                        yield [_record(r[0], r[1], r[2]) for r in rows]
                        continue
                    for row in rows:
                        record = _record(row[0], row[1], row[2])
                        if not keep(record.fields):
                            continue
                        if window.skips():
                            continue
                        if select is not None:
                            record.fields = project(record.fields, select)
                        batch = window.add(record)
                        if batch:
                            yield batch
                        if window.full:
                            break
                    if window.full:
                        break
                batch = window.rest()
                if batch:
                    yield batch

    async def _sorts_other_kinds(self, conn: Any, query: Query, pushed: Any) -> bool:
        """Whether a matching row holds, in a sort field, what only the reference orders (see other_kind_sql)."""
        params = rsql.Params()
        condition = rsql.other_kind_sql(query.sort_keys, params)
        if pushed is not None:
            condition += f" AND {rsql.filter_sql(pushed, params)}"
        return await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {self.target} WHERE {condition})", *params.values)

    async def _sorted_in_process(
        self, conn: Any, query: Query, pushed: Any, keep: Any, batch_size: int
    ) -> AsyncIterator[list[Record]]:
        """Sort on lists, dicts or huge numbers: the matches (filtered while streaming) are ordered by the reference."""
        params = rsql.Params()
        statement = f"SELECT id, data::text, metadata::text FROM {self.target}"
        if pushed is not None:
            statement += f" WHERE {rsql.filter_sql(pushed, params)}"
        cursor = await conn.cursor(statement, *params.values)
        matches: dict[str, Record] = {}
        while rows := await cursor.fetch(max(batch_size, 1000)):
            for row in rows:
                record = _record(row[0], row[1], row[2])
                if keep is None or keep(record.fields):
                    matches[record.id] = record
        for batch in ordered_batches(matches, query, batch_size):
            yield batch

    # -- the guide's SQL helpers and indexes -------------------------------------------------

    async def execute_query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Run a query with bound ``$n`` arguments (prepared and cached); rows as dicts.

        The store's schema comes first on the search path, so the guide's
        ``SELECT * FROM records WHERE data->>'status' = $1`` reads this store's
        table. jsonb columns come back as JSON text (asyncpg's default).
        """
        try:
            async with self._acquire() as conn:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {quote_ident(self.schema)}, public")
                    return [dict(row) for row in await conn.fetch(sql, *args)]
        except Exception as exc:
            raise self._error(exc, "running execute_query") from None

    async def execute(self, sql: str, *args: Any) -> str:
        """Run a statement (DDL such as the guide's CREATE INDEX); returns its status, e.g. ``CREATE INDEX``."""
        try:
            async with self._acquire() as conn:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {quote_ident(self.schema)}, public")
                    return await conn.execute(sql, *args)
        except Exception as exc:
            raise self._error(exc, "running execute") from None

    async def ensure_indexes(self) -> list[str]:
        """Create the layout's indexes and every declared one that is missing; returns their names."""
        names = [rsql.index_name(self.table, "data_gin"), rsql.index_name(self.table, "created_at")]
        statements = []
        for index in self.settings.indexes:
            if index.fields:
                expressions = ", ".join(f"(data -> {rsql.text_literal(field)})" for field in index.fields)
                suffix = "_".join(index.fields)
            else:
                expression = index.expression.strip()
                expressions = expression if expression.startswith("(") else f"({expression})"
                suffix = "expr"
            name = index.name or rsql.index_name(self.table, f"{suffix}_{index.method}" + ("_partial" if index.where else ""))
            unique = "UNIQUE " if index.unique else ""
            where = f" WHERE {index.where}" if index.where else ""
            statements.append(
                f"CREATE {unique}INDEX IF NOT EXISTS {quote_ident(name)} ON {self.target} USING {index.method} ({expressions}){where}"
            )
            names.append(name)
        try:
            async with self._acquire() as conn:
                async with conn.transaction():
                    for statement in rsql.layout_sql(self.schema, self.table)[1:] + statements:
                        await conn.execute(statement)
        except Exception as exc:
            raise self._error(exc, "creating indexes") from None
        return names

    # -- pools -----------------------------------------------------------------------------------

    def get_pool_info(self) -> dict[str, dict[str, Any]]:
        """The pool manager's report on every open pool (this store's pool among them)."""
        return pool_manager.get_pool_info()

    def get_pool_count(self) -> int:
        """Number of open pools in this process."""
        return pool_manager.get_pool_count()


def _page_sql(query: Query, params: rsql.Params) -> str:
    """OFFSET / LIMIT as bound parameters."""
    text = ""
    if query.offset_value:
        text += f" OFFSET {params.add(query.offset_value, 'bigint')}"
    if query.limit_value is not None:
        text += f" LIMIT {params.add(query.limit_value, 'bigint')}"
    return text


def _record(record_id: str, data: str | None, metadata: str | None) -> Record:
    record = Record.__new__(Record)
    record.id = record_id
    record.fields = rsql.decode_fields(data)
    record.metadata = rsql.decode_fields(metadata) if metadata else {}
    return record


Prepared = tuple[int, "str | None", str, "str | None"]


def _prepare_one(index: int, item: Any, *, pairs: bool) -> Prepared | RecordError:
    """``(index, id or None, data JSON, metadata JSON)`` of one item, or why it cannot be stored."""
    try:
        record_id, record = batch_item(item, pairs=pairs)
        data = rsql.encode_fields(record.fields)
        metadata = rsql.encode_fields(record.metadata) if record.metadata else None
        return (index, record_id, data, metadata)
    except ConfigurationError as exc:
        return RecordError(index, exc.message, None)
    except (TypeError, ValueError) as exc:
        return RecordError(index, f"this record cannot be stored: {exc}", _safe_id(item))


def _prepare(items: Iterable[Any], *, pairs: bool) -> tuple[list[Prepared], list[Any], list[RecordError]]:
    """The prepared good items; ids (all None, one per item) and the errors of the bad ones."""
    prepared: list[Prepared] = []
    errors: list[RecordError] = []
    count = 0
    for index, item in enumerate(items):
        count += 1
        result = _prepare_one(index, item, pairs=pairs)
        if isinstance(result, RecordError):
            errors.append(result)
        else:
            prepared.append(result)
    return prepared, [None] * count, errors


def _safe_id(item: Any) -> str | None:
    try:
        return item.storage_id() if isinstance(item, Record) else None
    except Exception:
        return None

