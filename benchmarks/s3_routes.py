"""Benchmark routes of the S3 object store: ``memory-to-s3``, ``s3-to-memory``, ``s3-many-files``.

Each route's ``services`` start their own ``moto_server`` (moto[server] from
PyPI: a real S3 API over HTTP) on 127.0.0.1 and a free port, create a bucket,
and stop the server by process id afterwards. The server keeps objects in
its own memory, reported as ``services_rss_bytes``.

Both sides use the same filesystem class for data bytes: s3fs wrapped in
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))`` with s3fs's defaults (the
class Ferry uses by default on S3; see docs/object-stores.md for the
measurement behind that choice).

* ``memory-to-s3``: generated orders -> Parquet on S3 through Ferry (replace,
  verify off); baseline: one bare ``pyarrow.parquet.ParquetWriter`` writing
  the same generator batches to one object (snappy).
* ``s3-to-memory``: the Parquet dataset Ferry wrote (prepared outside the
  clocks) -> Ferry's counting sink; baseline:
  ``pyarrow.dataset.dataset(files).to_batches(batch_size=B)`` over the same
  objects, counting rows.
* ``s3-many-files``: the same as ``s3-to-memory`` over 200 files (one read
  partition each, ``--parallel P`` in flight); run it with ``--parallel 1``
  and ``--parallel 4`` to see what parallel partitions bring.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from .harness import HarnessError, log, stop_process
from .routes import BaselineResult, FerryResult, Route, RunContext, _generated_orders, register

MEMORY_TO_S3 = "memory-to-s3"
S3_TO_MEMORY = "s3-to-memory"
S3_MANY_FILES = "s3-many-files"
MANY_FILES = 200

BUCKET = "ferry-bench"
KEY = "bench-key"
SECRET = "bench-secret"
_ENDPOINT = ("s3", "endpoint")


def _moto_binary() -> str:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        raise HarnessError("moto_server is not installed: `.venv/bin/pip install 'moto[server]'`")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, endpoint: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"moto_server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise HarnessError(f"moto_server did not answer on {endpoint} within {timeout:.0f} s")


@asynccontextmanager
async def moto_service(ctx: RunContext) -> AsyncIterator[str]:
    """Start moto_server for this route, create the bucket; its pid joins ``ctx.service_pids``."""
    # s3fs must get the region from the environment, never as region_name in client_kwargs.
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    # Jobs name the credentials as ${ENV} references: secrets are never flow-run parameters.
    os.environ["FERRY_BENCH_S3_KEY"] = KEY
    os.environ["FERRY_BENCH_S3_SECRET"] = SECRET
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [_moto_binary(), "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(_wait_ready, process, endpoint)
        await asyncio.to_thread(lambda: _s3fs(endpoint).mkdir(BUCKET))
        ctx.service_pids.add(process.pid)
        ctx.state[_ENDPOINT] = endpoint
        log(f"moto_server {endpoint} (pid {process.pid}), bucket {BUCKET}")
        yield endpoint
    finally:
        ctx.service_pids.discard(process.pid)
        ctx.state.pop(_ENDPOINT, None)
        stop_process(process)


def _endpoint(ctx: RunContext) -> str:
    try:
        return ctx.state[_ENDPOINT]
    except KeyError:
        raise HarnessError("the moto S3 service is not running") from None


def _s3fs(endpoint: str):
    """The baselines' s3fs client: s3fs's defaults, as Ferry's (no region_name in client_kwargs)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY, secret=SECRET, endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False,
        config_kwargs={"s3": {"addressing_style": "path"}},
    )


def _arrow_fs(endpoint: str):
    import pyarrow.fs as pafs

    fs = _s3fs(endpoint)
    return fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _s3_endpoint_settings(ctx: RunContext, prefix: str, dataset: str) -> dict[str, Any]:
    return {
        "backend": "s3",
        "url": f"s3://{BUCKET}/{prefix}",
        "endpoint_url": _endpoint(ctx),
        "path_style": True,
        "key": "${FERRY_BENCH_S3_KEY}",
        "secret": "${FERRY_BENCH_S3_SECRET}",
        "dataset": dataset,
    }


# -- memory-to-s3 ---------------------------------------------------------------------------


async def ferry_memory_to_s3(ctx: RunContext, rows: int) -> FerryResult:
    """Generated orders -> Parquet on S3 through Ferry (replace, verify off)."""
    job = ctx.job(
        "bench-memory-to-s3",
        source=_generated_orders(ctx, rows),
        target=_s3_endpoint_settings(ctx, f"{MEMORY_TO_S3}/{rows}", "orders"),
    )
    return await ctx.run_job(job)


def pyarrow_parquetwriter_s3(ctx: RunContext, rows: int) -> BaselineResult:
    """The same generator batches -> one bare ``ParquetWriter`` on an s3fs output stream (snappy)."""
    import pyarrow.parquet as pq

    from ferry.backends.generator import ORDERS_SCHEMA, generate_batches

    started = time.perf_counter()
    _, arrow_fs = _arrow_fs(_endpoint(ctx))
    path = f"{BUCKET}/{MEMORY_TO_S3}/{rows}/baseline/orders.parquet"
    written = 0
    clock = time.perf_counter()
    with arrow_fs.open_output_stream(path, compression=None) as stream:
        with pq.ParquetWriter(stream, ORDERS_SCHEMA, compression="snappy") as writer:
            for batch in generate_batches(0, rows, seed=ctx.seed, batch_rows=ctx.batch_size):
                writer.write_batch(batch)
                written += batch.num_rows
    ended = time.perf_counter()
    return BaselineResult(rows=written, seconds=ended - clock, end_to_end_seconds=ended - started)


