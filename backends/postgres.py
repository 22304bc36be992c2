"""The PostgreSQL backend: pooled asyncpg for control, ADBC binary COPY for data.

* Control statements (catalog queries, DDL, the ledger, swaps) run on an
  asyncpg pool served by the pool manager: one pool per configuration and
  event loop, shared by every partition on that loop.
* Bulk data moves as Arrow through the ADBC PostgreSQL driver (binary COPY),
  on pooled synchronous connections used from one worker thread each
  (:mod:`ferry.backends.postgres_copy`).
* Reads: the Arrow schema comes from the catalog; partitions are key ranges
  over the primary key (or ``partition_column``), or ctid page ranges for a
  table without one. By default every partition reads one exported snapshot
  (``pg_export_snapshot()`` held open by the planning connection, ``SET
  TRANSACTION SNAPSHOT`` in each reader); the snapshot id travels in the
  partition spec.
* Writes: append and upsert commit each partition in one transaction together
  with its row in the ``_ferry_ledger`` table, so a retry skips a committed
  partition. Replace loads a new table and swaps it in by rename in one
  transaction at publish (or TRUNCATE + INSERT when views, foreign keys or
  publications depend on the target). Upsert loads a temporary staging table
  and merges it with ``INSERT ... SELECT DISTINCT ON ... ON CONFLICT DO
  UPDATE`` (the last row for a key wins).

This module holds the block (settings, pools, catalog); reading is in
:mod:`ferry.backends.postgres_read`, writing in
:mod:`ferry.backends.postgres_write`, SQL text in
:mod:`ferry.backends.postgres_sql`. See docs/postgres.md.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any, ClassVar, Literal
from urllib.parse import quote as urlquote

import pyarrow as pa
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator

from . import postgres_sql as sql
from .base import Backend, Capabilities
from .errors import ConfigurationError, FerryError, TransientBackendError
from .logos import code_example, docs_url, logo_url
from .pools import pool_manager
from .postgres_copy import AdbcConnectionPool, translate_error
from .postgres_read import PostgresReadMixin
from .postgres_write import PostgresWriteMixin

POOL_KIND = "postgres"
ADBC_POOL_KIND = "postgres-adbc"


class PostgresIndex(BaseModel):
    """An index a target table gets (created with the table, or at publish for replace)."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(..., min_length=1, description="Indexed columns, in order.")
    method: Literal["btree", "gin", "gist", "hash", "brin"] = Field(
        "btree", description="Index access method (gin for jsonb and arrays)."
    )
    unique: bool = Field(False, description="A unique index.")
    where: str | None = Field(None, description="SQL predicate of a partial index (job text, not escaped).")
    name: str | None = Field(None, description="Index name; derived from the table and columns when omitted.")


#: A PostgreSQL run-time parameter name (``log_min_duration_statement``, ``auto_explain.log_min_duration``).
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


