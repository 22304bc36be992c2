"""Planning helpers of the object-store backend: schemas, partitions and filter pushdown.

Pure functions (no I/O) used by :mod:`ferry.backends.objectstore` while it
plans and reads: unifying file schemas with errors that name the files,
Hive partition types from folder names, packing small files and splitting
large Parquet files into row-group ranges, and the pyarrow prefilter that
pushes ``where`` down to Parquet statistics.
"""

from __future__ import annotations

import base64

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import PermanentBackendError
from .filters import And, Comparison, Filter, Or


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def unify_file_schemas(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """Unify file schemas; a conflict names the two files and the column."""
    unified = schemas[0][1]
    first = schemas[0][0]
    for name, schema in schemas[1:]:
        try:
            unified = pa.unify_schemas([unified, schema])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            clashes = [
                f"{f.name}: {unified.field(f.name).type} vs {f.type}"
                for f in schema
                if unified.get_field_index(f.name) >= 0 and unified.field(f.name).type != f.type
            ]
            detail = "; ".join(clashes) or str(exc)
            raise PermanentBackendError(
                f"{name} has a schema that differs from {first} ({detail}); make the files agree "
                "or read them as separate datasets"
            ) from None
    return unified


def infer_partition_schema(relatives: list[str], names: list[str]) -> pa.Schema:
    """Partition column types from folder names: int64 when every value is an integer, else string."""
    values: dict[str, list[str]] = {name: [] for name in names}
    for relative in relatives:
        for segment in relative.split("/")[:-1]:
            name, sep, text = segment.partition("=")
            if sep and name in values and text != "__HIVE_DEFAULT_PARTITION__":
                values[name].append(text)
    fields = []
    for name in names:
        texts = values[name]
        is_int = bool(texts) and all(t.lstrip("-").isdigit() for t in texts)
        fields.append(pa.field(name, pa.int64() if is_int else pa.string()))
    return pa.schema(fields)


def pack_small_files(
    small: list[tuple[str, int, int | None]], target_bytes: int, hint: int
) -> list[list[tuple[str, int, int | None]]]:
    """Consecutive groups of small files of about ``target_bytes``, at least ``hint`` groups when possible."""
    if not small:
        return []
    total = sum(size for _, size, _ in small)
    count = max(min(max(1, hint), len(small)), -(-total // max(1, target_bytes)))
    count = min(count, len(small))
    groups: list[list[tuple[str, int, int | None]]] = [[] for _ in range(count)]
    # Cut the ordered list at even byte boundaries (file counts when sizes are unknown).
    weights = [max(1, size) for _, size, _ in small]
    whole = sum(weights)
    running = 0
    for item, weight in zip(small, weights):
        index = min(count - 1, running * count // whole)
        groups[index].append(item)
        running += weight
    return [g for g in groups if g]


def row_group_ranges(meta: pq.FileMetaData, max_bytes: int) -> list[tuple[int, int, int]]:
    """Consecutive row-group ranges of at most ``max_bytes`` (one group at least): (start, stop, rows)."""
    ranges = []
    start = 0
    size = rows = 0
    for index in range(meta.num_row_groups):
        group = meta.row_group(index)
        if index > start and size + group.total_byte_size > max_bytes:
            ranges.append((start, index, rows))
            start, size, rows = index, 0, 0
        size += group.total_byte_size
        rows += group.num_rows
    ranges.append((start, meta.num_row_groups, rows))
    return ranges


_PUSHABLE = {"eq", "gt", "gte", "lt", "lte", "in", "between"}


def to_arrow_prefilter(where: Filter, schema: pa.Schema) -> pads.Expression | None:
    """A pyarrow dataset expression that keeps a superset of the rows ``where`` keeps.

    Only operators whose null semantics agree with Ferry's (a null never
    matches) are pushed; anything else returns None for that branch, and the
    exact evaluator runs on the result anyway.
    """
    if isinstance(where, Comparison):
        if where.op not in _PUSHABLE or schema.get_field_index(where.column) < 0:
            return None
        field = pads.field(where.column)
        column_type = schema.field(where.column).type
        try:
            if where.op == "in":
                return field.isin(pa.array(where.value).cast(column_type))
            if where.op == "between":
                low, high = (pa.scalar(v).cast(column_type) for v in where.value)
                return (field >= low) & (field <= high)
            value = pa.scalar(where.value).cast(column_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
            return None
        return {
            "eq": field == value,
            "gt": field > value,
            "gte": field >= value,
            "lt": field < value,
            "lte": field <= value,
        }[where.op]
    if isinstance(where, And):
        parts = [p for p in (to_arrow_prefilter(i, schema) for i in where.items) if p is not None]
        if not parts:
            return None
        expression = parts[0]
        for part in parts[1:]:
            expression = expression & part
        return expression
    if isinstance(where, Or):
        parts = [to_arrow_prefilter(i, schema) for i in where.items]
        if any(p is None for p in parts) or not parts:
            return None
        expression = parts[0]
        for part in parts[1:]:
            expression = expression | part
        return expression
    return None
