"""The registry of benchmark routes: a Ferry run and a bare baseline doing the same work.

A :class:`Route` is:

* ``ferry(ctx, rows)`` -- async; runs Ferry's ``migrate`` flow once (through
  :meth:`RunContext.run_job`, which times the ``await migrate(...)`` call) and
  returns a :class:`FerryResult` (the flow's summary and its wall time);
* ``baseline(ctx, rows)`` -- sync or async; does the same work with the bare
  library and returns a :class:`BaselineResult`. Its ``seconds`` are its data
  path: from the start of the first read to the end of the last write
  (connection set-up and dataset discovery are outside, as Ferry's planning is
  outside its ``data_seconds``); ``end_to_end_seconds`` is the whole call;
* ``prepare(ctx, rows)`` -- optional, async; makes the input of that row count
  (outside every clock), once per row count;
* ``services(ctx)`` -- optional; an async context manager that starts what the
  route needs (a PostgreSQL, an S3 or an Elasticsearch server...) once per
  invocation, before the route's warm-up, and stops it afterwards. A service
  started as a child process should add its pid to ``ctx.service_pids`` so that
  its memory is reported as ``services_rss_bytes`` and not as Ferry's.

Everything a route writes goes under ``ctx.scratch(route, rows)``; the harness
removes that folder when the measurement is over.

Adding a route::

    async def ferry_postgres_to_parquet(ctx, rows): ...
    def asyncpg_copy(ctx, rows): ...

    register(Route(name="postgres-to-parquet", description="...",
                   ferry=ferry_postgres_to_parquet,
                   baseline_name="asyncpg-copy", baseline=asyncpg_copy,
                   prepare=load_orders_table, services=postgres_server))

This module imports neither Prefect nor Ferry at import time: both are imported
inside the functions, after the harness has set ``PREFECT_HOME``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncContextManager, Awaitable, Callable

from .harness import HarnessError, log


@dataclass
class FerryResult:
    """What one Ferry run returned."""

    summary: dict[str, Any]
    #: Wall time of the ``await migrate(...)`` call (perf_counter).
    wall_seconds: float
    #: ``time.time()`` when the call started (to relate it to the process start).
    started_at: float


@dataclass
class BaselineResult:
    """What one baseline run measured."""

    rows: int
    #: Start of the first read .. end of the last write (set-up and discovery excluded).
    seconds: float
    #: The whole baseline call.
    end_to_end_seconds: float


@dataclass
class RunContext:
    """Settings and scratch space shared by the routes of one invocation."""

    workdir: Path
    parallel: int = 2
    batch_size: int = 65_536
    seed: int = 42
    #: Pids of service processes (database servers...) started by route services.
    service_pids: set[int] = field(default_factory=set)
    #: Per-route state, e.g. prepared inputs keyed by (route, rows).
    state: dict[Any, Any] = field(default_factory=dict)

    def scratch(self, route: str, rows: int, *parts: str) -> Path:
        """A folder for one measurement (created; removed by :meth:`clean`)."""
        path = self.workdir.joinpath(route, str(rows), *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clean(self, route: str, rows: int) -> None:
        """Remove a measurement's scratch folder and its state."""
        shutil.rmtree(self.workdir / route / str(rows), ignore_errors=True)
        for key in [k for k in self.state if isinstance(k, tuple) and k[:2] == (route, rows)]:
            del self.state[key]

    def job(self, name: str, source: dict[str, Any], target: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A benchmark job: replace mode, no verification, no transforms, this invocation's stream settings."""
        job: dict[str, Any] = {
            "name": name,
            "source": source,
            "target": target,
            "mode": "replace",
            "verify": False,
            "stream": {"batch_size": self.batch_size, "parallel": self.parallel},
            # Keep everything a run writes inside the workspace.
            "rejects_dir": str(self.workdir / "rejects"),
        }
        job.update(extra)
        return job

    async def run_job(self, job: dict[str, Any]) -> FerryResult:
        """Validate ``job`` (untimed), then time ``await migrate(job=...)``."""
        from ferry.flows.migrate import migrate
        from ferry.flows.spec import job_from_dict

        spec = job_from_dict(job)
        started_at = time.time()
        started = time.perf_counter()
        summary = await migrate(job=spec)
        wall = time.perf_counter() - started
        if not isinstance(summary, dict):
            raise HarnessError(f"migrate returned {type(summary).__name__}, expected the summary dict")
        return FerryResult(summary=summary, wall_seconds=wall, started_at=started_at)


@dataclass(frozen=True)
class Route:
    """A benchmark route (see the module docstring)."""

    name: str
    description: str
    ferry: Callable[[RunContext, int], Awaitable[FerryResult]] | None = None
    baseline_name: str = ""
    baseline: Callable[[RunContext, int], BaselineResult | Awaitable[BaselineResult]] | None = None
    prepare: Callable[[RunContext, int], Awaitable[None]] | None = None
    services: Callable[[RunContext], AsyncContextManager[Any]] | None = None
    #: A route that measures itself instead of ``ferry``/``baseline`` (no flow run, no
    #: start-up probe): ``run(ctx, rows, repeat)`` returns its JSON records for one row
    #: count, each already holding ``route`` and ``rows`` (e.g. the ``records`` route).
    run: Callable[[RunContext, int, int], Awaitable[list[dict[str, Any]]]] | None = None

    def __post_init__(self) -> None:
        if self.run is None and (self.ferry is None or self.baseline is None):
            raise ValueError(f"route {self.name!r} needs ferry and baseline, or run")


#: Route name -> route, in registration order.
ROUTES: dict[str, Route] = {}


def register(route: Route) -> Route:
    """Add ``route`` to the registry (names are unique)."""
    if route.name in ROUTES:
        raise ValueError(f"route {route.name!r} is already registered")
    ROUTES[route.name] = route
    return route


def get_route(name: str) -> Route:
    """The route called ``name``, or a KeyError naming the known routes."""
    try:
        return ROUTES[name]
    except KeyError:
        raise KeyError(f"unknown route {name!r}; known routes: {', '.join(ROUTES)}") from None


def _generated_orders(ctx: RunContext, rows: int, dataset: str = "orders") -> dict[str, Any]:
    return {"backend": "memory", "dataset": dataset, "generate": {"rows": rows, "seed": ctx.seed}}


async def startup_probe(ctx: RunContext) -> FerryResult:
    """The first flow call of an invocation: one generated row into the counting sink."""
    job = ctx.job(
        "bench-startup",
        source=_generated_orders(ctx, 1, "startup"),
        target={"backend": "memory", "dataset": "startup-sink", "discard": True},
    )
    return await ctx.run_job(job)


# -- memory-to-parquet ----------------------------------------------------------------

MEMORY_TO_PARQUET = "memory-to-parquet"


async def ferry_memory_to_parquet(ctx: RunContext, rows: int) -> FerryResult:
    """Generated orders -> local Parquet through Ferry (replace, no verification, no transforms)."""
    folder = ctx.scratch(MEMORY_TO_PARQUET, rows, "ferry")
    job = ctx.job(
        "bench-memory-to-parquet",
        source=_generated_orders(ctx, rows),
        target={"backend": "local", "url": str(folder), "dataset": "orders"},
    )
    return await ctx.run_job(job)


def pyarrow_parquetwriter(ctx: RunContext, rows: int) -> BaselineResult:
    """The same generator batches written by one bare ``pyarrow.parquet.ParquetWriter`` (snappy)."""
    import pyarrow.parquet as pq

    from ferry.backends.generator import ORDERS_SCHEMA, generate_batches

    path = ctx.scratch(MEMORY_TO_PARQUET, rows, "baseline") / "orders.parquet"
    started = time.perf_counter()
    written = 0
    with pq.ParquetWriter(str(path), ORDERS_SCHEMA) as writer:
        clock = time.perf_counter()
        for batch in generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size):
            writer.write_batch(batch)
            written += batch.num_rows
    ended = time.perf_counter()
    return BaselineResult(rows=written, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=MEMORY_TO_PARQUET,
        description="generated orders -> local Parquet (Ferry's migrate flow, replace, verify off)",
        ferry=ferry_memory_to_parquet,
        baseline_name="pyarrow-parquetwriter",
        baseline=pyarrow_parquetwriter,
    )
)