class PostgresBackend(PostgresReadMixin, PostgresWriteMixin, Backend):
    """A PostgreSQL database: typed tables, parallel consistent reads, COPY-speed idempotent writes."""

    _block_type_name = "Ferry PostgreSQL"
    _block_type_slug = "ferry-postgres"
    _description = "PostgreSQL tables read and written as Arrow through binary COPY, with pooled connections."
    _logo_url = logo_url("postgres.png")
    _documentation_url = docs_url("postgres.md")
    _code_example = code_example(
        "ferry-postgres", "ferry.backends.postgres", "PostgresBackend", "postgres_block", side="source"
    )

    kind: ClassVar[str] = "postgres"
    capabilities: ClassVar[Capabilities] = Capabilities(pushdown_columns=True, pushdown_filters=True)

    host: str = Field("localhost", description="Server host name or address.")
    port: int = Field(5432, ge=1, le=65535, description="Server port.")
    database: str = Field("postgres", description="Database name.")
    user: str = Field("postgres", description="User name.")
    password: SecretStr | None = Field(None, description="Password (kept secret; never logged).")
    dsn: SecretStr | None = Field(
        None,
        description="A libpq URI (postgresql://user:pass@host:port/db?...); when set it replaces host, port, database, user and password.",
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode for every connection (asyncpg and ADBC)."
    )
    sslrootcert: str | None = Field(None, description="Path of the CA certificate file (verify-ca, verify-full).")
    sslcert: str | None = Field(None, description="Path of the client certificate file.")
    sslkey: str | None = Field(None, description="Path of the client private key file.")
    schema_name: str = Field(
        "public",
        validation_alias=AliasChoices("schema", "schema_name"),
        description="Schema of the tables (a dataset `other.table` names another schema).",
    )
    min_connections: int = Field(
        1,
        validation_alias=AliasChoices("min_connections", "min_size"),
        description="Connections the asyncpg pool keeps open (alias min_size).",
    )
    max_connections: int = Field(
        10,
        validation_alias=AliasChoices("max_connections", "max_size"),
        description="Most connections of each pool: asyncpg per event loop, ADBC per process (alias max_size).",
    )
    connection_timeout: float = Field(
        60.0,
        validation_alias=AliasChoices("connection_timeout", "timeout"),
        description="Seconds to wait for a new connection or a free pooled one (alias timeout).",
    )
    command_timeout: float | None = Field(
        None, description="Seconds a statement may run before it is cancelled (none: no limit)."
    )
    max_queries: int = Field(50_000, description="Queries after which an asyncpg pool connection is replaced.")
    max_inactive_connection_lifetime: float = Field(
        300.0, description="Seconds an idle asyncpg pool connection is kept (0: forever)."
    )
    query: str | None = Field(
        None, description="A custom SELECT to read instead of the dataset table (read as one partition)."
    )
    partition_column: str | None = Field(
        None, description="Integer, date or timestamp column to split reads by (default: a one-column primary key)."
    )
    partition_rows: int = Field(1_000_000, ge=1, description="Largest estimated number of rows in one read partition.")
    consistent_snapshot: bool = Field(
        True, description="All partitions of a read see one exported snapshot (no missing or doubled rows)."
    )
    replace_strategy: Literal["auto", "swap", "truncate"] = Field(
        "auto",
        description="replace: swap a new table in by rename, or TRUNCATE and copy in one transaction; auto picks truncate when views, foreign keys or publications depend on the target.",
    )
    indexes: list[PostgresIndex] = Field(
        default_factory=list,
        description="Indexes a target table gets besides the key's primary key (btree, GIN on jsonb, partial).",
    )
    infinite_values: Literal["fail", "null"] = Field(
        "fail", description="Reading 'infinity' dates and timestamps: fail with the column named, or read them as null."
    )
    application_name: str = Field("ferry", description="application_name of Ferry's sessions.")
    session_settings: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "PostgreSQL settings for Ferry's own sessions, e.g. {log_min_duration_statement: 250ms, "
            "log_statement: ddl} to profile them; superuser-only settings need a superuser or "
            "GRANT SET ON PARAMETER (PostgreSQL 15)."
        ),
    )

    @model_validator(mode="after")
    def _check_pool(self) -> "PostgresBackend":
        if self.min_connections < 0:
            raise ValueError(f"min_connections (min_size) cannot be negative, got {self.min_connections}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections (max_size) must be at least 1, got {self.max_connections}")
        if self.min_connections > self.max_connections:
            raise ValueError(
                f"min_connections ({self.min_connections}) is above max_connections ({self.max_connections}); "
                "lower min_connections or raise max_connections"
            )
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be at least 1, got {self.max_queries}")
        if self.max_inactive_connection_lifetime < 0:
            raise ValueError(
                f"max_inactive_connection_lifetime cannot be negative, got {self.max_inactive_connection_lifetime}"
            )
        if self.connection_timeout <= 0:
            raise ValueError(f"connection_timeout (timeout) must be positive, got {self.connection_timeout}")
        if self.command_timeout is not None and self.command_timeout <= 0:
            raise ValueError(f"command_timeout must be positive, got {self.command_timeout}")
        for name in self.session_settings:
            if not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"session_settings: {name!r} is not a PostgreSQL setting name")
            if name.lower() in ("application_name", "timezone"):
                raise ValueError(f"session_settings: {name} is set by Ferry (use application_name for the name)")
        return self

    # -- description -------------------------------------------------------------------------
    def _endpoint(self) -> str:
        if self.dsn is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(self.dsn.get_secret_value())
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def describe(self) -> str:
        source = " (custom query)" if self.query else ""
        return f"postgres {self._endpoint()} schema {self.schema_name}{source}"

    def location(self, dataset: str) -> str:
        schema, table = sql.split_dataset(dataset, self.schema_name)
        return f"postgres://{self._endpoint()}/{schema}.{table}"

    def describe_target_schema(self, schema: pa.Schema) -> str:
        try:
            return ";\n".join(sql.create_table_sql(self.schema_name, "<target>", schema, ())) + ";"
        except ConfigurationError as exc:
            return f"(no table can be created: {exc})"

    # -- connections ---------------------------------------------------------------------------
    def connection_uri(self) -> str:
        """The libpq URI every connection uses (with secrets: never log it)."""
        if self.dsn is not None:
            uri = self.dsn.get_secret_value()
        else:
            password = f":{urlquote(self.password.get_secret_value(), safe='')}" if self.password else ""
            uri = (
                f"postgresql://{urlquote(self.user, safe='')}{password}@{self.host}:{self.port}/"
                f"{urlquote(self.database, safe='')}"
            )
        params = {"sslmode": self.sslmode, "sslrootcert": self.sslrootcert, "sslcert": self.sslcert, "sslkey": self.sslkey}
        extra = [f"{k}={urlquote(str(v), safe='')}" for k, v in params.items() if v is not None and f"{k}=" not in uri]
        if extra:
            uri += ("&" if "?" in uri else "?") + "&".join(extra)
        return uri

    def _adbc_uri(self) -> str:
        uri = self.connection_uri()
        extra = [f"connect_timeout={max(1, math.ceil(self.connection_timeout))}", f"application_name={urlquote(self.application_name, safe='')}"]
        return uri + ("&" if "?" in uri else "?") + "&".join(extra)

    def _adbc_setup(self) -> list[str]:
        # Filter literals are rendered for COPY (which takes no bind parameters):
        # standard_conforming_strings makes '' the only escape.
        setup = ["SET standard_conforming_strings = on", "SET TIME ZONE 'UTC'"]
        setup += [
            f"SELECT set_config({sql.render_text_literal(name)}, {sql.render_text_literal(value)}, false)"
            for name, value in self.session_settings.items()
        ]
        if self.command_timeout is not None:
            setup.append(f"SET statement_timeout = {int(self.command_timeout * 1000)}")
        return setup

    def _pool_limits(self) -> dict[str, Any]:
        return {
            "min_size": self.min_connections,
            "max_size": self.max_connections,
            "timeout": self.connection_timeout,
            "command_timeout": self.command_timeout,
            "max_queries": self.max_queries,
            "max_inactive_connection_lifetime": self.max_inactive_connection_lifetime,
        }

    async def _create_pool(self) -> Any:
        import asyncpg

        try:
            return await asyncpg.create_pool(
                dsn=self.connection_uri(),
                min_size=self.min_connections,
                max_size=self.max_connections,
                timeout=self.connection_timeout,
                command_timeout=self.command_timeout,
                max_queries=self.max_queries,
                max_inactive_connection_lifetime=self.max_inactive_connection_lifetime,
                server_settings={**self.session_settings, "application_name": self.application_name, "TimeZone": "UTC"},
            )
        except Exception as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: BaseException) -> FerryError:
        state = getattr(exc, "sqlstate", None) or ""
        where = self._endpoint()
        if state.startswith("28"):
            return ConfigurationError(f"PostgreSQL at {where} refused the login ({exc}); check user and password")
        if state == "3D000":
            return ConfigurationError(f"PostgreSQL at {where}: {exc}; check `database`")
        if state in ("42501", "42704", "22023") and self.session_settings:
            # Raised while the session applies session_settings (permission denied to set a
            # superuser-only parameter, an unknown parameter, or a value it does not take).
            return ConfigurationError(
                f"PostgreSQL at {where} refused session_settings ({exc}); remove the setting, fix its value, "
                f"or let the role set it (GRANT SET ON PARAMETER <name> TO {self.user})",
                path="session_settings",
            )
        return TransientBackendError(
            f"cannot connect to PostgreSQL at {where} ({type(exc).__name__}: {exc}); "
            "check host, port and sslmode, and that the server is running"
        )

    async def open(self) -> None:
        if "pool" in self._live:
            return
        key = self.config_hash()
        pool = await pool_manager.acquire(
            POOL_KIND,
            key,
            self._create_pool,
            closer=lambda p: p.close(),
            stats=_asyncpg_stats,
            limits=self._pool_limits(),
        )
        self._live["pool"] = pool
        try:
            adbc = await pool_manager.acquire(
                ADBC_POOL_KIND,
                key,
                lambda: AdbcConnectionPool(
                    self._adbc_uri(),
                    max_size=self.max_connections,
                    timeout=self.connection_timeout,
                    setup=self._adbc_setup(),
                ),
                closer=lambda p: p.close(),
                stats=lambda p: p.stats(),
                limits={"max_size": self.max_connections, "timeout": self.connection_timeout},
                per_loop=False,
            )
            self._live["adbc"] = adbc
            if self.min_connections == 0:
                async with pool.acquire(timeout=self.connection_timeout) as conn:
                    await conn.execute("SELECT 1")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for conn, transaction in self._live.pop("snapshot_holders", {}).values():
            await self._end_snapshot(conn, transaction)
        await self.release_run_locks()  # a replace run's lock on its new table (postgres_write)
        key = self.config_hash()
        if self._live.pop("adbc", None) is not None:
            await pool_manager.release(ADBC_POOL_KIND, key, per_loop=False)
        if self._live.pop("pool", None) is not None:
            await pool_manager.release(POOL_KIND, key)

    async def _end_snapshot(self, conn: Any, transaction: Any) -> None:
        """End an exporting transaction and give its connection back (shielded from cancellation)."""
        pool = self._live.get("pool")
        try:
            await asyncio.shield(transaction.rollback())
        except Exception:
            pass
        if pool is not None:
            try:
                await asyncio.shield(pool.release(conn))
            except Exception:
                pass

    def _pool(self) -> Any:
        pool = self._live.get("pool")
        if pool is None:
            raise RuntimeError("the PostgreSQL backend is not open: use `async with backend:`")
        return pool

    def _adbc(self) -> AdbcConnectionPool:
        adbc = self._live.get("adbc")
        if adbc is None:
            raise RuntimeError("the PostgreSQL backend is not open: use `async with backend:`")
        return adbc

    # -- catalog ---------------------------------------------------------------------------------
    def _names(self, dataset: str) -> tuple[str, str]:
        schema, table = sql.split_dataset(dataset, self.schema_name)
        sql.quote_ident(schema)
        sql.quote_ident(table)
        return schema, table

    async def _catalog(self, dataset: str) -> list[sql.CatalogColumn]:
        try:
            async with self._pool().acquire(timeout=self.connection_timeout) as conn:
                if self.query:
                    return await self._query_catalog(conn)
                schema, table = self._names(dataset)
                rows = await conn.fetch(sql.CATALOG_COLUMNS_SQL, sql.qualified(schema, table))
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"reading the catalog of {dataset!r}") from None
        if not rows:
            raise ConfigurationError(f"table {schema}.{table} does not exist (or has no columns); check `dataset` and `schema`")
        return [sql.catalog_column(r["name"], r["type"], r["is_enum"], r["not_null"], r["comment"]) for r in rows]

    async def _query_catalog(self, conn: Any) -> list[sql.CatalogColumn]:
        # A temporary view gives the query's columns with their type modifiers (numeric(p,s)).
        transaction = conn.transaction()
        await transaction.start()
        try:
            try:
                await conn.execute(f"CREATE TEMPORARY VIEW ferry_query_columns AS {self.query}")
            except Exception as exc:
                raise ConfigurationError(f"the custom `query` is not a valid SELECT: {exc}", path="query") from None
            rows = await conn.fetch(sql.CATALOG_COLUMNS_SQL, "pg_temp.ferry_query_columns")
        finally:
            await transaction.rollback()
        return [sql.catalog_column(r["name"], r["type"], r["is_enum"], r["not_null"], r["comment"]) for r in rows]

    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        catalog = await self._catalog(dataset)
        schema = pa.schema([c.field for c in catalog])
        if columns is None:
            return schema
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ConfigurationError(
                f"{dataset!r} has no column(s) {', '.join(map(repr, missing))}; available: {', '.join(schema.names)}",
                path="source.columns",
            )
        return pa.schema([schema.field(c) for c in columns])

    async def exists(self, dataset: str) -> bool:
        if self.query:
            return True
        schema, table = self._names(dataset)
        async with self._pool().acquire(timeout=self.connection_timeout) as conn:
            return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", sql.qualified(schema, table))

# -- helpers ---------------------------------------------------------------------------------------


def _asyncpg_stats(pool: Any) -> dict[str, Any]:
    size = pool.get_size()
    idle = pool.get_idle_size()
    return {"size": size, "idle": idle, "in_use": size - idle}


__all__ = ["PostgresBackend"]
