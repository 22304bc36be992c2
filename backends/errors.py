"""Ferry's error types, split by what the caller should do about them.

Every message says what was wrong and what to do. The classes decide the
consequence:

* :class:`ConfigurationError` -- the job or a setting is wrong; nothing runs.
* :class:`TransientBackendError` -- a store hiccup (connection lost, timeout,
  deadlock); the partition is retried when the job allows retries.
* :class:`PermanentBackendError` -- the store refused for good (missing table,
  wrong credentials); retrying would not help.
* :class:`DataError` -- a record does not fit (a cast, an expression, a
  target column); ``on_error`` decides whether it stops the run or goes to the
  rejects file.
"""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    """Root of every error Ferry raises on purpose."""

    #: Short name of the consequence, shown in summaries and rejects files.
    kind = "error"


class ConfigurationError(FerryError):
    """The job file, a setting or a parameter is invalid; nothing was run.

    ``source`` names the file (or "parameters") and ``path`` the field path,
    so that the one-line message points at the exact place to fix.
    """

    kind = "configuration"

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.message = message
        self.source = source
        self.path = path
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.source and self.path:
            where = f"{self.source}: {self.path}: "
        elif self.source:
            where = f"{self.source}: "
        elif self.path:
            where = f"{self.path}: "
        return f"{where}{self.message}"


class TransientBackendError(FerryError):
    """A temporary failure of a store; safe to retry the partition."""

    kind = "transient"


class PermanentBackendError(FerryError):
    """A store refused the operation in a way a retry cannot fix."""

    kind = "permanent"


class DataError(FerryError):
    """A value does not fit where it is going (cast, expression or target column).

    Carries the column, an example value and, when known, the row key so that
    the message tells the user which record to look at.
    """

    kind = "data"

    def __init__(
        self,
        message: str,
        *,
        column: str | None = None,
        value: Any = None,
        row_key: Any = None,
        rows: int | None = None,
    ):
        self.column = column
        self.value = value
        self.row_key = row_key
        self.rows = rows
        details = []
        if column is not None:
            details.append(f"column {column!r}")
        if value is not None:
            details.append(f"example value {_short(value)!r}")
        if row_key is not None:
            details.append(f"row key {row_key!r}")
        if rows is not None:
            details.append(f"{rows} row(s)")
        suffix = f" ({', '.join(details)})" if details else ""
        super().__init__(f"{message}{suffix}")


class RejectLimitExceeded(DataError):
    """More rows were rejected than the job's ``max_rejected_rows`` allows."""


class RunInterrupted(FerryError):
    """The run was stopped by Ctrl-C, SIGTERM or a cancellation."""

    kind = "interrupted"


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
