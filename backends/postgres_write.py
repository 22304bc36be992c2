"""Writing to PostgreSQL: table creation, per-partition transactions with the ledger, replace swaps.

:class:`PostgresWriteMixin` gives the backend block ``begin_write`` (schema,
ledger and target or new table), ``write``, ``publish`` (the rename swap, or
TRUNCATE + INSERT when views, foreign keys or publications depend on the
target) and ``abort``. :class:`PartitionWriter` runs in a worker thread. It pulls batches from the
pipeline's async stream (through the event loop), adapts them for binary COPY
and hands them to ``adbc_ingest``; the partition's rows and its ledger row
commit together, so a retry after a lost acknowledgement finds the ledger row
and skips. Upsert loads a temporary staging table and merges it with
``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT (key) DO UPDATE`` (the
last row for a key wins).

A replace run's new table carries a ``ferry:run=`` table comment (run, job,
target) and, from the transaction that creates it until publish or abort,
a session-level advisory lock keyed by its OID, held on a connection set
aside for the run. Any later run writing the target (and ``ferry repair``)
drops the new tables whose lock is free: their run's session is gone (a
killed process), while a live run's table is left alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from typing import Any, AsyncIterable, Callable

import pyarrow as pa

from . import postgres_sql as sql
from .base import WriteContext, WriteMode, WriteResult
from .errors import ConfigurationError, DataError, FerryError, PermanentBackendError
from .postgres_copy import END, AdbcConnectionPool, adapt_for_ingest, next_or_end, run_quietly, settle, translate_error

logger = logging.getLogger("ferry.postgres")

#: Table comment that marks a replace run's new table: ``ferry:run={"run_id": ..., "job": ..., ...}``.
RUN_COMMENT_PREFIX = "ferry:run="
#: High 32 bits of the advisory lock a run holds on its new table (the low 32 bits are the table's OID).
RUN_LOCK_NAMESPACE = 0x46525259  # "FRRY"

#: Tables of a schema whose name starts with a prefix, with their comment.
_HELPER_TABLES_SQL = """
SELECT c.oid::bigint AS oid, c.relname AS name, obj_description(c.oid, 'pg_class') AS comment
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND starts_with(c.relname, $2)
ORDER BY c.relname
"""


def run_lock_key(oid: int) -> int:
    """The advisory lock key a live run holds on the new table with this OID."""
    return (RUN_LOCK_NAMESPACE << 32) | int(oid)


def new_table_prefix(table: str) -> str:
    """What every replace run's new table of ``table`` is named like (``<table>__ferry_new_``)."""
    name = sql.helper_table_name(table, "", "new")
    return name[: name.rindex("_") + 1]


async def drop_stale_new_tables(conn: Any, schema: str, table: str) -> list[str]:
    """Drop the new tables that replace runs of ``schema.table`` left when their process died.

    A table is stale when its ``ferry:run=`` comment names this target and
    nobody holds its run lock: the lock is session-level, so it went away with
    the session of the killed run. One line per table dropped.
    """
    rows = await conn.fetch(_HELPER_TABLES_SQL, schema, new_table_prefix(table))
    ledger = sql.qualified(schema, sql.LEDGER_TABLE)
    has_ledger = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ledger)
    done = []
    for row in rows:
        run = parse_run_comment(row["comment"])
        if run is None or run.get("schema") != schema or run.get("table") != table:
            continue  # not a Ferry run's table of this target (or one from before runs were marked)
        key = run_lock_key(row["oid"])
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", key):
            continue  # its run is live
        try:
            async with conn.transaction():
                # A dead session may still be rolling back its COPY: wait for it, not forever.
                await conn.execute("SET LOCAL lock_timeout = '10s'")
                await conn.execute(f"DROP TABLE IF EXISTS {sql.qualified(schema, row['name'])}")
                if has_ledger:
                    await conn.execute(f"DELETE FROM {ledger} WHERE target = $1", row["name"])
        except Exception as exc:
            logger.warning("could not drop %s.%s, left by replace run %s: %s", schema, row["name"], run.get("run_id"), exc)
            continue
        finally:
            await conn.fetchval("SELECT pg_advisory_unlock($1::bigint)", key)
        done.append(
            f"dropped {row['name']}, the unfinished new table of replace run {run.get('run_id')} "
            f"(job {run.get('job')}), whose session is gone"
        )
    return done


