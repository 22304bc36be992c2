"""The ``migrate`` flow: plan partitions, run one pipeline per partition, publish, verify.

Partitions run at most ``stream.parallel`` at once. With ``runner: async``
(the default) every partition's stage tasks run on the flow's event loop and
share its pools; with ``runner: threads`` each partition runs in a worker
thread of Prefect's thread pool task runner, on its own loop with its own
pools. Transient errors retry a partition (Prefect task retries); writes are
idempotent per (run, partition), so a retry never duplicates data. If the run
fails or is interrupted, the target's ``abort`` removes this run's unfinished
output and the summary lists what was committed; when Prefect ends the flow
process before that can run, the worker does it (see ``stopped``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from ferry.backends.base import Backend, Partition, ReadPolicy, WriteContext, WriteMode
from ferry.backends.checksum import Checksum
from ferry.backends.errors import ConfigurationError, FerryError, TransientBackendError
from ferry.tasks.pipeline import PartitionJob, _logger, migrate_partition
from ferry.tasks.progress import RunTracker, tracker_for
from ferry.tasks.rejects import write_unreadable_files
from ferry.tasks.report import publish_artifacts, publish_stopped_artifact

from .planning import Plan, plan_job
from .spec import JobSpec, build_backend, job_from_dict, literal_secrets, load_job
from .stopped import clean_up_stopped_run, label_flow_run

#: How often the flow logs progress on long runs.
PROGRESS_LOG_SECONDS = 15.0


class VerificationError(FerryError):
    """The target does not hold what the run wrote."""

    kind = "verification"


def new_run_id() -> str:
    """A sortable, file-name-safe run id such as ``20261126T071500-3fa2c1``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a partition only after a transient backend error."""
    return isinstance(getattr(state, "data", None), TransientBackendError)


@task(name="plan", cache_policy=NO_CACHE, persist_result=False)
async def plan_task(job: JobSpec, source: Backend, target: Backend) -> Plan:
    """Plan the run (partitions, schemas, schema policy) against the real stores."""
    plan = await plan_job(job, source, target)
    _logger().info(
        "planned %d partition(s), about %s rows: %s -> %s",
        len(plan.partitions),
        f"{plan.estimated_rows:,}" if plan.estimated_rows is not None else "unknown",
        source.describe(),
        target.describe(),
    )
    if plan.direct_note is not None:
        _logger().info("COPY fast path: %s", plan.direct_note)
    return plan


@task(name="verify", cache_policy=NO_CACHE, persist_result=False)
async def verify_task(
    target: Backend,
    dataset: str,
    expected: Checksum,
    rows_written: int,
    ctx: WriteContext,
    target_existed: bool,
    parallel: int,
    batch_rows: int,
) -> dict[str, Any]:
    """Read the target back and compare row count and order-independent checksum."""
    result: dict[str, Any] = {
        "rows_expected": expected.rows,
        "checksum_expected": expected.hexdigest(),
    }
    if not target.effective_capabilities.readable_after_write:
        ok = rows_written == expected.rows
        result.update(status="passed" if ok else "failed", method="row count (the target keeps no data)")
        result["rows_found"] = rows_written
        return result
    partitions = await target.partitions(dataset, hint=parallel)
    if target_existed and ctx.mode is not WriteMode.REPLACE:
        own = target.partitions_written_by(ctx.run_id, partitions)
        if own is None:
            result.update(status="skipped", method="the target held data before this run")
            return result
        partitions = own
    found = Checksum()
    gate = asyncio.Semaphore(parallel)

    async def read_one(part: Partition) -> Checksum:
        async with gate:
            local = Checksum()
            async for batch in target.read(part, batch_rows=batch_rows):
                await asyncio.to_thread(local.update, batch)
            return local

    for partial in await asyncio.gather(*(read_one(p) for p in partitions)):
        found = found.combine(partial)
    ok = found.rows == expected.rows and found.value == expected.value
    result.update(
        status="passed" if ok else "failed",
        method="row count and order-independent checksum",
        rows_found=found.rows,
        checksum_found=found.hexdigest(),
    )
    return result


@flow(
    name="ferry-migrate",
    log_prints=False,
    # A run stopped before it could clean up (a hard cancel, a crash) is cleaned up by the worker.
    on_cancellation=[clean_up_stopped_run],
    on_crashed=[clean_up_stopped_run],
)
async def migrate(job: JobSpec | str, overrides: list[str] | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Move a dataset from a source to a target as described by a job.

    Returns the run summary (also published as Prefect artifacts).

    Args:
        job: The job: the path of a job file (relative to the worker's folder),
            or the job's settings (source, target, where, transforms, mode,
            stream). Secrets come from saved blocks or ${ENV} references.
        overrides: Settings applied on top of the job, as key=value
            (like `ferry run --set`), e.g. stream.parallel=4.
        run_id: The run id that names files and rejects; a new one when empty.
            Give a failed run's id to resume it.
    """
    job_file = None
    if isinstance(job, (str, os.PathLike)):
        job_file = str(job)
        job = load_job(job, overrides)
    else:
        # A job given as parameters is stored in plain text by Prefect: secrets
        # must come from a saved block or an ${ENV_VAR} reference, resolved here.
        secrets = literal_secrets(job)
        if secrets:
            raise ConfigurationError(
                "secret values cannot be flow-run parameters (Prefect stores parameters in plain text); "
                "save them in a block and name it with `block:`, or write ${ENV_VAR}",
                source="parameters",
                path=secrets[0],
            )
        job = job_from_dict(job.model_dump(mode="json"), overrides=overrides)
    run_id = run_id or new_run_id()
    await label_flow_run(run_id, job_file)
    tracker = tracker_for(run_id)
    tracker.keeps_committed_on_stop = job.mode is not WriteMode.REPLACE
    logger = _logger()
    started = time.monotonic()
    source = await build_backend(job.source)
    # on_error also decides what the source does with a file it cannot read:
    # fail naming it, or (collect) leave it out and report it.
    source.set_read_policy(ReadPolicy(on_error=job.on_error))
    target = await build_backend(job.target)
    async with source, target:
        plan = await plan_task.with_options(task_run_name=f"plan {job.name}")(quote(job), quote(source), quote(target))
        planned_unreadable = [entry.to_dict() for entry in source.unreadable_inputs()]
        for entry in planned_unreadable:
            logger.warning("%s is left out of the read: %s", entry["object"], entry["reason"])
        tracker.estimated_rows = plan.estimated_rows
        for part in plan.partitions:
            tracker.partition(part.id)
        ctx = WriteContext(
            run_id=run_id,
            job_name=job.name,
            mode=job.mode,
            schema=plan.decision.write_schema,
            key=tuple(job.key),
            on_error=job.on_error,
        )
        if plan.direct is not None:
            # The target creates or checks its tables for the direct copy (e.g. the source's column types).
            ctx.state["direct"] = plan.direct
        rejects_dir = str(Path(job.rejects_dir) / job.name / run_id)
        jobs = [
            PartitionJob(
                partition=part,
                source=source,
                target=target,
                target_dataset=job.target.dataset,
                columns=job.source.columns,
                where=plan.where,
                chain=plan.chain,
                conform=plan.decision,
                conform_needed=not plan.decision.write_schema.equals(plan.output_schema),
                write_ctx=ctx,
                stream=job.stream,
                tracker=tracker,
                rejects_dir=rejects_dir,
                key=job.key,
                on_error=job.on_error,
                max_rejected_rows=job.max_rejected_rows,
                verify=job.verify,
                direct=plan.direct,
            )
            for part in plan.partitions
        ]
        store_tags = sorted({source.concurrency_tag(), target.concurrency_tag()})
        limited_tags = await tags_with_concurrency_limits(store_tags)
        logger.info(
            "run %s: %d partition(s), parallel %d, store tags %s (%s)",
            run_id,
            len(jobs),
            job.stream.parallel,
            ", ".join(store_tags),
            "concurrency limits on " + ", ".join(limited_tags) if limited_tags else "no concurrency limits set",
        )
        reporter = asyncio.ensure_future(_log_progress(tracker))
        await target.begin_write(job.target.dataset, ctx)
        try:
            if job.runner == "threads":
                results = await _run_in_threads(jobs, job, limited_tags)
            else:
                results = await _run_on_loop(jobs, job, limited_tags)
        except BaseException as exc:
            reporter.cancel()
            await asyncio.shield(target.abort(job.target.dataset, ctx))
            try:
                unread = planned_unreadable + [entry for j in jobs for entry in j.unreadable]
                await asyncio.shield(asyncio.to_thread(write_unreadable_files, rejects_dir, unread))
            except BaseException:  # the report must never hide the original error
                pass
            committed = tracker.kept_after_stop()
            logger.error(
                "run %s stopped (%s); this run's unfinished output was removed; committed partitions: %s",
                run_id,
                type(exc).__name__,
                ", ".join(committed) if committed else "none",
            )
            try:
                await asyncio.wait_for(
                    asyncio.shield(publish_stopped_artifact(job.name, run_id, type(exc).__name__, str(exc), committed)),
                    timeout=10,
                )
            except BaseException:  # the report must never hide the original error
                pass
            raise
        reporter.cancel()
        await target.publish(job.target.dataset, ctx)
        data_seconds = tracker.data_seconds()
        expected = Checksum()
        for result in results:
            expected = expected.combine(Checksum.from_dict(result["checksum"]))
        unreadable = planned_unreadable + [entry for result in results for entry in result["unreadable"]]
        unreadable_report = await asyncio.to_thread(write_unreadable_files, rejects_dir, unreadable)
        verification: dict[str, Any] = {"status": "skipped", "method": "verify: false"}
        if job.verify:
            verification = await verify_task.with_options(task_run_name=f"verify {job.target.dataset}")(
                quote(target),
                job.target.dataset,
                quote(expected),
                tracker.rows_written,
                quote(ctx),
                plan.target_schema is not None,
                job.stream.parallel,
                job.stream.batch_size,
            )
        if unreadable:
            verification = {
                **verification,
                "note": f"covers the rows read: {_files(len({e['object'] for e in unreadable}))} of the source "
                "could not be read and were left out",
            }
        summary = _summary(job, plan, tracker, results, verification, data_seconds, time.monotonic() - started)
        summary["unreadable_files"] = unreadable
        summary["unreadable_report"] = unreadable_report
    await publish_artifacts(summary)
    logger.info(
        "run %s finished: %s rows written in %.2fs (%s rows/s), verification %s",
        run_id,
        f"{summary['rows_written']:,}",
        data_seconds,
        f"{summary['rows_per_s']:,}",
        verification["status"],
    )
    if verification["status"] == "failed":
        raise VerificationError(
            f"verification failed: expected {verification['rows_expected']:,} rows "
            f"(checksum {verification['checksum_expected']}), found {verification.get('rows_found')} "
            f"(checksum {verification.get('checksum_found')})"
        )
    return summary


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


