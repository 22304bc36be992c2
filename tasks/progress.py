"""Live progress of a run, shared by its stages, the CLI's progress bar and the summary.

Stages update counters as batches pass; the terminal progress bar and the
flow's periodic log line read them. One tracker per run id, in-process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PartitionProgress:
    """Counters of one partition."""

    partition_id: str
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    attempts: int = 0
    status: str = "pending"
    skipped: bool = False
    files: list[str] = field(default_factory=list)
    rejects_file: str | None = None
    error: str | None = None

    def as_row(self) -> dict[str, Any]:
        rate = self.rows_written / self.seconds if self.seconds > 0 else 0.0
        return {
            "partition": self.partition_id,
            "status": self.status,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_rejected": self.rows_rejected,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(rate),
            "attempts": self.attempts,
        }


class RunTracker:
    """Thread-safe counters of one run."""

    def __init__(self, run_id: str, *, estimated_rows: int | None = None) -> None:
        self.run_id = run_id
        self.estimated_rows = estimated_rows
        self.lock = threading.Lock()
        self.partitions: dict[str, PartitionProgress] = {}
        self.rows_read = 0
        self.rows_written = 0
        self.rows_rejected = 0
        self.started = time.monotonic()
        #: Data-path clock: first batch read .. last partition committed.
        self.first_read_at: float | None = None
        self.last_commit_at: float | None = None
        self.finished = False
        #: False for a replace: its committed partitions are discarded if the run stops.
        self.keeps_committed_on_stop = True

    def partition(self, partition_id: str) -> PartitionProgress:
        with self.lock:
            return self.partitions.setdefault(partition_id, PartitionProgress(partition_id))

    def mark_read_started(self) -> None:
        """Start the data-path clock when the first read begins (not when its first batch arrives)."""
        with self.lock:
            if self.first_read_at is None:
                self.first_read_at = time.monotonic()

    def add_read(self, partition_id: str, rows: int) -> None:
        with self.lock:
            if self.first_read_at is None:
                self.first_read_at = time.monotonic()
            self.rows_read += rows
            self.partitions.setdefault(partition_id, PartitionProgress(partition_id)).rows_read += rows

    def add_written(self, partition_id: str, rows: int) -> None:
        with self.lock:
            self.rows_written += rows
            self.partitions.setdefault(partition_id, PartitionProgress(partition_id)).rows_written += rows

    def add_rejected(self, partition_id: str, rows: int) -> int:
        """Count rejected rows; returns the run's total so far."""
        with self.lock:
            self.rows_rejected += rows
            self.partitions.setdefault(partition_id, PartitionProgress(partition_id)).rows_rejected += rows
            return self.rows_rejected

    def reset_partition(self, partition_id: str) -> None:
        """Forget a failed attempt's counts before a retry, so totals never double count."""
        with self.lock:
            old = self.partitions.get(partition_id)
            if old is None:
                return
            self.rows_read -= old.rows_read
            self.rows_written -= old.rows_written
            self.rows_rejected -= old.rows_rejected
            old.rows_read = old.rows_written = old.rows_rejected = 0

    def mark_committed(self, partition_id: str) -> None:
        with self.lock:
            self.last_commit_at = time.monotonic()
            self.partitions.setdefault(partition_id, PartitionProgress(partition_id)).status = "committed"

    def committed(self) -> list[str]:
        with self.lock:
            return sorted(p.partition_id for p in self.partitions.values() if p.status in ("committed", "skipped"))

    def kept_after_stop(self) -> list[str]:
        """Partitions whose data stays in the target when the run stops before publishing."""
        return self.committed() if self.keeps_committed_on_stop else []

    def data_seconds(self) -> float:
        """Seconds from the first batch read to the last partition committed."""
        with self.lock:
            if self.first_read_at is None:
                return 0.0
            end = self.last_commit_at or time.monotonic()
            return max(0.0, end - self.first_read_at)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "rows_read": self.rows_read,
                "rows_written": self.rows_written,
                "rows_rejected": self.rows_rejected,
                "partitions_done": sum(1 for p in self.partitions.values() if p.status in ("committed", "skipped")),
                "partitions": len(self.partitions),
                "elapsed": time.monotonic() - self.started,
            }


_trackers: dict[str, RunTracker] = {}
_trackers_lock = threading.Lock()


def tracker_for(run_id: str) -> RunTracker:
    """The tracker of ``run_id`` (created on first use)."""
    with _trackers_lock:
        tracker = _trackers.get(run_id)
        if tracker is None:
            tracker = _trackers[run_id] = RunTracker(run_id)
        return tracker


def forget_tracker(run_id: str) -> None:
    """Drop a finished run's tracker."""
    with _trackers_lock:
        _trackers.pop(run_id, None)