def parse_run_comment(comment: str | None) -> dict[str, Any] | None:
    """The run a new table's comment names, or None for any other comment."""
    if not comment or not comment.startswith(RUN_COMMENT_PREFIX):
        return None
    try:
        run = json.loads(comment[len(RUN_COMMENT_PREFIX):])
    except ValueError:
        return None
    return run if isinstance(run, dict) else None


def merge_sql(schema: str, table: str, names: list[str], casts: dict[str, str], key: tuple[str, ...], *, upsert: bool) -> str:
    """INSERT ... SELECT from ``pg_temp.ferry_stage`` into the table, in arrival order (``__ferry_seq``).

    For upsert, ``DISTINCT ON (key) ... ORDER BY key, __ferry_seq DESC`` keeps
    the last row received per key and ``ON CONFLICT (key) DO UPDATE`` merges it.
    ``casts`` maps staged-as-text columns to the type the server casts them to.
    """
    columns = ", ".join(sql.quote_ident(n) for n in names)
    selected = ", ".join(f"{sql.quote_ident(n)}::{casts[n]}" if n in casts else sql.quote_ident(n) for n in names)
    target = f"INSERT INTO {sql.qualified(schema, table)} ({columns}) "
    if not upsert:
        return target + f"SELECT {selected} FROM pg_temp.ferry_stage ORDER BY __ferry_seq"
    key_list = ", ".join(sql.quote_ident(k) for k in key)
    updates = [f"{sql.quote_ident(n)} = EXCLUDED.{sql.quote_ident(n)}" for n in names if n not in key]
    action = "DO UPDATE SET " + ", ".join(updates) if updates else "DO NOTHING"
    # DISTINCT ON keeps the first row per key in ORDER BY order: the last one received.
    return (
        target
        + f"SELECT DISTINCT ON ({key_list}) {selected} FROM pg_temp.ferry_stage "
        f"ORDER BY {key_list}, __ferry_seq DESC ON CONFLICT ({key_list}) {action}"
    )


