"""PostgreSQL -> PostgreSQL binary COPY fast path, and replace runs' new tables left by killed processes.

Everything runs against a real PostgreSQL 15 (``pg_server.py``); flow tests
run the real ``migrate`` flow, and the orphan test SIGKILLs a real ``ferry
run`` process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import asyncpg
import pytest

from ferry.backends import WriteContext, WriteMode
from ferry.backends.errors import ConfigurationError, TransientBackendError
from ferry.backends.postgres import PostgresBackend
from ferry.flows.migrate import migrate
from ferry.flows.planning import plan_job
from ferry.flows.spec import build_backend, job_from_dict
from tests.integration.pg_server import postgres_server  # noqa: F401

FERRY = [sys.executable, "-m", "ferry.flows.cli"]


async def _sql(server, *statements: str, args: tuple = ()):
    conn = await asyncpg.connect(server.dsn)
    try:
        result = None
        for statement in statements:
            result = await conn.fetch(statement, *args) if args else await conn.fetch(statement)
        return result
    finally:
        await conn.close()


def sql(server, *statements: str, args: tuple = ()):
    return asyncio.run(_sql(server, *statements, args=args))


def _pg(server, dataset: str, **extra) -> dict:
    return {"backend": "postgres", "dataset": dataset, **server.settings(sslmode="disable"), **extra}


def _job(server, source: str, target: str, *, source_extra: dict | None = None, target_extra: dict | None = None, **extra) -> dict:
    job = {
        "name": "pipe",
        "source": _pg(server, source, **(source_extra or {})),
        "target": _pg(server, target, **(target_extra or {})),
        "mode": "replace",
        "stream": {"batch_size": 1_000, "parallel": 2},
    }
    job.update(extra)
    return job


def _run(job: dict, run_id: str | None = None) -> dict:
    return asyncio.run(migrate(job=job_from_dict(job), run_id=run_id))


async def _plan(job: dict):
    spec = job_from_dict(job)
    source, target = await build_backend(spec.source), await build_backend(spec.target)
    async with source, target:
        return await plan_job(spec, source, target)


def plan_text(job: dict) -> str:
    return asyncio.run(_plan(job)).render()


def _types(server, table: str) -> dict[str, str]:
    rows = sql(
        server,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        args=(table,),
    )
    return {r[0]: r[1] for r in rows}


def _rows(server, table: str, columns: list[str]) -> list[str]:
    """Every row as PostgreSQL's own text of the listed columns, in key order (exact, types included)."""
    listed = ", ".join(columns)
    return [r[0] for r in sql(server, f"SELECT ROW({listed})::text FROM {table} ORDER BY 1")]


#: A source with the types a copy must keep exactly; every seventh row is all nulls but its id.
SOURCE_DDL = """
DROP TABLE IF EXISTS public.pipe_src CASCADE;
CREATE TABLE public.pipe_src (
  id bigint PRIMARY KEY, amount numeric(12,2), big numeric(30,10), nu numeric, r real, d double precision,
  flag boolean, label text, code varchar(10), pad char(4), raw bytea, u uuid, day date, tm time, ts timestamp,
  at timestamptz, iv interval, j json, doc jsonb, tags text[], ints integer[]
);
INSERT INTO public.pipe_src
SELECT g,
       (g % 1000) - 500.25, g * 1234567.0123456789, (g / 7.0)::numeric, g / 3.0, g * -1.5e-10,
       g % 2 = 0, 'Zoë 王芳 🚀 ' || g, 'c' || (g % 100), 'p' || (g % 10), decode(lpad(to_hex(g), 8, '0'), 'hex'),
       md5(g::text)::uuid, date '2024-01-01' + g, time '00:00' + g * interval '1 second',
       timestamp '2024-02-29 12:00:00.000001' + g * interval '1 minute',
       timestamptz '2024-01-01 10:00:00+02' + g * interval '1 hour', g * interval '1 day 2 hours 3.000004 seconds',
       json_build_object('g', g, 'nested', json_build_array(g, NULL)),
       jsonb_build_object('g', g, 'text', 'ä "q"', 'list', jsonb_build_array(g, NULL, true)),
       ARRAY['x', NULL, 'y z', g::text], ARRAY[g, NULL, -g]
FROM generate_series(1, 5000) g WHERE g % 7 <> 0;
INSERT INTO public.pipe_src (id) SELECT g FROM generate_series(7, 5000, 7) g;
INSERT INTO public.pipe_src VALUES
  (0, -0.01, 0, 'NaN', 'Infinity', 'NaN', false, '', '', '', '', '00000000-0000-0000-0000-000000000000',
   '0001-01-01', '00:00', '1970-01-01', '1970-01-01 00:00:00+00', '-1 days -00:00:00.000001', '[]', '"text"',
   '{}', '{}');
ANALYZE public.pipe_src;
"""

