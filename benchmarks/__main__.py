"""Command line: ``python -m benchmarks ROUTE [ROUTE ...] --rows N [--rows N ...] [options]``.

stdout carries only the JSON lines (one per route x row count); everything
else (progress, Prefect's logs, the server's output) goes to stderr. Exit
codes: 0 done, 1 a run failed, 2 bad arguments, 130 interrupted (Ctrl-C or
SIGTERM). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import re
import signal
import sys
import time
import traceback
from typing import Any, TextIO

from .harness import DEFAULT_WARMUP_ROWS, Workspace, json_line, log, prepare_environment, run_benchmarks
from .routes import ROUTES
from .sweep import SETTINGS, check_options, parse_set, parse_vary

_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}

#: A second SIGINT/SIGTERM at least this many seconds after the first exits at once.
SECOND_SIGNAL_GRACE = 2.0


def _is_interruption(exc: BaseException) -> bool:
    """Ctrl-C, a cancellation, or Prefect's SIGTERM bridge (``prefect.exceptions.TerminationSignal``)."""
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return True
    return any(cls.__name__ == "TerminationSignal" for cls in type(exc).__mro__)


def parse_rows(text: str, *, minimum: int = 1) -> int:
    """A row count: ``200000``, ``200_000``, ``200k``, ``10M`` or ``1e6``."""
    value = text.strip().replace("_", "").replace(",", "").lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)", value)
    try:
        if match:
            number = float(match.group(1)) * _SUFFIXES.get(match.group(2), 1)
        else:
            number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a row count: {text!r} (try 200000, 200k, 10M or 1e6)") from None
    if number < minimum or number != int(number):
        raise argparse.ArgumentTypeError(f"a row count must be a whole number >= {minimum}, got {text!r}")
    return int(number)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    return parse_rows(text, minimum=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure Ferry routes next to a bare-pyarrow baseline; one JSON line per route x row count.",
    )
    parser.add_argument("routes", nargs="*", metavar="ROUTE", help="route name(s), or `all` (see --list)")
    parser.add_argument("--list", action="store_true", help="name the routes and their baselines, then exit")
    parser.add_argument(
        "--rows", action="append", type=parse_rows, metavar="N", help="rows per run; give it several times for several sizes"
    )
    parser.add_argument("--repeat", type=_positive, default=3, help="runs per figure; figures are medians (default 3)")
    parser.add_argument("--parallel", type=_positive, default=2, help="Ferry's stream.parallel (default 2)")
    parser.add_argument(
        "--batch-size", type=_positive, default=65_536, help="rows per batch, Ferry and baseline (default 65536)"
    )
    parser.add_argument("--out", metavar="FILE", help="also append the JSON lines to FILE")
    parser.add_argument(
        "--warmup-rows",
        type=_non_negative,
        default=DEFAULT_WARMUP_ROWS,
        metavar="N",
        help=f"rows of the unmeasured warm-up per route, 0 for none (default {DEFAULT_WARMUP_ROWS})",
    )
    parser.add_argument(
        "--tmpdir", metavar="DIR", help="create the temporary workspace under DIR (default: the system temp folder)"
    )
    parser.add_argument(
        "--vary",
        action="append",
        type=parse_vary,
        default=[],
        metavar="SETTING=V1,V2,...",
        help=f"measure once per value of SETTING (repeatable: one setting at a time); settings: {', '.join(SETTINGS)}",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=parse_set,
        default=[],
        dest="fixed",
        metavar="SETTING=VALUE",
        help="hold a setting at VALUE for every run (repeatable; see --vary)",
    )
    return parser


def list_routes(stream: TextIO) -> None:
    width = max(len(name) for name in ROUTES)
    for name, route in ROUTES.items():
        stream.write(f"{name:<{width}}  baseline {route.baseline_name:<22}  {route.description}\n")


