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
        f"- **Verification**: {verification['status']} ({verification.get('method', '')})"
        + (f"; {verification['note']}" if verification.get("note") else ""),
    ]
    if summary["rejects_files"]:
        lines.append("- **Rejects**: " + ", ".join(f"`{p}`" for p in summary["rejects_files"]))
    lines.extend(unreadable_markdown(summary.get("unreadable_files") or [], summary.get("unreadable_report")))
    lines.extend(stage_markdown(summary.get("stages") or {}))
    return "\n".join(lines)


def unreadable_markdown(entries: list[dict[str, Any]], report: str | None) -> list[str]:
    """Markdown lines naming the source files a run could not read and left out (none when all were read)."""
    if not entries:
        return []
    lines = [
        "",
        "## Source files not read",
        "",
        f"Left out under `on_error: collect`; listed in `{report}`." if report else "Left out under `on_error: collect`.",
        "",
        "| file | step | rows loaded before the failure | reason |",
        "| --- | --- | ---: | --- |",
    ]
    for entry in entries:
        reason = str(entry["reason"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{entry['object']}` | {entry['step']} | {entry['rows_read']:,} | {reason} |")
    return lines


#: Stages in pipeline order, as the summary's ``stages`` names them.
STAGE_ORDER = ("read", "transform", "write", "commit")


def stage_markdown(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of a table of batch times per stage (none when nothing was timed)."""
    if not stages:
        return []
    lines = [
        "",
        "## Stage batch times",
        "",
        "| stage | batches | avg ms | p50 ms | p95 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = [n for n in STAGE_ORDER if n in stages] + sorted(n for n in stages if n not in STAGE_ORDER)
    for name in names:
        s = stages[name]
        lines.append(
            f"| {name} | {s['count']:,} | {s['avg_ms']:.3f} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['max_ms']:.3f} |"
        )
    return lines


async def publish_artifacts(summary: dict[str, Any]) -> None:
    """Publish the per-partition table and the markdown summary as Prefect artifacts.

    The run's batch times per stage (``ferry.tasks.pipeline.stage_monitor``)
    are added to ``summary`` under ``"stages"`` (count, avg, min, max, p50,
    p95, p99 in ms per stage) and shown in the markdown summary.
    """
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    from .pipeline import pop_stage_timings

    stages = pop_stage_timings(summary["run_id"])
    if stages:
        summary.setdefault("stages", stages)
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
    """Publish what a failed or interrupted run left behind: its committed partitions (and its stage times)."""
    from prefect.artifacts import acreate_markdown_artifact

    from .pipeline import pop_stage_timings

    lines = [
        f"# Ferry run `{run_id}` of job `{job}` stopped",
        "",
        f"- **Reason**: {reason}" + (f": {message}" if message else ""),
        "- **Unfinished output**: removed",
        "- **Committed partitions**: " + (", ".join(f"`{p}`" for p in committed) if committed else "none"),
    ]
    lines.extend(stage_markdown(pop_stage_timings(run_id)))
    try:
        await acreate_markdown_artifact(
            key=f"{artifact_key(job)}-summary",
            markdown="\n".join(lines),
            description=f"Ferry run {run_id} stopped",
        )
    except Exception as exc:
        logging.getLogger("ferry").warning("could not publish the stopped-run artifact: %s", exc)