ALL_COLUMNS = ["id", "amount", "big", "nu", "r", "d", "flag", "label", "code", "pad", "raw", "u", "day", "tm", "ts", "at", "iv", "j", "doc", "tags", "ints"]
SOURCE_ROWS = 5001


async def _script(server, text: str) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(text)
    finally:
        await conn.close()


@pytest.fixture()
def pipe_source(postgres_server):
    asyncio.run(_script(postgres_server, SOURCE_DDL))
    return postgres_server


# -- the fast path, exact ----------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_replace_takes_the_fast_path_and_copies_every_type_exactly_with_renames_and_selection(pipe_source):
    server = pipe_source
    sql(server, "DROP TABLE IF EXISTS public.pipe_copy")
    job = _job(
        server,
        "pipe_src",
        "pipe_copy",
        source_extra={"partition_rows": 800, "columns": [c for c in ALL_COLUMNS if c != "tm"]},
        transforms=[{"rename": {"label": "name", "doc": "document"}}, {"drop": ["code"]}],
        key=["id"],
    )
    assert "COPY fast path: taken" in plan_text(job)
    summary = _run(job)
    assert summary["copy_fast_path"] is True
    assert summary["rows_read"] == summary["rows_written"] == SOURCE_ROWS
    assert len(summary["partitions"]) >= 6
    assert summary["verification"]["status"] == "passed"
    written = [c for c in ALL_COLUMNS if c not in ("tm", "code")]
    renamed = ["name" if c == "label" else "document" if c == "doc" else c for c in written]
    # The target has the source's own types (jsonb stays jsonb, uuid stays uuid, numeric keeps its scale).
    source_types = _types(server, "public.pipe_src")
    assert _types(server, "public.pipe_copy") == {r: source_types[w] for w, r in zip(written, renamed)}
    assert _rows(server, "public.pipe_copy", renamed) == _rows(server, "public.pipe_src", written)
    # The swap left no helper table and no ledger rows behind.
    assert sql(server, "SELECT relname FROM pg_class WHERE relname LIKE 'pipe_copy__ferry%'") == []
    assert sql(server, "SELECT count(*) FROM public._ferry_ledger WHERE target LIKE 'pipe_copy%'")[0][0] == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_where_postgres_evaluates_goes_into_the_copy_select(pipe_source):
    server = pipe_source
    sql(server, "DROP TABLE IF EXISTS public.pipe_where")
    job = _job(
        server,
        "pipe_src",
        "pipe_where",
        source_extra={"partition_rows": 2_000, "where": {"and": [{"amount": {"gte": 0}}, {"label": {"like": "Zoë%5"}}]}},
        key=["id"],
    )
    summary = _run(job)
    assert summary["copy_fast_path"] is True and summary["verification"]["status"] == "passed"
    expected = _rows(server, "(SELECT * FROM public.pipe_src WHERE amount >= 0 AND label LIKE 'Zoë%5') s", ALL_COLUMNS)
    assert len(expected) == summary["rows_written"] > 0
    assert _rows(server, "public.pipe_where", ALL_COLUMNS) == expected