async def _run_on_loop(jobs: list[PartitionJob], job: JobSpec, tags: list[str]) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(job.stream.parallel)

    async def one(partition_job: PartitionJob) -> dict[str, Any]:
        async with gate:
            return await _partition_task(job, partition_job.pid, tags)(quote(partition_job))

    tasks = [asyncio.ensure_future(one(j)) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_in_threads(jobs: list[PartitionJob], job: JobSpec, tags: list[str]) -> list[dict[str, Any]]:
    with ThreadPoolTaskRunner(max_workers=job.stream.parallel) as runner:
        futures = [runner.submit(_partition_task(job, j.pid, tags), parameters={"job": quote(j)}) for j in jobs]
        try:
            return [await asyncio.to_thread(f.result) for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


async def tags_with_concurrency_limits(tags: list[str]) -> list[str]:
    """The store tags that have a Prefect tag concurrency limit (``tag:<tag>``), read once per run.

    Prefect asks the API for a slot of every tag a task carries, limit or
    not; on a busy server that round trip can stall a partition's start by
    seconds (a retried 503 from the database). So partition tasks carry only
    the tags that are limited. Should the lookup itself fail, every tag is
    kept: a limit is then still honoured.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    limited = []
    try:
        async with get_client() as client:
            for tag in tags:
                try:
                    await client.read_global_concurrency_limit_by_name(f"tag:{tag}")
                except ObjectNotFound:
                    continue
                limited.append(tag)
    except Exception as exc:
        _logger().warning("could not read the tag concurrency limits (%s); partition tasks carry every store tag", exc)
        return list(tags)
    return limited


def _partition_task(job: JobSpec, partition_id: str, tags: list[str]):
    # Only the partition task carries the store tags: its stage tasks run inside
    # it, so a tag concurrency limit counts one slot per partition in flight.
    return migrate_partition.with_options(
        task_run_name=f"partition {partition_id}",
        tags=tags,
        retries=job.retries,
        retry_delay_seconds=job.retry_delay_seconds,
        retry_condition_fn=_transient_only,
    )


async def _log_progress(tracker: RunTracker) -> None:
    """Log progress at a steady, low rate (never a line per batch)."""
    logger = _logger()
    while True:
        await asyncio.sleep(PROGRESS_LOG_SECONDS)
        snap = tracker.snapshot()
        rate = snap["rows_written"] / snap["elapsed"] if snap["elapsed"] else 0
        logger.info(
            "progress: %s rows written, %d/%d partitions done, %s rows/s",
            f"{snap['rows_written']:,}",
            snap["partitions_done"],
            snap["partitions"],
            f"{rate:,.0f}",
        )


def _summary(
    job: JobSpec,
    plan: Plan,
    tracker: RunTracker,
    results: list[dict[str, Any]],
    verification: dict[str, Any],
    data_seconds: float,
    end_to_end_seconds: float,
) -> dict[str, Any]:
    partitions = [tracker.partition(p.id) for p in plan.partitions]
    files = [f for p in partitions for f in p.files]
    rejects = [p.rejects_file for p in partitions if p.rejects_file]
    rows_written = tracker.rows_written
    return {
        "run_id": tracker.run_id,
        "job": job.name,
        "mode": job.mode.value,
        "source": plan.source.describe(),
        "target": plan.target.describe(),
        "target_dataset": job.target.dataset,
        "output": plan.target.location(job.target.dataset),
        "rows_read": tracker.rows_read,
        "rows_written": rows_written,
        "rows_rejected": tracker.rows_rejected,
        "data_seconds": round(data_seconds, 3),
        "end_to_end_seconds": round(end_to_end_seconds, 3),
        "rows_per_s": round(rows_written / data_seconds) if data_seconds > 0 else 0,
        "partitions": [p.as_row() for p in partitions],
        "files": len(files),
        "rejects_files": rejects,
        "verification": verification,
        "committed": tracker.committed(),
        "copy_fast_path": plan.direct is not None,
    }
