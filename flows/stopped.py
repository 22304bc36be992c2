"""Clean-up after a flow run that was cancelled or crashed outside the flow's own control.

A run that is cancelled gracefully removes its unfinished output itself (the
``migrate`` flow's ``except`` block calls the target's ``abort``). Prefect
cannot always give it that chance: a cancel the flow process does not
acknowledge within a second (a busy process), an out-of-memory kill or a
lost machine ends the process at once. For those, the flow's
``on_cancellation`` and ``on_crashed`` hooks run in the worker after the
process is gone: they find the run from the labels the flow put on its
flow run and ask the target to discard what that run left
(``Backend.discard_run``). Run again (in the flow process on a graceful
cancel, then in the worker), the clean-up finds nothing left to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

#: Flow-run labels that lead the clean-up hook to the run's output.
RUN_ID_LABEL = "ferry.run_id"
JOB_FILE_LABEL = "ferry.job_file"


async def label_flow_run(run_id: str, job_file: str | None) -> None:
    """Put the Ferry run id (and the job file's absolute path) on the current flow run.

    Best effort: a run whose labels cannot be written still runs; only the
    clean-up after a hard stop then has nothing to go on.
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    labels: dict[str, Any] = {RUN_ID_LABEL: run_id}
    if job_file is not None:
        labels[JOB_FILE_LABEL] = str(Path(job_file).resolve())
    try:
        async with get_client() as client:
            await client.update_flow_run_labels(context.flow_run.id, labels)
    except Exception as exc:  # the run matters more than its labels
        logging.getLogger("ferry.migrate").warning("could not label flow run %s: %s", context.flow_run.id, exc)


async def clean_up_stopped_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (``on_cancellation``, ``on_crashed``): discard the stopped run's unfinished output."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run)
    labels = dict(flow_run.labels or {})
    if RUN_ID_LABEL not in labels:
        # The hook may be handed the flow run as it was before the flow labelled it.
        try:
            async with get_client() as client:
                labels = dict((await client.read_flow_run(flow_run.id)).labels or {})
        except ObjectNotFound:
            pass
    run_id = labels.get(RUN_ID_LABEL)
    if not run_id:
        logger.info("no Ferry run started in this flow run: nothing to clean up")
        return
    job = _job_of(flow_run.parameters or {}, labels.get(JOB_FILE_LABEL))
    done = await discard_run_output(job, str(run_id))
    if done:
        for line in done:
            logger.info("run %s: %s", run_id, line)
    else:
        logger.info("run %s left nothing to clean up on %s", run_id, job.target.dataset)


async def discard_run_output(job: Any, run_id: str) -> list[str]:
    """What discarding ``run_id``'s unfinished output on the job's target did (one line each)."""
    from .spec import build_backend

    target = await build_backend(job.target)
    async with target:
        return await target.discard_run(job.target.dataset, run_id, job.mode)


def _job_of(parameters: dict[str, Any], job_file: str | None) -> Any:
    """The job of a flow run, read as the flow read it."""
    from .spec import JobSpec, job_from_dict, load_job

    overrides = parameters.get("overrides")
    if job_file is not None:
        return load_job(job_file, overrides)
    job = parameters.get("job")
    if isinstance(job, (str, os.PathLike)):
        return load_job(job, overrides)
    if isinstance(job, JobSpec):
        job = job.model_dump(mode="json")
    return job_from_dict(job, overrides=overrides)