# -- write modes --------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_append_commits_each_partition_with_its_ledger_row_and_a_rerun_of_the_run_skips_them(pipe_source):
    server = pipe_source
    sql(server, "DROP TABLE IF EXISTS public.pipe_append")
    job = _job(server, "pipe_src", "pipe_append", source_extra={"partition_rows": 1_000}, mode="append", key=["id"])
    first = _run(job, run_id="append-run")
    assert first["copy_fast_path"] is True and first["verification"]["status"] == "passed"
    ledger = sql(server, "SELECT partition_id, rows FROM public._ferry_ledger WHERE run_id = 'append-run' ORDER BY 1")
    assert [r[0] for r in ledger] == sorted(p["partition"] for p in first["partitions"])
    assert sum(r[1] for r in ledger) == SOURCE_ROWS
    # The same run again (a retry after the commits): every partition is in the ledger, nothing doubles.
    again = _run(job, run_id="append-run")
    assert {p["status"] for p in again["partitions"]} == {"skipped"}
    assert again["rows_written"] == SOURCE_ROWS  # counted from the ledger
    assert tuple(sql(server, "SELECT count(*), count(DISTINCT id) FROM public.pipe_append")[0]) == (SOURCE_ROWS, SOURCE_ROWS)
    assert _rows(server, "public.pipe_append", ALL_COLUMNS) == _rows(server, "public.pipe_src", ALL_COLUMNS)