class PostgresWriteMixin:
    """``begin_write``, ``write``, ``publish`` and ``abort`` of the PostgreSQL backend."""

    # -- writing ------------------------------------------------------------------------------------
    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        schema, table = self._names(dataset)
        sql.check_column_names(ctx.schema.names, table)
        for name in ctx.key:
            if ctx.schema.get_field_index(name) < 0:
                raise ConfigurationError(f"key column {name!r} is not in the written columns", path="key")
        target = sql.qualified(schema, table)
        # The plan's binary COPY fast path (ferry.backends.postgres_pipe.CopyPipe), when taken:
        # the tables it writes get the source's column types.
        pipe = ctx.state.get("direct")
        if ctx.mode is WriteMode.REPLACE and self.max_connections < 2:
            # The run's lock on its new table keeps one pooled connection for the whole run;
            # with a pool of one the partitions would wait for it until connection_timeout.
            raise ConfigurationError(
                f"replace into {schema}.{table} needs max_connections of at least 2 (it is "
                f"{self.max_connections}): one connection holds the run's lock on the new table "
                "while the partitions write through the others",
                path="target.max_connections",
            )
        state: dict[str, Any] = {"schema": schema, "table": table, "write_table": table}
        pool = self._pool()
        conn = await pool.acquire(timeout=self.connection_timeout)
        try:
            # One connection throughout; for replace it stays with the run (it holds the run lock).
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {sql.quote_ident(schema)}")
            await conn.execute(sql.ledger_sql(schema))
            for line in await drop_stale_new_tables(conn, schema, table):
                logger.warning("%s.%s: %s", schema, table, line)
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", target)
            if ctx.mode is WriteMode.REPLACE:
                strategy = self.replace_strategy
                dependents = await conn.fetch(sql.DEPENDENTS_SQL, target) if exists else []
                if strategy == "auto":
                    strategy = "truncate" if dependents else "swap"
                if strategy == "swap" and dependents:
                    raise ConfigurationError(
                        f"{schema}.{table} cannot be swapped by rename: "
                        + ", ".join(r[0] for r in dependents)
                        + " depend on it; set replace_strategy: truncate (or auto)",
                        path="replace_strategy",
                    )
                new = sql.helper_table_name(table, ctx.run_id, "new")
                if pipe is not None and strategy == "truncate" and exists:
                    await self._check_pipe_target(conn, pipe, schema, table)
                statements = (
                    pipe.create_table_sql(schema, new)
                    if pipe is not None
                    else sql.create_table_sql(schema, new, ctx.schema, ctx.key)
                )
                await self._create_new_table(conn, schema, table, new, statements, ctx)
                state.update(write_table=new, strategy=strategy, target_existed=bool(exists))
            elif not exists:
                statements = (
                    pipe.create_table_sql(schema, table)
                    if pipe is not None
                    else sql.create_table_sql(schema, table, ctx.schema, ctx.key)
                )
                async with conn.transaction():
                    for statement in statements:
                        await conn.execute(statement)
            else:
                if pipe is not None:
                    await self._check_pipe_target(conn, pipe, schema, table)
                else:
                    await self._add_missing_columns(conn, schema, table, ctx.schema)
                if ctx.mode is WriteMode.UPSERT:
                    await self._ensure_unique_key(conn, schema, table, ctx.key)
            if ctx.mode is not WriteMode.REPLACE:
                for index in self.indexes:
                    await conn.execute(sql.index_sql(schema, table, index, ctx.schema.names))
            else:
                for index in self.indexes:  # checked now, created at publish
                    sql.index_sql(schema, table, index, ctx.schema.names)
            rows = await conn.fetch(sql.CATALOG_COLUMNS_SQL, sql.qualified(schema, state["write_table"]))
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"preparing {schema}.{table} for writing") from None
        finally:
            if not any(entry[0] is conn for entry in self._live.get("replace_holders", {}).values()):
                await asyncio.shield(pool.release(conn))
        state["column_types"] = {r["name"]: r["type"] for r in rows}
        ctx.state["postgres"] = state

    async def _check_pipe_target(self, conn: Any, pipe: Any, schema: str, table: str) -> None:
        """The binary COPY fast path was planned against this table's types: refuse a table that changed since."""
        problems = pipe.mismatches(await pipe.fetch_columns(conn, schema, table))
        if problems:
            raise ConfigurationError(
                f"{schema}.{table} changed since the run was planned ({'; '.join(problems)}); "
                "run the job again to plan it against the table as it is"
            )

    async def _create_new_table(self, holder: Any, schema: str, table: str, new: str, statements: list[str], ctx: WriteContext) -> None:
        """Create a replace run's new table, marked with the run and locked for as long as the run lives.

        The lock is taken in the creating transaction, so no other session
        ever sees the table unlocked while its run is alive; ``holder``, the
        connection holding it, is set aside until publish, abort or close
        (which run their statements on it).
        """
        name = sql.qualified(schema, new)
        ledger = sql.qualified(schema, sql.LEDGER_TABLE)
        await self._release_new_table(schema, new)
        async with holder.transaction():
            earlier = await holder.fetchval("SELECT to_regclass($1)::oid::bigint", name)
            if earlier is not None:
                # This run id was started before: its new table starts afresh (unless that attempt is live).
                if not await holder.fetchval("SELECT pg_try_advisory_lock($1::bigint)", run_lock_key(earlier)):
                    raise ConfigurationError(
                        f"run {ctx.run_id} is already writing {schema}.{table} from another session; "
                        "wait for it to finish or start a new run"
                    )
                await holder.execute(f"DROP TABLE {name}")
                await holder.execute(f"DELETE FROM {ledger} WHERE target = $1", new)
                await holder.fetchval("SELECT pg_advisory_unlock($1::bigint)", run_lock_key(earlier))
            for statement in statements:
                await holder.execute(statement)
            mark = {"run_id": ctx.run_id, "job": ctx.job_name, "schema": schema, "table": table}
            await holder.execute(f"COMMENT ON TABLE {name} IS {sql.render_text_literal(RUN_COMMENT_PREFIX + json.dumps(mark))}")
            key = run_lock_key(await holder.fetchval("SELECT to_regclass($1)::oid::bigint", name))
            await holder.fetchval("SELECT pg_advisory_lock($1::bigint)", key)
        self._live.setdefault("replace_holders", {})[(schema, new)] = (holder, key)

    @contextlib.asynccontextmanager
    async def _run_connection(self, schema: str, new: str):
        """The connection holding the run's lock on its new table, else a pooled one."""
        entry = self._live.get("replace_holders", {}).get((schema, new))
        if entry is not None and not entry[0].is_closed():
            yield entry[0]
            return
        async with self._pool().acquire(timeout=self.connection_timeout) as conn:
            yield conn

    async def _release_new_table(self, schema: str, new: str) -> None:
        """Give up the run lock on a new table (after publish or abort) and return its connection."""
        entry = self._live.get("replace_holders", {}).pop((schema, new), None)
        if entry is None:
            return
        holder, key = entry
        try:
            await asyncio.shield(holder.fetchval("SELECT pg_advisory_unlock($1::bigint)", key))
        except Exception:
            pass  # the pool's reset of the connection unlocks it too
        pool = self._live.get("pool")
        if pool is not None:
            try:
                await asyncio.shield(pool.release(holder))
            except Exception:
                pass

    async def release_run_locks(self) -> None:
        """Release every run lock this block holds (when it closes)."""
        for schema, new in list(self._live.get("replace_holders", {})):
            await self._release_new_table(schema, new)

    async def repair(self, dataset: str) -> list[str]:
        """Drop the new tables of replace runs whose process died; a live run's new table stays.

        Any run writing the target does the same when it begins; ``ferry
        repair`` does it without running a job.
        """
        schema, table = self._names(dataset)
        try:
            async with self._pool().acquire(timeout=self.connection_timeout) as conn:
                return await drop_stale_new_tables(conn, schema, table)
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"repairing {schema}.{table}") from None

    async def discard_run(self, dataset: str, run_id: str, mode: WriteMode) -> list[str]:
        """Drop the new table a dead replace run left (with every other dead run's; live runs keep theirs).

        Append and upsert partitions commit whole, with their ledger rows, and
        upsert staging tables are temporary: a dead run leaves nothing else.
        """
        return await self.repair(dataset)

    async def plan_notes(self, dataset: str, mode: WriteMode) -> list[str]:
        """How replace and upsert will run against this table (shown by ``ferry plan``)."""
        if mode is WriteMode.UPSERT:
            return ["upsert: each partition is COPYed into a staging table and merged with INSERT ... ON CONFLICT; the last row for a key wins"]
        if mode is not WriteMode.REPLACE:
            return []
        schema, table = self._names(dataset)
        async with self._pool().acquire(timeout=self.connection_timeout) as conn:
            dependents = await conn.fetch(sql.DEPENDENTS_SQL, sql.qualified(schema, table))
        names = ", ".join(r[0] for r in dependents)
        if dependents and self.replace_strategy != "swap":
            return [f"replace: {names} depend on {schema}.{table}, so the new rows replace the old with TRUNCATE + INSERT in one transaction (not a rename swap)"]
        if dependents:
            return [f"replace: {names} depend on {schema}.{table}; replace_strategy swap will be refused: use truncate or auto"]
        if self.replace_strategy == "truncate":
            return ["replace: the new rows replace the old with TRUNCATE + INSERT in one transaction"]
        return ["replace: partitions load a new table, swapped in by rename in one transaction at publish"]

    async def _ensure_unique_key(self, conn: Any, schema: str, table: str, key: tuple[str, ...]) -> None:
        """ON CONFLICT needs a unique index on exactly the key columns: create one when missing."""
        name = sql.qualified(schema, table)
        rows = await conn.fetch(
            "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid",
            name,
        )
        if any(sorted(r[0]) == sorted(key) for r in rows):
            return
        index = sql.helper_table_name(table, ",".join(key), "key")
        columns = ", ".join(sql.quote_ident(k) for k in key)
        try:
            await conn.execute(f"CREATE UNIQUE INDEX {sql.quote_ident(index)} ON {name} ({columns})")
        except Exception as exc:
            raise ConfigurationError(
                f"upsert needs a unique index on ({', '.join(key)}) of {schema}.{table} and creating one failed "
                f"({exc}); remove the duplicate keys or create the index yourself",
                path="key",
            ) from None

    async def _add_missing_columns(self, conn: Any, schema: str, table: str, arrow_schema: pa.Schema) -> None:
        rows = await conn.fetch(sql.CATALOG_COLUMNS_SQL, sql.qualified(schema, table))
        present = {r["name"] for r in rows}
        for field in arrow_schema:
            if field.name not in present:
                await conn.execute(
                    f"ALTER TABLE {sql.qualified(schema, table)} ADD COLUMN {sql.quote_ident(field.name)} {sql.column_sql_type(field)}"
                )

    async def write(
        self,
        dataset: str,
        partition_id: str,
        batches: AsyncIterable[pa.RecordBatch],
        ctx: WriteContext,
    ) -> WriteResult:
        started = time.perf_counter()
        state = ctx.state.get("postgres")
        if state is None:
            raise ConfigurationError("write without begin_write: call begin_write(dataset, ctx) first")
        adbc = self._adbc()
        loop = asyncio.get_running_loop()
        iterator = batches.__aiter__()
        pending: set[concurrent.futures.Future] = set()
        stop = threading.Event()

        def pull() -> pa.RecordBatch | None:
            if stop.is_set():
                raise PermanentBackendError("the write was cancelled")
            future = asyncio.run_coroutine_threadsafe(next_or_end(iterator), loop)
            pending.add(future)
            try:
                item = future.result()
            except BaseException as exc:
                # The upstream stage failed: that error, not the driver's wrapping of it, is the cause.
                writer.source_error = exc
                raise
            finally:
                pending.discard(future)
            return None if item is END else item

        writer = PartitionWriter(state, ctx, partition_id, pull)
        done: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result: Any = writer.run(adbc)
            except BaseException as exc:  # handed to the event loop
                loop.call_soon_threadsafe(settle, done, None, exc)
                return
            loop.call_soon_threadsafe(settle, done, result, None)

        threading.Thread(target=run, name=f"ferry-pg-write-{partition_id}", daemon=True).start()
        try:
            skipped = await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            for future in list(pending):
                future.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(done), timeout=30)
            except BaseException:
                pass
            raise
        if skipped:
            async for _ in iterator:  # drain so upstream stages finish
                pass
            return WriteResult(partition_id, skipped=True)
        return WriteResult(
            partition_id,
            rows_written=writer.rows - writer.rejected,
            rows_rejected=writer.rejected,
            bytes_written=writer.nbytes,
            duration_seconds=time.perf_counter() - started,
        )

    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        state = ctx.state.get("postgres")
        if state is None or ctx.mode is not WriteMode.REPLACE:
            return
        schema, table, new = state["schema"], state["table"], state["write_table"]
        target, staged = sql.qualified(schema, table), sql.qualified(schema, new)
        ledger = sql.qualified(schema, sql.LEDGER_TABLE)
        try:
            async with self._run_connection(schema, new) as conn:
                async with conn.transaction():
                    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", target)
                    if exists and state.get("strategy") == "truncate":
                        await conn.execute(f"LOCK TABLE {target} IN ACCESS EXCLUSIVE MODE")
                        names = ", ".join(sql.quote_ident(n) for n in ctx.schema.names)
                        await conn.execute(f"TRUNCATE {target}")
                        await conn.execute(f"INSERT INTO {target} ({names}) SELECT {names} FROM {staged}")
                        await conn.execute(f"DROP TABLE {staged}")
                    else:
                        # The run's mark goes; the old table's comment (if any) is carried over below.
                        await conn.execute(f"COMMENT ON TABLE {staged} IS NULL")
                        if exists:
                            await conn.execute(f"LOCK TABLE {target} IN ACCESS EXCLUSIVE MODE")
                            await self._carry_over(conn, schema, table, new)
                            old = sql.helper_table_name(table, ctx.run_id, "old")
                            await conn.execute(f"ALTER TABLE {target} RENAME TO {sql.quote_ident(old)}")
                            await conn.execute(f"DROP TABLE {sql.qualified(schema, old)}")
                        await conn.execute(f"ALTER TABLE {staged} RENAME TO {sql.quote_ident(table)}")
                        await self._rename_primary_key(conn, schema, table)
                    # Declared indexes: built once over the loaded rows (faster than during COPY).
                    for index in self.indexes:
                        await conn.execute(sql.index_sql(schema, table, index, ctx.schema.names))
                    await conn.execute(f"DELETE FROM {ledger} WHERE target = $1", new)
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"publishing the replace of {schema}.{table}") from None
        await self._release_new_table(schema, new)

    async def _carry_over(self, conn: Any, schema: str, table: str, new: str) -> None:
        """Grants, the table comment and column comments of the old table go to the new one."""
        old_name, new_name = sql.qualified(schema, table), sql.qualified(schema, new)
        grants = await conn.fetch(
            "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
            "WHERE table_schema = $1 AND table_name = $2 AND grantee <> current_user",
            schema,
            table,
        )
        for grantee, privilege in grants:
            target = "PUBLIC" if grantee == "PUBLIC" else sql.quote_ident(grantee)
            await conn.execute(f"GRANT {privilege} ON {new_name} TO {target}")
        comment = await conn.fetchval("SELECT obj_description(to_regclass($1), 'pg_class')", old_name)
        if comment:
            await conn.execute(f"COMMENT ON TABLE {new_name} IS {sql.render_text_literal(comment)}")
        rows = await conn.fetch(
            "SELECT a.attname, col_description(a.attrelid, a.attnum) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            old_name,
        )
        new_columns = {r["name"] for r in await conn.fetch(sql.CATALOG_COLUMNS_SQL, new_name)}
        for name, text in rows:
            if text and name in new_columns and not text.startswith(sql.ARROW_COMMENT_PREFIX):
                await conn.execute(
                    f"COMMENT ON COLUMN {new_name}.{sql.quote_ident(name)} IS {sql.render_text_literal(text)}"
                )

    async def _rename_primary_key(self, conn: Any, schema: str, table: str) -> None:
        name = await conn.fetchval(
            "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'",
            sql.qualified(schema, table),
        )
        wanted = f"{table}_pkey"
        if name and name != wanted and len(wanted.encode()) <= sql.MAX_IDENTIFIER_BYTES:
            await conn.execute(
                f"ALTER TABLE {sql.qualified(schema, table)} RENAME CONSTRAINT {sql.quote_ident(name)} TO {sql.quote_ident(wanted)}"
            )

    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        state = ctx.state.get("postgres")
        if state is None or ctx.mode is not WriteMode.REPLACE:
            return  # committed partitions stay; open transactions were rolled back
        schema, new = state["schema"], state["write_table"]

        async def drop() -> None:
            async with self._run_connection(schema, new) as conn:
                await conn.execute(f"DROP TABLE IF EXISTS {sql.qualified(schema, new)}")
                await conn.execute(f"DELETE FROM {sql.qualified(schema, sql.LEDGER_TABLE)} WHERE target = $1", new)

        try:
            await asyncio.shield(drop())
        finally:
            await self._release_new_table(schema, new)


