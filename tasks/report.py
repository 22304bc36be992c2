"""Run reports: the Prefect artifacts of a run (a table per partition and a markdown summary)."""

from __future__ import annotations

import logging
import re
from typing import Any


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "ferry-" + (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "job")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as markdown, for the Prefect UI."""
    verification = summary["verification"]
    lines = [
        f"# Ferry run `{summary['run_id']}` of job `{summary['job']}`",
        "",
        f"- **Mode**: {summary['mode']}",
        f"- **Source**: {summary['source']}",
        f"- **Target**: {summary['target']} (`{summary['output']}`)",
        f"- **Rows**: {summary['rows_read']:,} read, {summary['rows_written']:,} written, "
        f"{summary['rows_rejected']:,} rejected",
        f"- **Throughput**: {summary['rows_per_s']:,} rows/s over {summary['data_seconds']}s of data path "
        f"({summary['end_to_end_seconds']}s end to end)",
        f"- **Files**: {summary['files']}",
        f"- **Verification**: {verification['status']} ({verification.get('method', '')})",
    ]
    if summary["rejects_files"]:
        lines.append("- **Rejects**: " + ", ".join(f"`{p}`" for p in summary["rejects_files"]))
    return "\n".join(lines)


async def publish_artifacts(summary: dict[str, Any]) -> None:
    """Publish the per-partition table and the markdown summary as Prefect artifacts."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    key = artifact_key(summary["job"])
    try:
        await acreate_table_artifact(
            key=key,
            table=summary["partitions"],
            description=f"Ferry run {summary['run_id']}: one row per partition",
        )
        await acreate_markdown_artifact(
            key=f"{key}-summary",
            markdown=summary_markdown(summary),
            description=f"Ferry run {summary['run_id']} summary",
        )
    except Exception as exc:  # an artifact is a report: never fail a finished run for it
        logging.getLogger("ferry").warning("could not publish the run artifacts: %s", exc)


async def publish_stopped_artifact(job: str, run_id: str, reason: str, message: str, committed: list[str]) -> None:
    """Publish what a failed or interrupted run left behind: its committed partitions."""
    from prefect.artifacts import acreate_markdown_artifact

    lines = [
        f"# Ferry run `{run_id}` of job `{job}` stopped",
        "",
        f"- **Reason**: {reason}" + (f": {message}" if message else ""),
        "- **Unfinished output**: removed",
        "- **Committed partitions**: " + (", ".join(f"`{p}`" for p in committed) if committed else "none"),
    ]
    try:
        await acreate_markdown_artifact(
            key=f"{artifact_key(job)}-summary",
            markdown="\n".join(lines),
            description=f"Ferry run {run_id} stopped",
        )
    except Exception as exc:
        logging.getLogger("ferry").warning("could not publish the stopped-run artifact: %s", exc)
