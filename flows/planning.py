"""Planning a run: partitions, schemas, the schema decision and what the target will get.

Used by the ``migrate`` flow before it writes anything and by ``ferry plan``
(a dry run that writes nothing). No Prefect here: planning needs no API.

Planning also decides whether a store-to-store *direct copy* replaces the
read -> transform -> write pipeline: PostgreSQL -> PostgreSQL jobs whose
transforms only select, drop and rename columns stream binary COPY from the
source into the target without decoding (``ferry.backends.postgres_pipe``).
The plan says whether it is taken, or why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ferry.backends.base import Backend, Partition, WriteMode
from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import Filter
from ferry.backends.types import SchemaDecision, format_arrow_type, unify_for_policy
from ferry.tasks.transforms import DropStep, RenameStep, SelectStep, TransformChain, parse_steps

from .spec import JobSpec


@dataclass
class Plan:
    """What a run of a job will do."""

    job: JobSpec
    source: Backend
    target: Backend
    partitions: list[Partition]
    source_schema: pa.Schema
    output_schema: pa.Schema
    target_schema: pa.Schema | None
    decision: SchemaDecision
    chain: TransformChain
    where: Filter | None
    notes: list[str] = field(default_factory=list)
    #: A direct copy that moves every partition store to store instead of the
    #: read -> transform -> write pipeline (PostgreSQL's binary COPY pipe), or None.
    #: It offers ``copy(source, target, partition, dataset, ctx) -> WriteResult``
    #: and ``describe_target_schema()``.
    direct: Any = None
    #: Whether the direct copy is taken, or why not (None when the stores have none).
    direct_note: str | None = None

    @property
    def estimated_rows(self) -> int | None:
        counts = [p.estimated_rows for p in self.partitions]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]

    def render(self) -> str:
        """A readable dry-run report."""
        job = self.job
        lines = [
            f"Job {job.name}: {job.mode.value} {job.source.dataset!r} -> {job.target.dataset!r}",
            f"  source: {self.source.describe()}",
            f"  target: {self.target.describe()}",
            f"  partitions: {len(self.partitions)} (parallel {job.stream.parallel}, runner {job.runner})",
            "  estimated rows: " + (f"{self.estimated_rows:,}" if self.estimated_rows is not None else "unknown"),
            f"  stream: batch_size {job.stream.batch_size:,} rows, batch_max_bytes {job.stream.batch_max_bytes:,}, "
            f"buffer_size {job.stream.buffer_size}",
        ]
        if self.where is not None:
            lines.append(f"  where: {self.where.to_dict()}")
        if job.transforms:
            lines.append(f"  transforms: {len(job.transforms)} step(s): " + ", ".join(next(iter(s)) for s in job.transforms))
        lines.append("")
        lines.append("Columns (source -> written):")
        width = max([len(n) for n in self.decision.write_schema.names] + [len("column")])
        for f in self.decision.write_schema:
            origin = self.source_schema.field(f.name).type if self.source_schema.get_field_index(f.name) >= 0 else None
            origin_text = format_arrow_type(origin) if origin is not None else "(derived)"
            lines.append(f"  {f.name:<{width}}  {origin_text} -> {format_arrow_type(f.type)}")
        lines.append("")
        lines.append("Target schema it would apply:")
        ddl = (
            self.direct.describe_target_schema()
            if self.direct is not None
            else self.target.describe_target_schema(self.decision.write_schema)
        )
        lines.extend("  " + line for line in ddl.splitlines())
        lines.append("")
        if self.target_schema is None:
            lines.append("Target does not exist yet: it will be created.")
        else:
            changes = []
            if self.decision.added_columns:
                changes.append("adds nullable column(s) " + ", ".join(self.decision.added_columns))
            if self.decision.dropped_columns:
                changes.append("drops source column(s) the target lacks: " + ", ".join(self.decision.dropped_columns))
            if self.decision.null_filled_columns:
                changes.append("fills target-only column(s) with nulls: " + ", ".join(self.decision.null_filled_columns))
            if job.mode is WriteMode.REPLACE:
                lines.append("Target exists: replace writes a new version and swaps it in when every partition committed.")
            elif changes:
                lines.append("Target exists; against it this run " + "; ".join(changes) + ".")
            else:
                lines.append("Target exists with the same columns and types.")
        if self.direct_note is not None:
            lines.append(f"COPY fast path: {self.direct_note}")
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job.name,
            "partitions": [p.to_dict() for p in self.partitions],
            "estimated_rows": self.estimated_rows,
            "write_schema": {f.name: format_arrow_type(f.type) for f in self.decision.write_schema},
            "target_exists": self.target_schema is not None,
            "notes": list(self.notes),
            "copy_fast_path": None
            if self.direct_note is None
            else {"taken": self.direct is not None, "note": self.direct_note},
        }


async def plan_job(job: JobSpec, source: Backend, target: Backend) -> Plan:
    """Check the job against the real source and target and compute the run's plan.

    Raises ConfigurationError (with the field path) for anything that would
    fail later: unknown columns, an impossible write mode, a schema conflict.
    """
    where = job.source_filter()
    dataset = job.source.dataset
    full_schema = await source.schema(dataset)
    if job.source.columns is not None:
        _require_columns(full_schema, job.source.columns, "source.columns", dataset)
    if where is not None:
        _require_columns(full_schema, sorted(where.columns()), "source.where", dataset)
    source_schema = await source.schema(dataset, job.source.columns)

    chain = TransformChain(parse_steps(job.transforms), on_error=job.on_error)
    output_schema = chain.output_schema(source_schema)

    mode = job.mode
    target.check_write(mode, tuple(job.key))
    if job.key:
        _require_columns(output_schema, job.key, "key", "the transformed data")

    target_schema = await target.target_schema(job.target.dataset)
    compare_with = None if mode is WriteMode.REPLACE else target_schema
    try:
        decision = unify_for_policy(output_schema, compare_with, job.schema_policy)
    except ConfigurationError as exc:
        raise ConfigurationError(exc.message, path="schema_policy") from None

    partitions = await source.partitions(dataset, hint=job.stream.parallel, where=where)
    notes = []
    if decision.dropped_columns:
        notes.append(
            "schema_policy ignore_extra drops column(s) the target lacks: " + ", ".join(decision.dropped_columns)
        )
    if not target.effective_capabilities.readable_after_write and job.verify:
        notes.append("the target keeps no data, so verification compares row counts only")
    notes.extend(await target.plan_notes(job.target.dataset, mode))
    direct, direct_note = await _plan_direct_copy(job, source, target, chain, source_schema, decision, where, partitions)
    return Plan(
        job=job,
        source=source,
        target=target,
        partitions=partitions,
        source_schema=source_schema,
        output_schema=output_schema,
        target_schema=target_schema,
        decision=decision,
        chain=chain,
        where=where,
        notes=notes,
        direct=direct,
        direct_note=direct_note,
    )


def column_lineage(chain: TransformChain, names: list[str]) -> tuple[list[tuple[str, str]] | None, Any]:
    """(source column, written name) pairs when every step only selects, drops or renames.

    Returns ``(pairs, None)``, or ``(None, step)`` with the first step that
    does anything else (computes, casts, filters or runs Python).
    """
    current = [(name, name) for name in names]
    for step in chain.steps:
        if isinstance(step, SelectStep):
            origin = {written: source for source, written in current}
            current = [(origin[name], name) for name in step.columns]
        elif isinstance(step, DropStep):
            current = [(source, written) for source, written in current if written not in step.columns]
        elif isinstance(step, RenameStep):
            renames = dict(step.mapping)
            current = [(source, renames.get(written, written)) for source, written in current]
        else:
            return None, step
    return current, None


async def _plan_direct_copy(
    job: JobSpec,
    source: Backend,
    target: Backend,
    chain: TransformChain,
    source_schema: pa.Schema,
    decision: SchemaDecision,
    where: Filter | None,
    partitions: list[Partition],
) -> tuple[Any, str | None]:
    """The direct copy for this job and why, or (None, why not); (None, None) when the stores offer none."""
    if source.kind != "postgres" or target.kind != "postgres":
        return None, None
    fallback = "not taken, rows go through Arrow: "
    lineage, blocking = column_lineage(chain, source_schema.names)
    if blocking is not None:
        return None, fallback + (
            f"transforms[{blocking.index}] ({blocking.kind}) does more than select, drop or rename"
        )
    if job.on_error == "collect":
        return None, fallback + (
            "on_error: collect sets bad rows aside, and binary COPY fails a whole partition on one bad row"
        )
    if decision.added_columns or decision.dropped_columns or decision.null_filled_columns:
        changed = decision.added_columns + decision.dropped_columns + decision.null_filled_columns
        return None, fallback + (
            f"schema_policy {job.schema_policy} changes the columns against the existing target ({', '.join(changed)})"
        )
    written = [name for _, name in lineage]
    if len(set(written)) != len(written):
        return None, fallback + "the transforms write a column twice"
    from ferry.backends.postgres_pipe import plan_copy_pipe

    pipe, note = await plan_copy_pipe(
        source,
        target,
        source_dataset=job.source.dataset,
        target_dataset=job.target.dataset,
        columns=lineage,
        where=where,
        mode=job.mode,
        key=tuple(job.key),
        parallel=max(1, min(job.stream.parallel, len(partitions))),
    )
    return pipe, note if pipe is not None else fallback + note


def _require_columns(schema: pa.Schema, columns: list[str], path: str, dataset: str) -> None:
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise ConfigurationError(
            f"{dataset!r} has no column(s) {', '.join(map(repr, missing))}; available: {', '.join(schema.names)}",
            path=path,
        )