def _detach_stdout() -> TextIO:
    """Keep fd 1 for the JSON lines; send everything else that writes to stdout to stderr.

    Works at the file-descriptor level, so the Prefect server subprocess (which
    inherits fd 1) and any library printing to stdout cannot mix into the JSON.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(saved, "w", buffering=1, encoding="utf-8")


def _kill_prefect_servers() -> None:
    """Stop this process's Prefect server children (used only when exiting at once)."""
    import psutil

    from .harness import is_prefect_server

    for child in psutil.Process().children(recursive=True):
        try:
            if is_prefect_server(child.cmdline()):
                child.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


async def _run_interruptibly(workspace: Workspace, **kwargs: Any) -> None:
    """Run the benchmarks; SIGINT/SIGTERM cancel them cleanly, a second signal exits at once.

    Cancelling (rather than raising KeyboardInterrupt wherever the main thread
    happens to be) lets a running Ferry flow abort and roll back, and lets
    Arrow's worker threads finish before the interpreter shuts down. A baseline
    runs on the main thread, so a signal takes effect when it returns.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[float] = []

    def on_signal(signum: int) -> None:
        # During a flow run Prefect's own SIGTERM bridge also sees the signal and
        # re-sends it once it has crashed the run: a repeat within the grace
        # period is that echo, not the user insisting.
        now = time.monotonic()
        if received and now - received[0] >= SECOND_SIGNAL_GRACE:
            log("signal received again: stopping now")
            _kill_prefect_servers()
            workspace.close()
            os._exit(130)
        if not received:
            received.append(now)
            log(
                f"{signal.Signals(signum).name} received: stopping after cleaning up "
                f"(send it again after {SECOND_SIGNAL_GRACE:.0f}s to stop at once)"
            )
        assert task is not None
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # e.g. SIGINT of a job started in the background with `&`
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    await run_benchmarks(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_routes(sys.stdout)
        return 0
    if not args.routes:
        parser.error("name at least one route (or `all`); see --list")
    names = list(ROUTES) if args.routes == ["all"] else args.routes
    unknown = [n for n in names if n not in ROUTES]
    if unknown:
        parser.error(f"unknown route(s): {', '.join(unknown)}; known: {', '.join(ROUTES)}")
    if not args.rows:
        parser.error("--rows N is required (give it several times for several sizes)")
    rows_list = list(dict.fromkeys(args.rows))
    routes = [ROUTES[n] for n in dict.fromkeys(names)]
    try:
        check_options(args.vary, args.fixed)
    except ValueError as exc:
        parser.error(str(exc))

    out_file = None
    if args.out:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            out_file = open(args.out, "a", encoding="utf-8")
        except OSError as exc:
            parser.error(f"cannot open --out {args.out}: {exc.strerror}")

    json_out = _detach_stdout()
    workspace = Workspace(args.tmpdir)
    # Registered before Prefect is imported, so it runs after Prefect's exit handlers
    # (which stop the ephemeral server that keeps its database in the workspace).
    atexit.register(workspace.close)
    prepare_environment(workspace)
    log(
        f"workspace {workspace.root}; routes {', '.join(r.name for r in routes)}; rows "
        f"{', '.join(f'{n:,}' for n in rows_list)}; repeat {args.repeat}, parallel {args.parallel}, "
        f"batch size {args.batch_size:,}"
        + "".join(f"; set {name} = {value}" for name, value in args.fixed)
        + "".join(f"; vary {s.setting} over {', '.join(map(str, s.values))}" for s in args.vary)
    )

    def emit(record: dict[str, Any]) -> None:
        line = json_line(record)
        json_out.write(line + "\n")
        json_out.flush()
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    try:
        asyncio.run(
            _run_interruptibly(
                workspace,
                routes=routes,
                rows_list=rows_list,
                workdir=workspace.data,
                repeat=args.repeat,
                parallel=args.parallel,
                batch_size=args.batch_size,
                warmup_rows=args.warmup_rows,
                emit=emit,
                settings=dict(args.fixed),
                sweeps=args.vary,
            )
        )
    except BaseException as exc:
        if _is_interruption(exc):
            log("interrupted; removing the workspace")
            return 130
        if not isinstance(exc, Exception):
            raise
        log("a run failed:\n" + traceback.format_exc())
        return 1
    finally:
        workspace.remove_data()
        if out_file is not None:
            out_file.close()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
