"""Setting sweeps: run a route once per value of one setting (``--vary``) or with fixed ones (``--set``).

    python -m benchmarks memory-to-postgres --rows 1M --vary batch_size=8192,32768,131072
    python -m benchmarks memory-to-postgres --rows 1M --parallel 4 --vary postgres.max_connections=2,4,8
    python -m benchmarks memory-to-s3 --rows 1M --set s3.max_connections=4 --vary parallel=1,2,4

Each ``--vary SETTING=V1,V2,...`` is one sweep: the route is measured once
per value, every other setting at the invocation's own value. Several
``--vary`` options sweep one setting after the other (one at a time, not a
grid), sharing the Prefect start-up and the route's services. Every line of
a sweep carries, besides the usual fields, ``sweep_setting``,
``sweep_value`` and ``settings`` (every setting given by ``--set`` or the
sweep, with its value at that point).

The settings (:data:`SETTINGS`) reach Ferry without copying a route: the
harness runs the routes on a :class:`SweepContext`, whose :meth:`job` puts
them into every job the routes build (stream settings into ``stream``,
endpoint settings into each PostgreSQL or S3 endpoint of the job).
``batch_size`` and ``parallel`` are the invocation's own
``--batch-size`` / ``--parallel``, so the baselines see ``batch_size`` too.
A route that builds no job reads a setting with :func:`setting`.

A setting that touched nothing (say ``s3.max_connections`` on a PostgreSQL
route) stops the run with an error instead of printing lines that vary
nothing. Nothing here imports Prefect or Ferry.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from .harness import HarnessError
from .routes import RunContext

#: Where a setting goes: the context's own attribute, the job's ``stream``, or an endpoint of a kind.
CONTEXT, STREAM, POSTGRES, S3 = "context", "stream", "postgres", "s3"


@dataclass(frozen=True)
class Setting:
    """A setting a sweep can vary (see :data:`SETTINGS`)."""

    name: str
    scope: str
    description: str
    #: Where it lands in an endpoint dict (``("pool", "max_connections")``); empty outside endpoints.
    path: tuple[str, ...] = ()


#: Setting name -> what it is; every value is a whole number >= 1.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("batch_size", CONTEXT, "stream.batch_size (rows per batch), the baselines' batch size too (--batch-size)"),
        Setting("parallel", CONTEXT, "stream.parallel (partitions in flight); records-pooling: reads in flight (--parallel)"),
        Setting("buffer_size", STREAM, "stream.buffer_size (batches queued between two stages of a partition)"),
        Setting(
            "postgres.max_connections",
            POSTGRES,
            "max_connections of every PostgreSQL endpoint (asyncpg pool per event loop, ADBC pool per process); "
            "records-pooling: the pooled store's pool size",
            ("max_connections",),
        ),
        Setting(
            "s3.max_connections", S3, "pool.max_connections of every S3 endpoint (botocore max_pool_connections)",
            ("pool", "max_connections"),
        ),
        Setting(
            "s3.max_concurrency", S3, "transfer.max_concurrency of every S3 endpoint (s3fs max_concurrency)",
            ("transfer", "max_concurrency"),
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    """One ``--vary``: a setting and the values it takes, in order."""

    setting: str
    values: tuple[int, ...]


def _count(text: str) -> int:
    """A whole number >= 1: ``8192``, ``8_192``, ``32k``, ``1M``."""
    value = text.strip().replace("_", "").lower()
    match = re.fullmatch(r"(\d+)([km]?)", value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r} (try 8192, 32k or 1M)")
    number = int(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2)]
    if number < 1:
        raise argparse.ArgumentTypeError(f"a setting value must be at least 1, got {text!r}")
    return number


def _split(text: str, option: str) -> tuple[str, str]:
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise argparse.ArgumentTypeError(f"{option} takes SETTING=VALUE..., got {text!r}")
    if name not in SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return name, values


def parse_vary(text: str) -> Sweep:
    """``--vary SETTING=V1,V2,...``: a :class:`Sweep` (values distinct, kept in the given order)."""
    name, values = _split(text, "--vary")
    parsed = tuple(_count(v) for v in values.split(",") if v.strip())
    if not parsed:
        raise argparse.ArgumentTypeError(f"--vary {name}= needs at least one value")
    if len(set(parsed)) != len(parsed):
        raise argparse.ArgumentTypeError(f"--vary {name} repeats a value: {values}")
    return Sweep(name, parsed)


def parse_set(text: str) -> tuple[str, int]:
    """``--set SETTING=VALUE``: a setting held at one value for the whole invocation."""
    name, value = _split(text, "--set")
    if SETTINGS[name].scope == CONTEXT:
        flag = "--batch-size" if name == "batch_size" else "--parallel"
        raise argparse.ArgumentTypeError(f"{name} has its own option: use {flag} instead of --set {name}=...")
    return name, _count(value)


def check_options(sweeps: list[Sweep], fixed: list[tuple[str, int]]) -> None:
    """Refuse a setting swept twice, set twice, or both set and swept (ValueError saying which)."""
    swept = [s.setting for s in sweeps]
    for name in dict.fromkeys(swept):
        if swept.count(name) > 1:
            raise ValueError(f"--vary {name} is given twice; give all its values in one --vary")
    named = [name for name, _ in fixed]
    for name in dict.fromkeys(named):
        if named.count(name) > 1:
            raise ValueError(f"--set {name} is given twice")
        if name in swept:
            raise ValueError(f"{name} is both --set and --vary; keep one")


def setting(ctx: Any, name: str, default: Any) -> Any:
    """The value of a sweep setting in ``ctx`` (``default`` when unset), counting it as used.

    For routes that build no job (a plain :class:`RunContext` has no settings).
    """
    if SETTINGS[name].scope == CONTEXT:
        return getattr(ctx, name)
    settings = getattr(ctx, "settings", None)
    if not settings or name not in settings:
        return default
    ctx.applied.add(name)
    return settings[name]


@dataclass
class SweepContext(RunContext):
    """A :class:`RunContext` that puts the sweep settings into every job the routes build."""

    #: Settings other than batch_size / parallel (those are attributes), by name.
    settings: dict[str, int] = field(default_factory=dict)
    #: Names of the settings that changed a job (or were read by a route) since :meth:`point` began.
    applied: set[str] = field(default_factory=set)
    #: The sweep point being measured: (setting, value), or None outside sweeps.
    current: tuple[str, int] | None = None

    def job(self, name: str, source: dict[str, Any], target: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The benchmark job of :class:`RunContext`, with this context's settings applied."""
        job = super().job(name, dict(source), dict(target), **extra)
        for key, value in self.settings.items():
            spec = SETTINGS[key]
            if spec.scope == STREAM:
                job["stream"][key] = value
                self.applied.add(key)
                continue
            for side in ("source", "target"):
                if _endpoint_kind(job[side]) == spec.scope:
                    job[side] = _with(job[side], spec.path, value)
                    self.applied.add(key)
        return job

    @contextlib.contextmanager
    def point(self, name: str | None = None, value: int | None = None) -> Iterator[None]:
        """Measure at ``name = value`` (or, without a name, at the invocation's settings); restores them afterwards."""
        self.applied.clear()
        if name is None or value is None:
            yield
            return
        scope = SETTINGS[name].scope
        saved = getattr(self, name) if scope == CONTEXT else self.settings.get(name)
        if scope == CONTEXT:
            setattr(self, name, value)
        else:
            self.settings[name] = value
        self.current = (name, value)
        try:
            yield
        finally:
            self.current = None
            if scope == CONTEXT:
                setattr(self, name, saved)
            elif saved is None:
                self.settings.pop(name, None)
            else:
                self.settings[name] = saved

    def check_applied(self, route: str) -> None:
        """Raise when a ``--set`` or swept setting changed nothing in ``route``'s runs since :meth:`point` began."""
        for name in self.settings:
            if name in self.applied:
                continue
            scope = SETTINGS[name].scope
            where = {STREAM: "Ferry job", POSTGRES: "PostgreSQL endpoint", S3: "S3 endpoint"}[scope]
            option = "--vary" if self.current and self.current[0] == name else "--set"
            raise HarnessError(f"{option} {name} changes nothing in route {route}: it runs no {where}")

    def annotate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the sweep fields to one record (and a timestamp when the route gave none)."""
        if self.current is None and not self.settings:
            return record
        record = dict(record)
        record["settings"] = dict(sorted(self.settings.items()))
        if self.current is not None:
            name, value = self.current
            record["sweep_setting"] = name
            record["sweep_value"] = value
            if SETTINGS[name].scope == CONTEXT:
                record["settings"][name] = value
        record.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return record


def sweep_points(sweeps: list[Sweep] | None) -> list[tuple[str, int] | None]:
    """The points to measure in order: every value of every sweep, or one plain point (None)."""
    if not sweeps:
        return [None]
    return [(s.setting, value) for s in sweeps for value in s.values]


def _endpoint_kind(endpoint: Any) -> str | None:
    """``postgres``, ``s3`` or None for a job's source or target dict."""
    if not isinstance(endpoint, dict):
        return None
    backend = endpoint.get("backend")
    if backend == "postgres":
        return POSTGRES
    if backend == "s3" or (backend in ("objectstore", "file") and str(endpoint.get("url", "")).startswith("s3://")):
        return S3
    return None


def _with(endpoint: dict[str, Any], path: tuple[str, ...], value: int) -> dict[str, Any]:
    """A copy of ``endpoint`` with ``value`` at ``path`` (nested sections copied, not shared)."""
    out = dict(endpoint)
    if len(path) == 1:
        out[path[0]] = value
        if path[0] == "max_connections" and int(out.get("min_connections", 1)) > value:
            out["min_connections"] = value
        return out
    out[path[0]] = _with(dict(out.get(path[0]) or {}), path[1:], value)
    return out