# -- parquet-to-memory ----------------------------------------------------------------

PARQUET_TO_MEMORY = "parquet-to-memory"


async def prepare_parquet_input(ctx: RunContext, rows: int) -> None:
    """Write the input once with Ferry's memory-to-parquet job; both sides read these files."""
    folder = ctx.scratch(PARQUET_TO_MEMORY, rows, "input")
    job = ctx.job(
        "bench-prepare-parquet",
        source=_generated_orders(ctx, rows),
        target={"backend": "local", "url": str(folder), "dataset": "orders"},
    )
    result = await ctx.run_job(job)
    summary = result.summary
    if summary.get("rows_written") != rows:
        raise HarnessError(f"preparing the Parquet input wrote {summary.get('rows_written')} rows, expected {rows}")
    files_folder = Path(summary["output"])
    files = sorted(files_folder.glob("*.parquet"))
    if not files:
        raise HarnessError(f"preparing the Parquet input left no .parquet files in {files_folder}")
    ctx.state[(PARQUET_TO_MEMORY, rows, "input")] = {"url": str(folder), "files_folder": str(files_folder)}
    size = sum(f.stat().st_size for f in files)
    log(f"{PARQUET_TO_MEMORY} {rows:,} rows: input is {len(files)} file(s), {size / 2**20:,.1f} MiB in {files_folder}")