register(
    Route(
        name=MEMORY_TO_S3,
        description="generated orders -> Parquet on S3 (moto server; Ferry's migrate flow, replace, verify off)",
        ferry=ferry_memory_to_s3,
        baseline_name="pyarrow-parquetwriter-s3fs",
        baseline=pyarrow_parquetwriter_s3,
        services=moto_service,
    )
)


# -- s3-to-memory and s3-many-files ------------------------------------------------------------


async def _prepare(ctx: RunContext, route: str, rows: int, files: int | None) -> None:
    """Write the input once with Ferry (outside every clock); both sides read these objects."""
    source = _generated_orders(ctx, rows)
    if files is not None:
        source["partition_rows"] = max(1, math.ceil(rows / files))
    target = _s3_endpoint_settings(ctx, f"{route}/{rows}", "orders")
    job = ctx.job(f"bench-prepare-{route}", source=source, target=target)
    result = await ctx.run_job(job)
    if result.summary.get("rows_written") != rows:
        raise HarnessError(f"preparing {route} wrote {result.summary.get('rows_written')} rows, expected {rows}")
    folder = result.summary["output"].removeprefix("s3://")
    fs, _ = _arrow_fs(_endpoint(ctx))
    objects = sorted(p for p in await asyncio.to_thread(fs.find, folder) if p.endswith(".parquet"))
    if files is not None and len(objects) != min(files, rows):
        raise HarnessError(f"preparing {route} left {len(objects)} objects, expected {files}")
    size = sum(fs.info(p)["size"] for p in objects[:5]) / max(1, min(5, len(objects)))
    ctx.state[(route, rows, "input")] = {"target": target, "files": objects}
    log(f"{route} {rows:,} rows: input is {len(objects)} object(s) of about {size / 2**20:,.1f} MiB in s3://{folder}")


async def prepare_s3_input(ctx: RunContext, rows: int) -> None:
    await _prepare(ctx, S3_TO_MEMORY, rows, None)


async def prepare_many_files(ctx: RunContext, rows: int) -> None:
    await _prepare(ctx, S3_MANY_FILES, rows, MANY_FILES)


def _input(ctx: RunContext, route: str, rows: int) -> dict[str, Any]:
    try:
        return ctx.state[(route, rows, "input")]
    except KeyError:
        raise HarnessError(f"{route}: no prepared input for {rows} rows") from None


async def _ferry_read(ctx: RunContext, route: str, rows: int) -> FerryResult:
    job = ctx.job(
        f"bench-{route}",
        source=_input(ctx, route, rows)["target"],
        target={"backend": "memory", "dataset": "sink", "discard": True},
    )
    return await ctx.run_job(job)


def _pyarrow_read(ctx: RunContext, route: str, rows: int) -> BaselineResult:
    import pyarrow.dataset as pads

    files = _input(ctx, route, rows)["files"]
    started = time.perf_counter()
    _, arrow_fs = _arrow_fs(_endpoint(ctx))
    dataset = pads.dataset(files, format="parquet", filesystem=arrow_fs)
    seen = 0
    clock = time.perf_counter()
    for batch in dataset.to_batches(batch_size=ctx.batch_size):
        seen += batch.num_rows
    ended = time.perf_counter()
    return BaselineResult(rows=seen, seconds=ended - clock, end_to_end_seconds=ended - started)


async def ferry_s3_to_memory(ctx: RunContext, rows: int) -> FerryResult:
    """The prepared Parquet objects -> Ferry's counting sink (keeps nothing)."""
    return await _ferry_read(ctx, S3_TO_MEMORY, rows)


def pyarrow_dataset_s3(ctx: RunContext, rows: int) -> BaselineResult:
    """``pyarrow.dataset.dataset(files, filesystem=s3fs).to_batches(batch_size=B)``, counting rows."""
    return _pyarrow_read(ctx, S3_TO_MEMORY, rows)


async def ferry_s3_many_files(ctx: RunContext, rows: int) -> FerryResult:
    """200 prepared Parquet objects -> Ferry's counting sink, one partition per object."""
    return await _ferry_read(ctx, S3_MANY_FILES, rows)


def pyarrow_dataset_many(ctx: RunContext, rows: int) -> BaselineResult:
    """``pyarrow.dataset`` over the same 200 objects (its own fragment read-ahead), counting rows."""
    return _pyarrow_read(ctx, S3_MANY_FILES, rows)


register(
    Route(
        name=S3_TO_MEMORY,
        description="Parquet on S3 (moto server, written by Ferry) -> Ferry's counting sink",
        ferry=ferry_s3_to_memory,
        baseline_name="pyarrow-dataset-s3fs",
        baseline=pyarrow_dataset_s3,
        prepare=prepare_s3_input,
        services=moto_service,
    )
)

register(
    Route(
        name=S3_MANY_FILES,
        description=f"{MANY_FILES} Parquet objects on S3 (moto server) -> Ferry's counting sink, parallel partitions",
        ferry=ferry_s3_many_files,
        baseline_name="pyarrow-dataset-s3fs",
        baseline=pyarrow_dataset_many,
        prepare=prepare_many_files,
        services=moto_service,
    )
)
