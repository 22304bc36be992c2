"""The ``ferry`` command: run, plan, validate and repair job files.

Exit codes: 0 success, 1 run failure, 2 invalid job or settings, 130 interrupted.
Failures print one line saying what went wrong; ``--debug`` adds the traceback.
``validate`` and ``plan`` start no Prefect API unless the job names a saved block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
import warnings
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Move data between stores as Prefect flows.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("job", help="path of the job file (YAML)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a job setting, e.g. --set stream.parallel=4 (repeatable)",
        )
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        return sub

    run = add_job_command("run", "Run a job as a Prefect flow and print its summary.")
    run.add_argument("--run-id", help="run id (default: a new one); files and rejects are named after it")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--verbose", action="store_true", help="show Prefect's logs in the terminal")
    plan = add_job_command("plan", "Dry run: partitions, schemas, type mapping and target changes; writes nothing.")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_job_command("validate", "Check a job file and its settings without touching any store.")
    add_job_command(
        "repair",
        "Clean up what a crashed run left on the job's target (unfinished indexes, saved load settings).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferry`` console script."""
    args = _parser().parse_args(argv)
    debug = args.debug
    if not getattr(args, "verbose", False):
        # Prefect's log lines (and task tracebacks) still reach the API and the UI;
        # the terminal shows Ferry's progress, summary and one-line errors instead.
        # Must be set before Prefect is imported.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # Ferry runs offline as often as not; Prefect's telemetry would only log failures.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    from ferry.backends.errors import ConfigurationError, FerryError

    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "plan":
            return asyncio.run(_plan(args))
        if args.command == "repair":
            return asyncio.run(_repair(args))
        return _run(args)
    except ConfigurationError as exc:
        return _fail(f"invalid job: {exc}", debug, EXIT_CONFIG)
    except FerryError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", debug, EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one-line promise holds for surprises too
        return _fail(f"unexpected {type(exc).__name__}: {exc}", debug, EXIT_FAILED)


