"""The PostgreSQL partition writer keeps only a bounded tail of batches to name a failing COPY row."""

import pyarrow as pa

from ferry.backends.base import WriteContext, WriteMode
from ferry.backends.postgres_write import PartitionWriter


def _writer(bound: int) -> PartitionWriter:
    ctx = WriteContext(run_id="r", job_name="j", mode=WriteMode.APPEND, schema=pa.schema([("id", pa.int64())]), key=("id",))
    writer = PartitionWriter({}, ctx, "p0", pull=lambda: None)
    writer.RECENT_BYTES = bound
    return writer


def _feed(writer: PartitionWriter, batches: int, rows: int) -> None:
    for n in range(batches):
        batch = pa.record_batch({"id": pa.array(range(n * rows, (n + 1) * rows), pa.int64())})
        writer._remember(batch)
        writer.rows += batch.num_rows


def test_recent_batches_are_bounded_by_bytes_and_the_newest_rows_are_still_located():
    writer = _writer(bound=3 * 800)  # three batches of 100 int64 values
    _feed(writer, batches=10, rows=100)
    assert len(writer._recent) == 3
    assert writer._recent_bytes == sum(b.nbytes for _, b in writer._recent) <= writer.RECENT_BYTES
    # COPY lines are 1-based: line 951 is row 950 of the partition, whose key is 950.
    assert writer.locate(951, "id") == ([950], 950)
    assert writer.locate(701, "id") == ([700], 700)
    # Older rows are gone: the error then names the line only.
    assert writer.locate(100, "id") == (None, None)


def test_a_batch_larger_than_the_bound_is_still_kept():
    writer = _writer(bound=10)
    _feed(writer, batches=2, rows=100)
    assert len(writer._recent) == 1
    assert writer.locate(150, "id") == ([149], 149)