class PartitionWriter:
    """One partition's write on one ADBC connection and transaction (runs in a worker thread)."""

    #: Bytes of the latest batches kept to name the row of a COPY error (the server reports a
    #: line number). The newest batch is always kept; older ones go once this is exceeded, so a
    #: partition in flight holds tens of MiB here, not a whole partition.
    RECENT_BYTES = 64 * 1024 * 1024

    def __init__(self, state: dict[str, Any], ctx: WriteContext, partition_id: str, pull: Callable[[], pa.RecordBatch | None]) -> None:
        self.state = state
        self.ctx = ctx
        self.partition_id = partition_id
        self.pull = pull
        self.rows = 0
        self.nbytes = 0
        #: Rows handed to ``ctx.reject`` (on_error: collect).
        self.rejected = 0
        #: An error raised by the incoming stream (re-raised as is).
        self.source_error: BaseException | None = None
        self._recent: collections.deque[tuple[int, pa.RecordBatch]] = collections.deque()
        self._recent_bytes = 0

    def _batches(self, first: pa.RecordBatch, schema: pa.Schema, extra_seq: bool):
        batch: pa.RecordBatch | None = first
        while batch is not None:
            adapted = adapt_for_ingest(batch, self.state["column_types"])
            if adapted.schema != schema:
                adapted = adapted.cast(schema)
            if extra_seq:
                seq = pa.array(range(self.rows, self.rows + adapted.num_rows), pa.int64())
                adapted = adapted.append_column("__ferry_seq", seq)
            self._remember(batch)
            self.rows += batch.num_rows
            self.nbytes += batch.nbytes
            yield adapted
            batch = self.pull()

    def _remember(self, batch: pa.RecordBatch) -> None:
        """Keep ``batch`` (starting at row ``self.rows``) for :meth:`locate`, within ``RECENT_BYTES``."""
        self._recent.append((self.rows, batch))
        self._recent_bytes += batch.nbytes
        while len(self._recent) > 1 and self._recent_bytes > self.RECENT_BYTES:
            self._recent_bytes -= self._recent.popleft()[1].nbytes

    def locate(self, line: int, column: str | None) -> tuple[Any, Any]:
        """(row key, value) of the 1-based COPY ``line`` when its batch is still at hand."""
        row = line - 1
        for offset, batch in self._recent:
            if offset <= row < offset + batch.num_rows:
                return self._row_of(batch, row - offset, column, offset)
        return None, None

    def _row_of(self, batch: pa.RecordBatch, index: int, column: str | None, offset: int) -> tuple[Any, Any]:
        if not 0 <= index < batch.num_rows:
            return None, None
        key = None
        if self.ctx.key:
            key = [batch.column(k)[index].as_py() for k in self.ctx.key if batch.schema.get_field_index(k) >= 0]
        value = None
        if column and batch.schema.get_field_index(column) >= 0:
            value = batch.column(column)[index].as_py()
        return key if key else f"row {offset + index} of the partition", value

    def run(self, adbc: AdbcConnectionPool) -> bool:
        """Write and commit; returns True when the ledger shows an earlier attempt committed."""
        state, ctx = self.state, self.ctx
        schema, table = state["schema"], state["write_table"]
        ledger = sql.qualified(schema, sql.LEDGER_TABLE)
        ledger_key = (ctx.job_name, ctx.run_id, self.partition_id, table)
        upsert = ctx.mode is WriteMode.UPSERT
        conn = adbc.acquire()
        broken = True
        try:
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute(
                    f"SELECT 1 FROM {ledger} WHERE target = $1 AND run_id = $2 AND partition_id = $3 AND job = $4",
                    parameters=(table, ctx.run_id, self.partition_id, ctx.job_name),
                )
                if cur.fetchone() is not None:
                    cur.execute("ROLLBACK")
                    broken = False
                    return True
                first = self.pull()
                if first is not None:
                    if ctx.on_error == "collect" and ctx.reject is not None:
                        self._load_collecting(cur, first, schema, table, upsert)
                    else:
                        self._load(cur, first, schema, table, upsert)
                cur.execute(
                    f"INSERT INTO {ledger} (job, run_id, partition_id, target, rows) VALUES ($1, $2, $3, $4, $5)",
                    parameters=(*ledger_key[:3], table, self.rows - self.rejected),
                )
                cur.execute("COMMIT")
                broken = False
                return False
        except BaseException as exc:
            try:
                with conn.cursor() as cur:
                    run_quietly(cur, "ROLLBACK")
            except Exception:
                pass
            if self.source_error is not None:
                raise self.source_error from None
            if isinstance(exc, (FerryError, concurrent.futures.CancelledError)):
                raise
            if isinstance(exc, Exception):
                raise translate_error(
                    exc, f"writing partition {self.partition_id} to {schema}.{table}", locate=self.locate
                ) from None
            raise
        finally:
            adbc.release(conn, broken=broken)

    def _load(self, cur: Any, first: pa.RecordBatch, schema: str, table: str, upsert: bool) -> None:
        """COPY the stream into the table, or into a staging table merged with one INSERT ... SELECT.

        Staging is used for upsert and for columns the driver cannot COPY in
        binary from their Arrow type (text for uuid, unconstrained numeric or
        enum columns): those are staged as text and cast by the server.
        """
        types = self.state["column_types"]
        names = first.schema.names
        probe = adapt_for_ingest(first.slice(0, 0), types)
        as_text = [f.name for f in probe.schema if needs_server_cast(f.type, types.get(f.name, ""))]
        if not upsert and not as_text:
            reader = pa.RecordBatchReader.from_batches(probe.schema, self._batches(first, probe.schema, False))
            cur.adbc_ingest(table, reader, mode="append", db_schema_name=schema)
            return
        stage = sql.quote_ident("ferry_stage")
        cur.execute(f"CREATE TEMPORARY TABLE {stage} (LIKE {sql.qualified(schema, table)}) ON COMMIT DROP")
        for name in as_text:
            cur.execute(f"ALTER TABLE pg_temp.{stage} ALTER COLUMN {sql.quote_ident(name)} TYPE text")
        cur.execute(f"ALTER TABLE pg_temp.{stage} ADD COLUMN __ferry_seq bigint")
        reader_schema = probe.schema.append(pa.field("__ferry_seq", pa.int64()))
        reader = pa.RecordBatchReader.from_batches(reader_schema, self._batches(first, probe.schema, True))
        cur.adbc_ingest("ferry_stage", reader, mode="append", temporary=True)
        cur.execute(self._insert_sql(schema, table, names, {n: types[n] for n in as_text}, upsert))

    def _load_collecting(self, cur: Any, first: pa.RecordBatch, schema: str, table: str, upsert: bool) -> None:
        """on_error: collect -- load batch by batch under savepoints; split a failing batch to isolate bad rows.

        Good rows still load; each row the table refuses goes to ``ctx.reject``
        with the column, value and the server's reason. Slower than the
        streaming COPY of :meth:`_load` (one COPY per batch, more on failures).
        """
        types = self.state["column_types"]
        probe = adapt_for_ingest(first.slice(0, 0), types)
        as_text = [f.name for f in probe.schema if needs_server_cast(f.type, types.get(f.name, ""))]
        staged = upsert or bool(as_text)
        if staged:
            stage = sql.quote_ident("ferry_stage")
            cur.execute(f"CREATE TEMPORARY TABLE {stage} (LIKE {sql.qualified(schema, table)}) ON COMMIT DROP")
            for name in as_text:
                cur.execute(f"ALTER TABLE pg_temp.{stage} ALTER COLUMN {sql.quote_ident(name)} TYPE text")
            cur.execute(f"ALTER TABLE pg_temp.{stage} ADD COLUMN __ferry_seq bigint")
        insert = self._insert_sql(schema, table, first.schema.names, {n: types[n] for n in as_text}, upsert)
        batch: pa.RecordBatch | None = first
        while batch is not None:
            offset = self.rows
            self._remember(batch)
            self.rows += batch.num_rows
            self.nbytes += batch.nbytes
            self._isolate(cur, batch, offset, schema, table, staged, insert, probe.schema)
            batch = self.pull()

    def _isolate(self, cur: Any, batch: pa.RecordBatch, offset: int, schema: str, table: str, staged: bool, insert: str, ingest_schema: pa.Schema) -> None:
        cur.execute("SAVEPOINT ferry_rows")
        try:
            adapted = adapt_for_ingest(batch, self.state["column_types"])
            if adapted.schema != ingest_schema:
                adapted = adapted.cast(ingest_schema)
            if staged:
                seq = pa.array(range(offset, offset + adapted.num_rows), pa.int64())
                cur.adbc_ingest("ferry_stage", adapted.append_column("__ferry_seq", seq), mode="append", temporary=True)
                cur.execute(insert)
                cur.execute("TRUNCATE pg_temp.ferry_stage")
            else:
                cur.adbc_ingest(table, adapted, mode="append", db_schema_name=schema)
            cur.execute("RELEASE SAVEPOINT ferry_rows")
            return
        except Exception as exc:
            cur.execute("ROLLBACK TO SAVEPOINT ferry_rows")
            cur.execute("RELEASE SAVEPOINT ferry_rows")
            error = translate_error(
                exc,
                f"writing partition {self.partition_id} to {schema}.{table}",
                locate=lambda line, column: self._row_of(batch, line - 1, column, offset),
            )
            if not isinstance(error, DataError):
                raise error from None
        if batch.num_rows > 1:
            middle = batch.num_rows // 2
            self._isolate(cur, batch.slice(0, middle), offset, schema, table, staged, insert, ingest_schema)
            self._isolate(cur, batch.slice(middle), offset + middle, schema, table, staged, insert, ingest_schema)
            return
        column = error.column if error.column and batch.schema.get_field_index(error.column) >= 0 else None
        value = batch.column(column)[0].as_py() if column else None
        rejects = pa.table(
            {
                "row_index": pa.array([0], pa.int64()),
                "column": pa.array([column], pa.string()),
                "value": pa.array([None if value is None else str(value)], pa.string()),
                "reason": pa.array([str(error)], pa.string()),
                "error_class": pa.array([type(error).__name__], pa.string()),
                "step": pa.array(["write"], pa.string()),
            }
        )
        self.rejected += self.ctx.reject(batch, rejects)

    def _insert_sql(self, schema: str, table: str, names: list[str], casts: dict[str, str], upsert: bool) -> str:
        return merge_sql(schema, table, names, casts, self.ctx.key, upsert=upsert)


#: Column types the driver writes directly from Arrow strings.
_TEXT_LIKE = ("text", "character varying", "character", "json", "jsonb", "citext", "name", "xml")


def needs_server_cast(arrow_type: pa.DataType, pg_type: str) -> bool:
    """Whether a column is staged as text and cast by the server (strings into uuid, numeric, enums...)."""
    if isinstance(arrow_type, pa.BaseExtensionType):
        arrow_type = arrow_type.storage_type
    base = pg_type.split("(")[0].strip()
    if pg_type.endswith("[]"):
        return False
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)) and base not in _TEXT_LIKE