@pytest.mark.usefixtures("prefect_harness")
def test_upsert_merges_into_an_existing_table_of_the_same_types_and_the_last_row_wins(postgres_server):
    server = postgres_server
    sql(
        server,
        "DROP TABLE IF EXISTS public.pipe_changes, public.pipe_current",
        # No key on the source: rows arrive in insertion order and id 1 comes twice.
        "CREATE TABLE public.pipe_changes (id bigint NOT NULL, value text, amount numeric(8,3), doc jsonb)",
        "INSERT INTO public.pipe_changes VALUES (1, 'a', 1.5, '{\"v\": 1}'), (2, 'b', NULL, NULL), (1, 'c', 3.25, '[1, 2]')",
        "CREATE TABLE public.pipe_current (id bigint PRIMARY KEY, value text, amount numeric(8,3), doc jsonb)",
        "INSERT INTO public.pipe_current VALUES (1, 'old', 0, '{}'), (5, 'keep', 5, '{\"k\": true}')",
    )
    job = _job(server, "pipe_changes", "pipe_current", mode="upsert", key=["id"], stream={"parallel": 1})
    text = plan_text(job)
    assert "COPY fast path: taken" in text and "into the existing table" in text
    summary = _run(job)
    assert summary["copy_fast_path"] is True and summary["rows_written"] == 3
    rows = sql(server, "SELECT id, value, amount::text, doc::text FROM public.pipe_current ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "c", "3.250", "[1, 2]"), (2, "b", None, None), (5, "keep", "5.000", '{"k": true}')]


@pytest.mark.usefixtures("prefect_harness")
def test_replace_of_a_table_a_view_depends_on_copies_into_it_by_truncate(pipe_source):
    server = pipe_source
    sql(
        server,
        "DROP VIEW IF EXISTS public.pipe_viewed_v",
        "DROP TABLE IF EXISTS public.pipe_viewed",
        "CREATE TABLE public.pipe_viewed (id bigint PRIMARY KEY, amount numeric(12,2), doc jsonb)",
        "INSERT INTO public.pipe_viewed VALUES (-1, 1, '{}')",
        "CREATE VIEW public.pipe_viewed_v AS SELECT id, doc FROM public.pipe_viewed",
    )
    job = _job(server, "pipe_src", "pipe_viewed", source_extra={"columns": ["id", "amount", "doc"]}, key=["id"])
    text = plan_text(job)
    assert "COPY fast path: taken" in text and "TRUNCATE + INSERT" in text
    summary = _run(job)
    assert summary["copy_fast_path"] is True and summary["verification"]["status"] == "passed"
    assert sql(server, "SELECT count(*) FROM public.pipe_viewed_v")[0][0] == SOURCE_ROWS
    assert _rows(server, "public.pipe_viewed", ["id", "amount", "doc"]) == _rows(server, "public.pipe_src", ["id", "amount", "doc"])


@pytest.mark.usefixtures("prefect_harness")
def test_infinite_timestamps_are_copied_as_is_without_verify_and_refused_before_writing_with_it(postgres_server):
    from ferry.backends.errors import DataError

    server = postgres_server
    sql(
        server,
        "DROP TABLE IF EXISTS public.pipe_infinite, public.pipe_infinite_copy",
        "CREATE TABLE public.pipe_infinite (id bigint PRIMARY KEY, at timestamptz)",
        "INSERT INTO public.pipe_infinite VALUES (1, 'infinity'), (2, '2024-01-01 00:00:00+00')",
    )
    job = _job(server, "pipe_infinite", "pipe_infinite_copy", mode="append", key=["id"], stream={"parallel": 1})
    with pytest.raises(DataError, match="infinite_values: null"):
        _run({**job, "verify": True})
    assert sql(server, "SELECT count(*) FROM public.pipe_infinite_copy")[0][0] == 0
    summary = _run({**job, "verify": False})
    assert summary["copy_fast_path"] is True
    copied = sql(server, "SELECT at = 'infinity', at = '2024-01-01 00:00:00+00' FROM public.pipe_infinite_copy ORDER BY id")
    assert [tuple(r) for r in copied] == [(True, False), (False, True)]


# -- retries --------------------------------------------------------------------------------------


async def _planned(server, source: str, target: str, *, run_id: str, mode: str = "append", target_extra: dict | None = None):
    job = job_from_dict(_job(server, source, target, mode=mode, key=["id"], source_extra={"partition_rows": 2_000}, target_extra=target_extra))
    src, tgt = await build_backend(job.source), await build_backend(job.target)
    await src.open()
    await tgt.open()
    plan = await plan_job(job, src, tgt)
    assert plan.direct is not None, plan.direct_note
    ctx = WriteContext(run_id=run_id, job_name=job.name, mode=job.mode, schema=plan.decision.write_schema, key=("id",))
    ctx.state["direct"] = plan.direct
    await tgt.begin_write(target, ctx)
    return src, tgt, plan, ctx


def test_retrying_a_committed_partition_skips_it_and_a_killed_connection_is_transient_and_rolled_back(pipe_source):
    server = pipe_source

    async def scenario():
        await _sql(server, "DROP TABLE IF EXISTS public.pipe_retry")
        src, tgt, plan, ctx = await _planned(server, "pipe_src", "pipe_retry", run_id="retry", target_extra={"application_name": "ferry-pipe-retry"})
        try:
            first, second = plan.partitions[:2]
            done = await plan.direct.copy(src, tgt, first, "pipe_retry", ctx)
            # A new attempt after a lost commit acknowledgement: the ledger row says it committed.
            again = await plan.direct.copy(src, tgt, first, "pipe_retry", ctx)
            assert not done.skipped and again.skipped and again.rows_written == done.rows_written > 0

            # The next partition's COPY waits on a lock; its connection is killed meanwhile.
            locker = await asyncpg.connect(server.dsn)
            lock = locker.transaction()
            await lock.start()
            await locker.execute("LOCK TABLE public.pipe_retry IN SHARE MODE")
            copy = asyncio.ensure_future(plan.direct.copy(src, tgt, second, "pipe_retry", ctx))
            for _ in range(300):
                waiting = await _sql(
                    server,
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'ferry-pipe-retry' "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'COPY%'",
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the partition's COPY never waited on the lock")
            await _sql(server, f"SELECT pg_terminate_backend({waiting[0][0]})")
            with pytest.raises(TransientBackendError, match="retried per partition"):
                await copy
            await lock.rollback()
            await locker.close()
            assert (await _sql(server, "SELECT count(*) FROM public.pipe_retry"))[0][0] == done.rows_written
            retried = await plan.direct.copy(src, tgt, second, "pipe_retry", ctx)
            assert not retried.skipped
        finally:
            await tgt.close()
            await src.close()
        rows = await _sql(server, "SELECT count(*), count(DISTINCT id) FROM public.pipe_retry")
        assert tuple(rows[0]) == (done.rows_written + retried.rows_written,) * 2
        ledger = await _sql(server, "SELECT partition_id, rows FROM public._ferry_ledger WHERE run_id = 'retry' ORDER BY 1")
        assert [tuple(r) for r in ledger] == sorted([(first.id, done.rows_written), (second.id, retried.rows_written)])

    asyncio.run(scenario())


def test_a_target_whose_types_changed_after_planning_is_refused_at_begin_write(pipe_source):
    server = pipe_source
    sql(
        server,
        "DROP TABLE IF EXISTS public.pipe_changed",
        "CREATE TABLE public.pipe_changed (id bigint PRIMARY KEY, amount numeric(12,2))",
    )
    job = job_from_dict(_job(server, "pipe_src", "pipe_changed", mode="append", key=["id"], source_extra={"columns": ["id", "amount"]}))

    async def scenario():
        src, tgt = await build_backend(job.source), await build_backend(job.target)
        async with src, tgt:
            plan = await plan_job(job, src, tgt)
            assert plan.direct is not None
            await _sql(server, "ALTER TABLE public.pipe_changed ALTER COLUMN amount TYPE numeric(14,2)")
            ctx = WriteContext(run_id="changed", job_name="pipe", mode=job.mode, schema=plan.decision.write_schema, key=("id",))
            ctx.state["direct"] = plan.direct
            with pytest.raises(ConfigurationError, match=r"changed since the run was planned.*numeric\(14,2\)"):
                await tgt.begin_write("pipe_changed", ctx)

    asyncio.run(scenario())


# -- falling back ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_a_transform_beyond_select_and_rename_takes_the_normal_path(pipe_source):
    server = pipe_source
    sql(server, "DROP TABLE IF EXISTS public.pipe_derived")
    job = _job(
        server,
        "pipe_src",
        "pipe_derived",
        source_extra={"columns": ["id", "amount", "doc"]},
        transforms=[{"derive": {"double": "amount * 2"}}],
        key=["id"],
    )
    text = plan_text(job)
    assert "COPY fast path: not taken, rows go through Arrow: transforms[0] (derive) does more than select" in text
    summary = _run(job)
    assert summary["copy_fast_path"] is False and summary["verification"]["status"] == "passed"
    # The normal path created the table from Arrow types: jsonb read as a string became text.
    assert _types(server, "public.pipe_derived")["doc"] == "text"
    assert sql(server, "SELECT count(*), count(double) FROM public.pipe_derived")[0][0] == SOURCE_ROWS


def test_plan_says_why_the_fast_path_is_not_taken(pipe_source):
    server = pipe_source
    sql(
        server,
        "DROP TABLE IF EXISTS public.pipe_narrow, public.pipe_enum",
        "DROP TYPE IF EXISTS pipe_mood",
        # Arrow reads both as strings, so only the PostgreSQL types tell them apart.
        "CREATE TABLE public.pipe_narrow (id bigint PRIMARY KEY, code text)",
        "CREATE TYPE pipe_mood AS ENUM ('sad', 'happy')",
        "CREATE TABLE public.pipe_enum (id bigint PRIMARY KEY, mood pipe_mood)",
    )
    narrow = {"columns": ["id", "code"]}
    cases = [
        (_job(server, "pipe_src", "pipe_x", on_error="collect"), "on_error: collect"),
        (_job(server, "pipe_src", "pipe_x", source_extra={"where": {"label": {"regex": "^Z"}}}), "part of `where` is evaluated by Ferry"),
        (_job(server, "pipe_src", "pipe_x", source_extra={"infinite_values": "null"}), "infinite_values: null"),
        (_job(server, "pipe_src", "pipe_x", source_extra={"query": "SELECT id FROM public.pipe_src"}), "custom `query`"),
        (_job(server, "pipe_enum", "pipe_x"), "source column 'mood' has type pipe_mood, which is not one of PostgreSQL's built-in types"),
        (
            _job(server, "pipe_src", "pipe_x", source_extra={"max_connections": 2}),
            "needs 3 connections of the source pool (one per partition in flight on each side, plus one held for the "
            "run's snapshot or replace lock) and max_connections is 2",
        ),
        (
            _job(server, "pipe_src", "pipe_narrow", source_extra=narrow, mode="append"),
            "target column 'code' is text and source column 'code' is character varying(10): binary COPY needs identical column types",
        ),
    ]
    for job, reason in cases:
        text = plan_text(job)
        line = next(line for line in text.splitlines() if line.startswith("COPY fast path:"))
        assert line.startswith("COPY fast path: not taken, rows go through Arrow: ") and reason in line, line
    taken = plan_text(_job(server, "pipe_src", "pipe_x", key=["id"]))
    assert "COPY fast path: taken: each partition streams binary COPY from the source into a new table" in taken
    # The DDL shown is what the fast path creates: the source's own types.
    assert '"doc" jsonb' in taken and '"u" uuid' in taken and '"amount" numeric(12,2)' in taken
    # Other stores never print the line.
    memory = {"name": "m", "source": {"backend": "memory", "dataset": "d", "generate": {"rows": 10}}, "target": _pg(server, "pipe_x")}
    assert "COPY fast path" not in plan_text(memory)


# -- new tables of killed replace runs ----------------------------------------------------------------

ORPHAN_JOB = """
name: orphaned
source: {{backend: postgres, host: 127.0.0.1, port: {port}, user: postgres, database: postgres, sslmode: disable,
         dataset: pipe_src, partition_rows: 1000}}
target: {{backend: postgres, host: 127.0.0.1, port: {port}, user: postgres, database: postgres, sslmode: disable,
         dataset: pipe_survivor, application_name: ferry-killed-run}}
mode: replace
key: [id]
verify: false
stream: {{parallel: 1}}
"""


def _wait_for_sessions_to_end(server, application_name: str) -> None:
    deadline = time.monotonic() + 60
    while sql(server, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", args=(application_name,))[0][0]:
        assert time.monotonic() < deadline, "the killed run's sessions never ended"
        time.sleep(0.1)


async def _new_tables_of(server, table: str) -> list[str]:
    """The replace runs' new tables of ``table`` (published or aborted runs leave none)."""
    rows = await _sql(
        server,
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND starts_with(relname, $1) ORDER BY 1",
        args=(f"{table}__ferry_new_",),
    )
    return [r[0] for r in rows]


def _new_tables(server, table: str) -> list[str]:
    return asyncio.run(_new_tables_of(server, table))


@pytest.mark.usefixtures("prefect_harness")
def test_a_sigkilled_ferry_run_leaves_its_new_table_and_the_next_run_drops_it_but_not_a_live_runs(pipe_source, tmp_path):
    server = pipe_source
    sql(
        server,
        "DROP TABLE IF EXISTS public.pipe_survivor",
        "CREATE TABLE public.pipe_survivor (id bigint PRIMARY KEY, label text)",
        "INSERT INTO public.pipe_survivor SELECT g, 'old' FROM generate_series(1, 100) g",
    )
    job_file = tmp_path / "job.yaml"
    job_file.write_text(textwrap.dedent(ORPHAN_JOB.format(port=server.port)))

    async def kill_mid_replace() -> None:
        # Each partition's last step, its ledger row, waits behind this lock: the run is caught mid-replace.
        locker = await asyncpg.connect(server.dsn)
        await locker.execute("CREATE TABLE IF NOT EXISTS public._ferry_ledger (job text NOT NULL, run_id text NOT NULL, "
                             "partition_id text NOT NULL, target text NOT NULL, rows bigint NOT NULL, "
                             "committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, run_id, partition_id, job))")
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE public._ferry_ledger IN SHARE MODE")
        # A busy machine can take longer than Prefect's default 20 s to start the ephemeral API.
        env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
        # Its own process group: the SIGKILL reaches the ephemeral API server it starts as well.
        process = subprocess.Popen(
            [*FERRY, "run", str(job_file), "--no-progress"], cwd=tmp_path, start_new_session=True, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                # Not on the locking connection: inside its transaction pg_stat_activity would not change.
                waiting = await _sql(
                    server,
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'ferry-killed-run' "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO%_ferry_ledger%'",
                )
                if waiting:
                    break
                assert process.poll() is None, f"the run ended before it was killed: {process.communicate()[1][-2000:]}"
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the run never reached its first ledger row")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            await lock.rollback()
            await locker.close()

    asyncio.run(kill_mid_replace())
    _wait_for_sessions_to_end(server, "ferry-killed-run")
    (orphan,) = _new_tables(server, "pipe_survivor")
    comment = sql(server, "SELECT obj_description(to_regclass($1), 'pg_class')", args=(f"public.{orphan}",))[0][0]
    assert comment.startswith("ferry:run=") and '"job": "orphaned"' in comment
    assert tuple(sql(server, "SELECT count(*), min(label), max(label) FROM public.pipe_survivor")[0]) == (100, "old", "old")

    async def live_replace_and_next_run() -> None:
        # A replace that is still running (its session holds the run lock) while the next run begins.
        live = PostgresBackend(**server.settings(sslmode="disable"))
        async with live:
            ctx = WriteContext(run_id="live", job_name="other", mode=WriteMode.REPLACE,
                               schema=(await live.schema("pipe_survivor")), key=("id",))
            await live.begin_write("pipe_survivor", ctx)
            live_table = ctx.state["postgres"]["write_table"]
            summary = await migrate(job=job_from_dict(_job(server, "pipe_src", "pipe_survivor", mode="replace", key=["id"])))
            assert summary["copy_fast_path"] is True and summary["rows_written"] == SOURCE_ROWS
            assert await _new_tables_of(server, "pipe_survivor") == [live_table]
            await live.abort("pipe_survivor", ctx)
        assert await _new_tables_of(server, "pipe_survivor") == []

    asyncio.run(live_replace_and_next_run())
    assert sql(server, "SELECT count(*) FROM public.pipe_survivor")[0][0] == SOURCE_ROWS
    assert sql(server, "SELECT count(*) FROM public._ferry_ledger WHERE starts_with(target, 'pipe_survivor__ferry_new_')")[0][0] == 0


KILLED_BEGIN = """
import asyncio, os, signal, sys
import pyarrow as pa
from ferry.backends import WriteContext, WriteMode
from ferry.backends.postgres import PostgresBackend

async def main():
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("label", pa.string())])
    async with PostgresBackend(host="127.0.0.1", port=int(sys.argv[1]), sslmode="disable", application_name="ferry-killed-begin") as pg:
        ctx = WriteContext(run_id="killed", job_name="t", mode=WriteMode.REPLACE, schema=schema, key=("id",))
        await pg.begin_write("pipe_repaired", ctx)
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_ferry_repair_drops_a_killed_replaces_new_table_and_keeps_a_live_ones(postgres_server, tmp_path):
    server = postgres_server
    sql(server, "DROP TABLE IF EXISTS public.pipe_repaired", "CREATE TABLE public.pipe_repaired (id bigint PRIMARY KEY, label text)")
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_BEGIN))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "name: repaired\nsource: {backend: memory, dataset: d, generate: {rows: 1}}\n"
        f"target: {{backend: postgres, host: 127.0.0.1, port: {server.port}, user: postgres, database: postgres, "
        "sslmode: disable, dataset: pipe_repaired}\n"
    )

    def ferry(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*FERRY, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    async def killed_while_a_live_run_writes() -> tuple[str, str, subprocess.CompletedProcess]:
        live = PostgresBackend(**server.settings(sslmode="disable"))
        async with live:
            ctx = WriteContext(run_id="live", job_name="t", mode=WriteMode.REPLACE, schema=await live.schema("pipe_repaired"), key=("id",))
            await live.begin_write("pipe_repaired", ctx)
            live_table = ctx.state["postgres"]["write_table"]
            killed = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), str(server.port)], cwd=os.getcwd(), timeout=120)
            assert killed.returncode == -signal.SIGKILL
            orphan = next(t for t in await _new_tables_of(server, "pipe_repaired") if t != live_table)
            for _ in range(600):  # the killed process's session ends a moment after it
                if not (await _sql(server, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'ferry-killed-begin'")):
                    break
                await asyncio.sleep(0.1)
            repaired = await asyncio.to_thread(ferry, "repair", str(job_file))
            assert await _new_tables_of(server, "pipe_repaired") == [live_table]
            return live_table, orphan, repaired

    live_table, orphan, repaired = asyncio.run(killed_while_a_live_run_writes())
    assert repaired.returncode == 0, repaired.stderr
    assert f"dropped {orphan}, the unfinished new table of replace run killed (job t), whose session is gone" in repaired.stdout
    assert live_table not in repaired.stdout
    # The live run's block closed without publishing or aborting: its lock went with its session.
    again = ferry("repair", str(job_file))
    assert f"dropped {live_table}" in again.stdout
    assert _new_tables(server, "pipe_repaired") == []
    assert "nothing to repair" in ferry("repair", str(job_file)).stdout