def _fail(message: str, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exc()
    print(f"ferry: {message}", file=sys.stderr)
    return code


def _validate(args: argparse.Namespace) -> int:
    from .spec import load_job

    job = load_job(args.job, args.overrides)
    print(
        f"{args.job}: valid job {job.name!r}: {job.mode.value} "
        f"{job.source.backend or job.source.block}:{job.source.dataset} -> "
        f"{job.target.backend or job.target.block}:{job.target.dataset}"
    )
    return EXIT_OK


async def _plan(args: argparse.Namespace) -> int:
    from .planning import plan_job
    from .spec import build_backend, load_job

    job = load_job(args.job, args.overrides)
    source = await build_backend(job.source)
    target = await build_backend(job.target)
    async with source, target:
        plan = await plan_job(job, source, target)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(plan.render())
    return EXIT_OK


async def _repair(args: argparse.Namespace) -> int:
    from .spec import build_backend, load_job

    job = load_job(args.job, args.overrides)
    target = await build_backend(job.target)
    async with target:
        done = await target.repair(job.target.dataset)
    where = target.location(job.target.dataset)
    if not done:
        print(f"{where}: nothing to repair")
    for line in done:
        print(f"{where}: {line}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ferry.backends.errors import FerryError

    from .migrate import migrate, new_run_id
    from .spec import load_job
    from ferry.tasks.progress import tracker_for

    job = load_job(args.job, args.overrides)  # invalid jobs fail before Prefect starts
    run_id = args.run_id or new_run_id()
    tracker = tracker_for(run_id)
    show_progress = not args.no_progress and not args.json and sys.stderr.isatty()
    print(f"ferry: running job {job.name!r} as run {run_id} (starting Prefect)...", file=sys.stderr)

    stop_progress = threading.Event()
    progress_thread = None
    if show_progress:
        progress_thread = threading.Thread(target=_progress_bar, args=(tracker, stop_progress), daemon=True)
    else:
        progress_thread = threading.Thread(target=_progress_lines, args=(tracker, stop_progress), daemon=True)
    progress_thread.start()

    interrupted = {"signal": None}

    async def runner() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            if interrupted["signal"] is not None:
                os._exit(EXIT_INTERRUPTED)  # a second signal: stop now
            interrupted["signal"] = signum
            print(f"\nferry: {signal.Signals(signum).name} received: stopping, cleaning up...", file=sys.stderr)
            main_task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        # The flow gets the file path, not the loaded job: parameters are stored in
        # plain text, and the job's ${ENV_VAR} secrets must be resolved inside the run.
        return await migrate(job=str(Path(args.job).resolve()), overrides=list(args.overrides), run_id=run_id)

    try:
        summary = asyncio.run(runner())
    except (asyncio.CancelledError, KeyboardInterrupt):
        stop_progress.set()
        progress_thread.join(timeout=2)
        _print_interrupted(tracker)
        return EXIT_INTERRUPTED
    except FerryError:
        stop_progress.set()
        progress_thread.join(timeout=2)
        _print_committed(tracker)
        raise
    except BaseException:
        stop_progress.set()
        progress_thread.join(timeout=2)
        if interrupted["signal"] is not None:
            _print_interrupted(tracker)
            return EXIT_INTERRUPTED
        _print_committed(tracker)
        raise
    stop_progress.set()
    progress_thread.join(timeout=2)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render_summary(summary))
    return EXIT_OK


def _print_interrupted(tracker: Any) -> None:
    committed = tracker.kept_after_stop()
    print(
        "ferry: interrupted; this run's unfinished output was removed. Committed partitions: "
        + (", ".join(committed) if committed else "none"),
        file=sys.stderr,
    )


def _print_committed(tracker: Any) -> None:
    committed = tracker.kept_after_stop()
    if committed:
        print(f"ferry: committed partitions before the failure: {', '.join(committed)}", file=sys.stderr)


def render_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary printed in the terminal."""
    verification = summary["verification"]
    lines = [
        "",
        f"Run {summary['run_id']} of job {summary['job']!r} ({summary['mode']})",
        f"  source        {summary['source']}",
        f"  target        {summary['target']}",
        f"  output        {summary['output']}",
        f"  rows          {summary['rows_read']:,} read, {summary['rows_written']:,} written, "
        f"{summary['rows_rejected']:,} rejected",
        f"  throughput    {summary['rows_per_s']:,} rows/s ({summary['data_seconds']:.2f}s data path, "
        f"{summary['end_to_end_seconds']:.2f}s end to end)",
        f"  partitions    {len(summary['partitions'])}, files {summary['files']}",
        f"  verification  {verification['status'].upper()}: {verification.get('method', '')}",
    ]
    if "rows_found" in verification:
        lines.append(
            f"                expected {verification['rows_expected']:,} rows / {verification['checksum_expected']}, "
            f"found {verification['rows_found']:,} rows / {verification.get('checksum_found', '-')}"
        )
    if verification.get("note"):
        lines.append(f"                {verification['note']}")
    for path in summary["rejects_files"]:
        lines.append(f"  rejects       {path}")
    unreadable = summary.get("unreadable_files") or []
    if unreadable:
        count = len({entry["object"] for entry in unreadable})
        lines.append(f"  not read      {count} source file(s) could not be read and were left out (on_error: collect):")
        for entry in unreadable:
            loaded = f"; {entry['rows_read']:,} of its rows loaded before the failure" if entry["rows_read"] else ""
            lines.append(f"                {entry['object']} ({entry['step']}{loaded}): {_one_line(entry['reason'])}")
        if summary.get("unreadable_report"):
            lines.append(f"                listed in {summary['unreadable_report']}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress_bar(tracker: Any, stop: threading.Event) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]ferry[/bold]"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[parts]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("rows", total=None, rate="", parts="")
        while not stop.wait(0.25):
            _update_bar(progress, bar, tracker)
        _update_bar(progress, bar, tracker)


def _update_bar(progress: Any, bar: Any, tracker: Any) -> None:
    snap = tracker.snapshot()
    seconds = tracker.data_seconds()
    rate = snap["rows_written"] / seconds if seconds > 0 else 0
    progress.update(
        bar,
        completed=snap["rows_written"],
        total=tracker.estimated_rows,
        rate=f"{rate:,.0f} rows/s",
        parts=f"{snap['partitions_done']}/{snap['partitions']} partitions",
    )


def _progress_lines(tracker: Any, stop: threading.Event, every_seconds: float = 5.0) -> None:
    """Progress for non-terminals (CI logs): one line every few seconds, only while rows move."""
    last = -1
    while not stop.wait(every_seconds):
        snap = tracker.snapshot()
        if snap["rows_written"] == last or snap["partitions"] == 0:
            continue
        last = snap["rows_written"]
        seconds = tracker.data_seconds()
        rate = snap["rows_written"] / seconds if seconds > 0 else 0
        print(
            f"ferry: {snap['rows_written']:,} rows written, {snap['partitions_done']}/{snap['partitions']} "
            f"partitions, {rate:,.0f} rows/s",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