def _parquet_input(ctx: RunContext, rows: int) -> dict[str, str]:
    try:
        return ctx.state[(PARQUET_TO_MEMORY, rows, "input")]
    except KeyError:
        raise HarnessError(f"{PARQUET_TO_MEMORY}: no prepared input for {rows} rows") from None


async def ferry_parquet_to_memory(ctx: RunContext, rows: int) -> FerryResult:
    """The prepared Parquet files -> Ferry's counting sink (keeps nothing)."""
    source = _parquet_input(ctx, rows)
    job = ctx.job(
        "bench-parquet-to-memory",
        source={"backend": "local", "url": source["url"], "dataset": "orders"},
        target={"backend": "memory", "dataset": "sink", "discard": True},
    )
    return await ctx.run_job(job)


def pyarrow_dataset(ctx: RunContext, rows: int) -> BaselineResult:
    """``pyarrow.dataset.dataset(folder).to_batches(batch_size=B)`` over the same files, counting rows."""
    import pyarrow.dataset as pads

    folder = _parquet_input(ctx, rows)["files_folder"]
    started = time.perf_counter()
    dataset = pads.dataset(folder, format="parquet")  # discovery: Ferry does its own while planning
    seen = 0
    clock = time.perf_counter()
    for batch in dataset.to_batches(batch_size=ctx.batch_size):
        seen += batch.num_rows
    ended = time.perf_counter()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=PARQUET_TO_MEMORY,
        description="local Parquet (written by Ferry) -> Ferry's counting sink (memory, discard)",
        ferry=ferry_parquet_to_memory,
        baseline_name="pyarrow-dataset",
        baseline=pyarrow_dataset,
        prepare=prepare_parquet_input,
    )
)
from . import es_routes  # noqa: E402,F401  (memory-to-es, es-to-memory)
from . import postgres_routes  # noqa: E402,F401  (memory-to-postgres, postgres-to-memory/-parquet/-postgres)
from . import s3_routes  # noqa: E402,F401  (memory-to-s3, s3-to-memory, s3-many-files)
from . import records_routes  # noqa: E402,F401  (records: the guide's record API benchmark)
