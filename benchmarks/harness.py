"""Measurement: workspace, Prefect environment, timing, medians, RSS sampling, JSON lines.

One invocation of ``python -m benchmarks`` does, in this order:

1. creates a temporary workspace (``ferry-bench-*`` in the system temp folder,
   or under ``--tmpdir``) holding a fresh ``PREFECT_HOME`` and the data, and
   sets the Prefect environment *before* Prefect is imported
   (:func:`prepare_environment`);
2. runs the start-up probe: the first flow call of the process, a one-row
   Ferry run into the counting sink. Prefect starts its ephemeral API server
   during this call; ``startup_seconds`` is that call's wall time minus its
   data path (see :class:`Startup`);
3. per route: starts the route's services (none for the first routes), runs an
   unmeasured warm-up (``--warmup-rows``, Ferry and baseline once each), then
   per row count prepares the input (outside every clock) and alternates
   ``--repeat`` Ferry runs with ``--repeat`` baseline runs (F, B, F, B, ...),
   each under an :class:`RssSampler`;
4. builds one record per (route, row count) from the medians
   (:func:`build_record`) and hands it to ``emit`` as soon as the
   measurement is complete.

With ``--vary`` (:mod:`benchmarks.sweep`) step 3 runs once per value of each
swept setting, with one warm-up and one start of the services per route.

The workspace's data of every measurement is removed as soon as that
measurement is done; the whole workspace is removed at the end (see
:class:`Workspace`).
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

#: Seconds between two RSS samples.
SAMPLE_INTERVAL = 0.05

#: Rows of the unmeasured warm-up run of each route (0 disables it).
DEFAULT_WARMUP_ROWS = 65_536

#: Environment the harness sets before Prefect is imported.
PREFECT_ENV_DEFAULTS = {
    # Generous: on a busy 2-core machine the ephemeral server can take >20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


class HarnessError(RuntimeError):
    """A run did not do what the benchmark needs (wrong row count, missing output...)."""


def log(message: str) -> None:
    """A progress message (stderr; stdout carries only the JSON lines)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (the mean of the two middle values for an even count)."""
    items = [float(v) for v in values]
    if not items:
        raise ValueError("median of no values")
    return float(statistics.median(items))


# -- workspace and Prefect environment ------------------------------------------


class Workspace:
    """A temporary folder for one invocation: ``prefect-home/`` and ``data/``.

    :meth:`remove_data` drops the (possibly large) data as soon as the runs
    are over; :meth:`close` removes everything. The command line registers
    :meth:`close` with :mod:`atexit` *before* Prefect is imported, so it runs
    after Prefect's own exit handlers (atexit runs them last-in, first-out):
    the ephemeral API server is stopped before its database folder goes.
    """

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=parent))
        self.prefect_home = self.root / "prefect-home"
        self.data = self.root / "data"
        self.prefect_home.mkdir()
        self.data.mkdir()

    def remove_data(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_environment(workspace: Workspace) -> None:
    """Point Prefect at the workspace's fresh ``PREFECT_HOME`` (must run before Prefect is imported)."""
    if "prefect" in sys.modules:
        raise HarnessError(
            "prefect was imported before the benchmark set PREFECT_HOME; "
            "run the benchmarks as `python -m benchmarks ...` in a fresh process"
        )
    os.environ["PREFECT_HOME"] = str(workspace.prefect_home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    for key, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    api_url = os.environ.pop("PREFECT_API_URL", None)
    if api_url:
        log(f"ignoring PREFECT_API_URL={api_url}: the benchmarks always measure Prefect's ephemeral server")


# -- RSS sampling ------------------------------------------------------------------


def is_prefect_server(cmdline: Sequence[str]) -> bool:
    """Whether a process command line is a Prefect API server.

    Prefect 3's ephemeral server (``SubprocessASGIServer``) runs as a child::

        <python> -m uvicorn --app-dir <site-packages> --factory
            prefect.server.api.server:create_app --host 127.0.0.1 --port N ...

    and a user-started one as ``prefect server start``. A command line counts
    when it mentions ``prefect`` and either ``uvicorn`` or a ``server``
    argument / ``prefect.server`` module.
    """
    text = " ".join(cmdline).lower()
    if "prefect" not in text:
        return False
    if "uvicorn" in text or "prefect.server" in text:
        return True
    return any(arg.lower() == "server" for arg in cmdline)


@dataclass
class RssPeaks:
    """Peaks seen by one :class:`RssSampler` (bytes)."""

    #: Highest sum of the RSS of this process and its children, Prefect server and services excluded.
    own: int = 0
    #: Highest sum of the RSS of the Prefect server process(es) and their children.
    prefect_server: int = 0
    #: Highest sum of the RSS of registered service processes (database servers...) and their children.
    services: int = 0
    #: The first sample of ``own`` (what the process held when the run began).
    start_own: int = 0
    samples: int = 0


class RssSampler:
    """Samples the RSS of a process tree every ``interval`` seconds in a background thread.

    Children are classified on every sample (a child that has just been
    forked still shows its parent's command line, so only positive matches
    are cached): a Prefect server (:func:`is_prefect_server`) and its
    descendants count as ``prefect_server``, the pids in ``service_pids`` and
    their descendants as ``services``, everything else (including this process)
    as ``own``. One sample is taken when the sampler starts and one when it
    stops, so even a run shorter than the interval is seen. The children are
    listed every :attr:`TREE_EVERY` samples (0.5 s): a child living shorter
    than that may be missed.
    """

    #: Samples between two listings of the children.
    TREE_EVERY = 10

    def __init__(self, interval: float = SAMPLE_INTERVAL, *, pid: int | None = None, service_pids: Iterable[int] = ()):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self._root = psutil.Process(pid or os.getpid())
        self._service_pids = set(service_pids)
        self._servers: dict[int, float] = {}  # pid -> create time of known Prefect servers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tree: list[tuple[Any, str]] | None = None
        self._count = 0
        self.peaks = RssPeaks()

    def _kind(self, proc: Any) -> str:
        psutil = self._psutil
        if proc.pid in self._service_pids:
            return "services"
        try:
            created = proc.create_time()
            if self._servers.get(proc.pid) == created:
                return "prefect_server"
            if is_prefect_server(proc.cmdline()):
                self._servers[proc.pid] = created
                return "prefect_server"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        return "own"

    def _refresh_tree(self) -> None:
        """List and classify the children (the costly part: psutil scans /proc)."""
        psutil = self._psutil
        try:
            children = self._root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            children = []
        kinds: dict[int, str] = {self._root.pid: "own"}
        parents: dict[int, int] = {}
        for child in children:
            try:
                parents[child.pid] = child.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kinds[child.pid] = self._kind(child)
        tree = []
        for child in children:
            if child.pid not in parents:
                continue
            kind = kinds[child.pid]
            if kind == "own":
                # A descendant of a server or a service belongs to it.
                ancestor = parents.get(child.pid)
                while ancestor in parents and kinds.get(ancestor) == "own":
                    ancestor = parents.get(ancestor)
                if ancestor is not None and kinds.get(ancestor) in ("prefect_server", "services"):
                    kind = kinds[ancestor]
            tree.append((child, kind))
        self._tree = tree

    def sample(self) -> tuple[int, int, int]:
        """One sample: (own, prefect_server, services) RSS in bytes; updates the peaks.

        The children are listed again every ``TREE_EVERY`` samples (and on the
        first and last one); in between only their RSS is read, which keeps the
        sampler's own cost near 0.1 ms a sample.
        """
        psutil = self._psutil
        if self._tree is None or self._count % self.TREE_EVERY == 0:
            self._refresh_tree()
        self._count += 1
        totals = {"own": 0, "prefect_server": 0, "services": 0}
        try:
            totals["own"] = self._root.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        for child, kind in self._tree or ():
            try:
                totals[kind] += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        with self._lock:
            peaks = self.peaks
            if peaks.samples == 0:
                peaks.start_own = totals["own"]
            peaks.samples += 1
            peaks.own = max(peaks.own, totals["own"])
            peaks.prefect_server = max(peaks.prefect_server, totals["prefect_server"])
            peaks.services = max(peaks.services, totals["services"])
        return totals["own"], totals["prefect_server"], totals["services"]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "RssSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> RssPeaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._tree = None  # the last sample lists the children again
        self.sample()
        return self.peaks

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- runs and records -------------------------------------------------------------


@dataclass
class FerryRun:
    """One measured Ferry run."""

    rows: int
    #: Ferry's own ``data_seconds``: first batch read .. last partition committed.
    data_seconds: float
    #: Wall time of the ``await migrate(...)`` call.
    end_to_end_seconds: float
    peak_rss_bytes: int
    rss_start_bytes: int
    prefect_server_rss_bytes: int
    services_rss_bytes: int = 0
    files: int | None = None


@dataclass
class BaselineRun:
    """One measured baseline run."""

    rows: int
    #: Data path: start of the first read .. end of the last write (set-up and discovery excluded).
    seconds: float
    #: The whole baseline call (dataset discovery and opening files included).
    end_to_end_seconds: float
    peak_rss_bytes: int
    rss_start_bytes: int


@dataclass
class Startup:
    """How long the first flow call of the process took to get going.

    ``startup_seconds`` counts from the start of the first flow call (the
    start-up probe, before any route): its wall time minus its data path, so
    it holds the ephemeral API server start, flow-run creation, planning,
    publishing and the run's artifacts. ``process_startup_seconds`` counts
    from the process start instead (``psutil.Process().create_time()``):
    interpreter start, imports and argument parsing are added on top.
    """

    startup_seconds: float
    process_startup_seconds: float
    first_flow_end_to_end_seconds: float


def environment_info() -> dict[str, Any]:
    """Versions and machine facts of a record (read without importing Prefect)."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "pyarrow": version("pyarrow"),
        "prefect": version("prefect"),
        "ferry": version("ferry"),
        "numpy": version("numpy"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _rate(rows: int, seconds: float) -> float | None:
    return rows / seconds if seconds > 0 else None


def build_record(
    *,
    route: str,
    baseline: str,
    rows: int,
    ferry_runs: Sequence[FerryRun],
    baseline_runs: Sequence[BaselineRun],
    startup: Startup,
    repeat: int,
    parallel: int,
    batch_size: int,
    environment: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """One JSON-line record from the runs of one measurement (route x row count).

    Times, rates and ``peak_rss_bytes`` are medians over the runs;
    ``prefect_server_rss_bytes`` is the highest Prefect-server RSS seen during
    the Ferry runs (the server is shared and long-lived, so its peak is a max).
    The per-run values are kept under ``runs``.
    """
    if not ferry_runs or not baseline_runs:
        raise ValueError("a record needs at least one Ferry run and one baseline run")
    seconds = median(r.data_seconds for r in ferry_runs)
    baseline_seconds = median(r.seconds for r in baseline_runs)
    rows_per_s = _rate(rows, seconds)
    baseline_rows_per_s = _rate(rows, baseline_seconds)
    ratio = rows_per_s / baseline_rows_per_s if rows_per_s and baseline_rows_per_s else None
    env = environment if environment is not None else environment_info()
    stamp = (timestamp or datetime.now(timezone.utc)).astimezone(timezone.utc)
    record: dict[str, Any] = {
        "route": route,
        "rows": rows,
        "seconds": round(seconds, 4),
        "rows_per_s": round(rows_per_s) if rows_per_s is not None else None,
        "baseline": baseline,
        "baseline_seconds": round(baseline_seconds, 4),
        "baseline_rows_per_s": round(baseline_rows_per_s) if baseline_rows_per_s is not None else None,
        "ratio": round(ratio, 4) if ratio is not None else None,
        "peak_rss_bytes": int(median(r.peak_rss_bytes for r in ferry_runs)),
        "baseline_peak_rss_bytes": int(median(r.peak_rss_bytes for r in baseline_runs)),
        "prefect_server_rss_bytes": max(r.prefect_server_rss_bytes for r in ferry_runs),
        "services_rss_bytes": max(r.services_rss_bytes for r in ferry_runs),
        "rss_start_bytes": int(median(r.rss_start_bytes for r in ferry_runs)),
        "baseline_rss_start_bytes": int(median(r.rss_start_bytes for r in baseline_runs)),
        "startup_seconds": round(startup.startup_seconds, 3),
        "process_startup_seconds": round(startup.process_startup_seconds, 3),
        "end_to_end_seconds": round(median(r.end_to_end_seconds for r in ferry_runs), 4),
        "overhead_seconds": round(median(r.end_to_end_seconds - r.data_seconds for r in ferry_runs), 4),
        "baseline_end_to_end_seconds": round(median(r.end_to_end_seconds for r in baseline_runs), 4),
        "files": ferry_runs[-1].files,
        "repeat": repeat,
        "parallel": parallel,
        "batch_size": batch_size,
        **env,
        "timestamp": stamp.isoformat(timespec="seconds"),
        "runs": {
            "seconds": [r.data_seconds for r in ferry_runs],
            "end_to_end_seconds": [round(r.end_to_end_seconds, 4) for r in ferry_runs],
            "peak_rss_bytes": [r.peak_rss_bytes for r in ferry_runs],
            "baseline_seconds": [round(r.seconds, 4) for r in baseline_runs],
            "baseline_peak_rss_bytes": [r.peak_rss_bytes for r in baseline_runs],
        },
    }
    return record


def json_line(record: dict[str, Any]) -> str:
    """A record as one JSON line (no newline inside, none at the end)."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


# -- orchestration --------------------------------------------------------------------


def _settle() -> None:
    """Give back what earlier runs left (outside every clock) so runs start alike."""
    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # an optional nicety of newer pyarrow versions
        pass


async def measure_startup(ctx: Any) -> Startup:
    """Run the start-up probe (the process's first flow call) and derive the start-up times."""
    import psutil

    from .routes import startup_probe

    process_started = psutil.Process().create_time()
    log("start-up probe: first flow call (Prefect starts its ephemeral API server now)")
    result = await startup_probe(ctx)
    overhead = result.wall_seconds - float(result.summary["data_seconds"])
    startup = Startup(
        startup_seconds=overhead,
        process_startup_seconds=(result.started_at - process_started) + overhead,
        first_flow_end_to_end_seconds=result.wall_seconds,
    )
    log(
        f"start-up: {startup.startup_seconds:.2f}s from the first flow call, "
        f"{startup.process_startup_seconds:.2f}s from process start"
    )
    return startup


async def measure_ferry(route: Any, ctx: Any, rows: int) -> FerryRun:
    """One Ferry run of ``route`` under an RSS sampler."""
    _settle()
    with RssSampler(service_pids=ctx.service_pids) as sampler:
        result = await route.ferry(ctx, rows)
    peaks = sampler.peaks
    summary = result.summary
    written = summary.get("rows_written")
    if written != rows:
        raise HarnessError(f"{route.name}: Ferry wrote {written} rows, expected {rows}")
    return FerryRun(
        rows=rows,
        data_seconds=float(summary["data_seconds"]),
        end_to_end_seconds=result.wall_seconds,
        peak_rss_bytes=peaks.own,
        rss_start_bytes=peaks.start_own,
        prefect_server_rss_bytes=peaks.prefect_server,
        services_rss_bytes=peaks.services,
        files=summary.get("files"),
    )


async def measure_baseline(route: Any, ctx: Any, rows: int) -> BaselineRun:
    """One baseline run of ``route`` under an RSS sampler (sync or async baselines)."""
    _settle()
    with RssSampler(service_pids=ctx.service_pids) as sampler:
        result = route.baseline(ctx, rows)
        if inspect.isawaitable(result):
            result = await result
    peaks = sampler.peaks
    if result.rows != rows:
        raise HarnessError(f"{route.name}: baseline {route.baseline_name} saw {result.rows} rows, expected {rows}")
    return BaselineRun(
        rows=rows,
        seconds=result.seconds,
        end_to_end_seconds=result.end_to_end_seconds,
        peak_rss_bytes=peaks.own,
        rss_start_bytes=peaks.start_own,
    )


async def measure(route: Any, ctx: Any, rows: int, *, repeat: int, startup: Startup) -> dict[str, Any]:
    """Prepare, then alternate ``repeat`` Ferry and baseline runs; returns the record."""
    try:
        if route.prepare is not None:
            log(f"{route.name} {rows:,} rows: preparing the input (not timed)")
            await route.prepare(ctx, rows)
        ferry_runs: list[FerryRun] = []
        baseline_runs: list[BaselineRun] = []
        for attempt in range(1, repeat + 1):
            run = await measure_ferry(route, ctx, rows)
            ferry_runs.append(run)
            log(
                f"{route.name} {rows:,} rows, run {attempt}/{repeat}: Ferry {run.data_seconds:.3f}s data path "
                f"({rows / run.data_seconds if run.data_seconds else 0:,.0f} rows/s), "
                f"{run.end_to_end_seconds:.2f}s end to end, peak RSS {run.peak_rss_bytes / 2**20:,.0f} MiB"
            )
            base = await measure_baseline(route, ctx, rows)
            baseline_runs.append(base)
            log(
                f"{route.name} {rows:,} rows, run {attempt}/{repeat}: {route.baseline_name} {base.seconds:.3f}s "
                f"({rows / base.seconds if base.seconds else 0:,.0f} rows/s), "
                f"peak RSS {base.peak_rss_bytes / 2**20:,.0f} MiB"
            )
    finally:
        ctx.clean(route.name, rows)
    return build_record(
        route=route.name,
        baseline=route.baseline_name,
        rows=rows,
        ferry_runs=ferry_runs,
        baseline_runs=baseline_runs,
        startup=startup,
        repeat=repeat,
        parallel=ctx.parallel,
        batch_size=ctx.batch_size,
    )


async def warm_up(route: Any, ctx: Any, rows: int) -> None:
    """One unmeasured Ferry run and baseline run, so the measured ones start warm."""
    log(f"{route.name}: warm-up with {rows:,} rows (not measured)")
    try:
        if route.prepare is not None:
            await route.prepare(ctx, rows)
        await route.ferry(ctx, rows)
        result = route.baseline(ctx, rows)
        if inspect.isawaitable(result):
            await result
    finally:
        ctx.clean(route.name, rows)


async def run_benchmarks(
    routes: Sequence[Any],
    rows_list: Sequence[int],
    *,
    workdir: Path,
    repeat: int = 3,
    parallel: int = 2,
    batch_size: int = 65_536,
    warmup_rows: int = DEFAULT_WARMUP_ROWS,
    emit: Callable[[dict[str, Any]], None] = lambda record: None,
    settings: dict[str, int] | None = None,
    sweeps: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Measure every route at every row count; ``emit`` gets each record when it is complete.

    ``settings`` (``--set``) apply to every run; each of ``sweeps`` (``--vary``,
    :mod:`benchmarks.sweep`) measures the route once per value, after one warm-up.
    """
    from contextlib import AsyncExitStack

    from .sweep import SweepContext, sweep_points

    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    ctx = SweepContext(workdir=Path(workdir), parallel=parallel, batch_size=batch_size, settings=dict(settings or {}))
    # Routes with their own ``run`` start no flow: the probe (and Prefect) only when a route needs it.
    startup = await measure_startup(ctx) if any(getattr(r, "run", None) is None for r in routes) else None
    records = []

    def done(record: dict[str, Any]) -> None:
        record = ctx.annotate(record)
        records.append(record)
        emit(record)

    for route in routes:
        async with AsyncExitStack() as stack:
            if route.services is not None:
                log(f"{route.name}: starting services")
                await stack.enter_async_context(route.services(ctx))
            for number, point in enumerate(sweep_points(list(sweeps or []))):
                with ctx.point(*(point or ())):
                    if point:
                        log(f"{route.name}: {point[0]} = {point[1]:,}")
                    await _measure_route(
                        route, ctx, rows_list, repeat=repeat, warmup_rows=warmup_rows if number == 0 else 0,
                        startup=startup, emit=done,
                    )  # fmt: skip
    return records


async def _measure_route(
    route: Any,
    ctx: Any,
    rows_list: Sequence[int],
    *,
    repeat: int,
    warmup_rows: int,
    startup: Startup | None,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Warm up (unless ``warmup_rows`` is 0), then measure ``route`` at every row count."""
    if getattr(route, "run", None) is not None:
        if warmup_rows > 0:
            log(f"{route.name}: warm-up with {min(warmup_rows, max(rows_list)):,} rows (not measured)")
            await route.run(ctx, min(warmup_rows, max(rows_list)), 1)
            ctx.check_applied(route.name)  # before spending a measurement on a setting that does nothing
        for rows in rows_list:
            lines = await route.run(ctx, rows, repeat)
            ctx.check_applied(route.name)
            for record in lines:
                emit(record)
        return
    if warmup_rows > 0:
        await warm_up(route, ctx, warmup_rows)
        ctx.check_applied(route.name)
    for rows in rows_list:
        record = await measure(route, ctx, rows, repeat=repeat, startup=startup)
        ctx.check_applied(route.name)
        emit(record)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a service process started by a route: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
