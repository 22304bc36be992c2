"""Reading PostgreSQL tables: key-range or ctid partitions over one exported snapshot, streamed as Arrow.

:class:`PostgresReadMixin` gives :class:`~ferry.backends.postgres.PostgresBackend`
its ``partitions`` and ``read``. Partitions are key ranges over a one-column
primary key (or ``partition_column``: integers, dates, timestamps) or ctid
page ranges for a table without one. With ``consistent_snapshot`` (the
default) the planning connection exports a snapshot (``pg_export_snapshot()``
in a REPEATABLE READ transaction that touches no table and is held until the
block closes or the dataset is planned again); every partition's reader
imports it with ``SET TRANSACTION SNAPSHOT``. The snapshot id and the catalog
columns travel in the partition spec. Rows stream from the ADBC driver's
binary COPY as record batches in a worker thread; they are never all held in
memory.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, AsyncIterator

import pyarrow as pa

from . import postgres_sql as sql
from .base import Partition
from .errors import ConfigurationError, FerryError, PermanentBackendError
from .filters import Filter, columns_to_read, filter_batch
from .postgres_copy import thread_stream, to_read_type, translate_error


class PostgresReadMixin:
    """``partitions`` and ``read`` of the PostgreSQL backend (uses the block's settings and pools)."""

    # -- partitions -------------------------------------------------------------------------------
    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        catalog = await self._catalog(dataset)
        columns = [[c.name, c.pg_type, c.is_enum, c.not_null, _comment(c)] for c in catalog]
        pool = self._pool()
        holder = await pool.acquire(timeout=self.connection_timeout)
        transaction = None
        held = False
        try:
            snapshot = None
            if self.consistent_snapshot:
                # Start the transaction before any statement on this connection (see TEST-SERVERS.md).
                # The exporting transaction touches no table, so it holds no lock that would
                # block a later swap or DDL; it only keeps the snapshot importable.
                transaction = holder.transaction(isolation="repeatable_read", readonly=True)
                await transaction.start()
                snapshot = await holder.fetchval("SELECT pg_export_snapshot()")
            base = {"columns": columns, "snapshot": snapshot}
            if self.query:
                parts = [Partition(id="query", dataset=dataset, spec={**base, "kind": "query"})]
            else:
                async with pool.acquire(timeout=self.connection_timeout) as conn:
                    # The bounds come from the same snapshot the partitions will read.
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        if snapshot:
                            await conn.execute(f"SET TRANSACTION SNAPSHOT {sql.render_text_literal(snapshot)}")
                        parts = await self._plan_ranges(conn, dataset, catalog, hint, base)
            if transaction is not None:
                # Held until this block closes: readers import the snapshot meanwhile.
                # A new plan of the same dataset ends the previous one's snapshot.
                holders = self._live.setdefault("snapshot_holders", {})
                previous = holders.pop(dataset, None)
                holders[dataset] = (holder, transaction)
                if previous is not None:
                    await self._end_snapshot(*previous)
                held = True
            return parts
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"planning the partitions of {dataset!r}") from None
        finally:
            if not held:
                if transaction is not None:
                    try:
                        await transaction.rollback()
                    except Exception:
                        pass
                await pool.release(holder)

    async def _plan_ranges(self, conn: Any, dataset: str, catalog: list[sql.CatalogColumn], hint: int, base: dict) -> list[Partition]:
        schema, table = self._names(dataset)
        name = sql.qualified(schema, table)
        column = self.partition_column
        if column is None:
            keys = await conn.fetch(sql.PRIMARY_KEY_SQL, name)
            if len(keys) == 1:
                column = keys[0][0]
        by_name = {c.name: c for c in catalog}
        if column is not None and column not in by_name:
            raise ConfigurationError(f"partition_column {column!r} is not a column of {schema}.{table}", path="partition_column")
        kind = None
        if column is not None:
            arrow = by_name[column].arrow
            if pa.types.is_integer(arrow):
                kind = "int"
            elif pa.types.is_timestamp(arrow) or pa.types.is_date(arrow):
                kind = "time"
            elif self.partition_column is not None:
                raise ConfigurationError(
                    f"partition_column {column!r} is {by_name[column].pg_type}; use an integer, date or timestamp column",
                    path="partition_column",
                )
        estimate = await conn.fetchval("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", name)
        if estimate is None or estimate < 0:
            estimate = await conn.fetchval(f"SELECT count(*) FROM {name}")
        count = max(1, hint, math.ceil(estimate / self.partition_rows))
        if kind is None:
            pages = await conn.fetchval(
                "SELECT (pg_relation_size(to_regclass($1)) / current_setting('block_size')::int)::bigint", name
            )
            count = max(1, min(count, pages))
            bounds = [round(i * pages / count) for i in range(count + 1)]
            specs = [{"kind": "ctid", "lo": bounds[i] if i else None, "hi": bounds[i + 1] if i < count - 1 else None} for i in range(count)]
        else:
            ident = sql.quote_ident(column)
            if kind == "int":
                low, high = await conn.fetchrow(f"SELECT min({ident}), max({ident}) FROM {name}")
            else:
                low, high = await conn.fetchrow(
                    f"SELECT (extract(epoch FROM min({ident})::timestamp) * 1000000)::bigint, "
                    f"(extract(epoch FROM max({ident})::timestamp) * 1000000)::bigint FROM {name}"
                )
            if low is None:
                count, low, high = 1, 0, 0
            count = max(1, min(count, high - low + 1))
            cuts = [low + (high - low + 1) * i // count for i in range(count + 1)]
            specs = []
            for i in range(count):
                spec = {"kind": kind, "column": column, "type": by_name[column].pg_type,
                        "lo": cuts[i] if i else None, "hi": cuts[i + 1] if i < count - 1 else None,
                        "nulls": i == 0 and not by_name[column].not_null}
                specs.append(spec)
        width = len(str(len(specs)))
        return [
            Partition(id=f"part-{i:0{width}d}-of-{len(specs)}", dataset=dataset, spec={**base, **spec},
                      estimated_rows=round(estimate / len(specs)))
            for i, spec in enumerate(specs)
        ]

    # -- reading ------------------------------------------------------------------------------------
    def _read_sql(
        self,
        partition: Partition,
        catalog: list[sql.CatalogColumn],
        needed: list[str],
        where: Filter | None,
        *,
        raw: bool = False,
    ) -> str:
        """The SELECT of one partition: its key or ctid range, and what ``where`` pushes down.

        ``raw`` selects the columns as stored (the binary COPY fast path sends
        them on untouched); otherwise enums, uuids and the like are cast to
        types the Arrow driver reads.
        """
        by_name = {c.name: c for c in catalog}
        selected = [by_name[n] for n in needed]
        spec = partition.spec
        if spec.get("kind") == "query":
            source = f"({self.query}) AS ferry_query"
        else:
            schema, table = self._names(partition.dataset)
            source = sql.qualified(schema, table)
        conditions = []
        kind = spec.get("kind")
        if kind == "ctid":
            if spec["lo"] is not None:
                conditions.append(f"ctid >= '({int(spec['lo'])},0)'::tid")
            if spec["hi"] is not None:
                conditions.append(f"ctid < '({int(spec['hi'])},0)'::tid")
        elif kind in ("int", "time"):
            ident = sql.quote_ident(spec["column"])
            bounds = []
            for op, value in ((">=", spec["lo"]), ("<", spec["hi"])):
                if value is None:
                    continue
                if kind == "int":
                    bounds.append(f"{ident} {op} {int(value)}")
                else:
                    bounds.append(f"{ident} {op} {_time_literal(int(value), spec['type'])}")
            if bounds:
                condition = " AND ".join(bounds)
                if spec.get("nulls"):
                    condition = f"({condition} OR {ident} IS NULL)"
                conditions.append(condition)
        if where is not None:
            pushed = sql.filter_to_sql(where, by_name, sql.Params(inline=True))
            if pushed is not None:
                conditions.append(pushed)
        columns = ", ".join(sql.quote_ident(c.name) for c in selected) if raw else sql.select_list(selected)
        text = f"SELECT {columns or 'NULL'} FROM {source}"
        if conditions:
            text += " WHERE " + " AND ".join(conditions)
        return text

    async def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        catalog = [sql.catalog_column(*c) for c in partition.spec["columns"]]
        names = [c.name for c in catalog]
        if columns is not None:
            missing = [c for c in columns if c not in names]
            if missing:
                raise ConfigurationError(f"{partition.dataset!r} has no column(s) {', '.join(missing)}", path="source.columns")
        wanted = list(columns) if columns is not None else names
        needed = columns_to_read(wanted, where, names)
        text = self._read_sql(partition, catalog, needed, where)
        by_name = {c.name: c for c in catalog}
        schema = pa.schema([by_name[n].field for n in needed])
        snapshot = partition.spec.get("snapshot")
        adbc = self._adbc()
        infinite_as_null = self.infinite_values == "null"

        def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
            arrays = [
                to_read_type(batch.column(i), schema.field(i).type, schema.field(i).name, infinite_as_null=infinite_as_null)
                for i in range(len(needed))
            ]
            out = pa.RecordBatch.from_arrays(arrays, schema=schema)
            if where is not None:
                out = filter_batch(out, where)
            if len(needed) > len(wanted):
                out = out.select(wanted)
            return out

        def produce(emit) -> None:
            conn = adbc.acquire()
            broken = True
            try:
                with conn.cursor() as cur:
                    cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    if snapshot:
                        cur.execute(f"SET TRANSACTION SNAPSHOT {sql.render_text_literal(snapshot)}")
                    cur.execute(text)
                    reader = cur.fetch_record_batch()
                    finished = True
                    for batch in reader:
                        out = convert(batch)
                        # The driver cuts batches by bytes (16 MiB): split each into equal
                        # zero-copy slices of at most batch_rows rows (no small remainders).
                        pieces = max(1, -(-out.num_rows // batch_rows))
                        size = -(-out.num_rows // pieces) if out.num_rows else 0
                        for start in range(0, max(out.num_rows, 1), max(size, 1)):
                            if not emit(out.slice(start, size)):
                                finished = False
                                break
                        if not finished:
                            break
                    if finished:
                        cur.execute("COMMIT")
                        broken = False
            except Exception as exc:
                if "snapshot" in str(exc).lower() and "invalid" in str(exc).lower():
                    raise PermanentBackendError(
                        f"partition {partition.id}: the exported snapshot {snapshot} is gone (the planning "
                        "connection closed); rerun the job, or set consistent_snapshot: false"
                    ) from None
                raise translate_error(exc, f"reading partition {partition.id} of {partition.dataset!r}") from None
            finally:
                adbc.release(conn, broken=broken)

        async for batch in thread_stream(produce):
            if batch.num_rows:
                yield batch


def _comment(column: sql.CatalogColumn) -> str | None:
    if column.declared is None:
        return None
    from .types import format_arrow_type

    return sql.ARROW_COMMENT_PREFIX + format_arrow_type(column.declared)


def _time_literal(micros: int, pg_type: str) -> str:
    moment = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=micros)
    base = pg_type.split("(")[0].strip()
    if base == "date":
        return f"'{moment.date().isoformat()}'::date"
    if base == "timestamp with time zone":
        return f"'{moment.isoformat()}+00:00'::timestamptz"
    return f"'{moment.isoformat()}'::timestamp"
