"""Bulk indexing with several requests in flight and retries of rejected documents only.

``elasticsearch.helpers.async_bulk`` sends one chunk at a time and retries
nothing by default. :class:`BulkWriter` runs ``max_requests_in_flight``
consumers of one bounded queue of chunks; each chunk is cut at a number of
documents or of bytes, whichever comes first. When the cluster pushes back
(429 or 503 on a document, or on the whole request), only the rejected
documents are sent again, after a backoff that doubles up to a cap. Every
other per-document failure is collected with its id, status and reason;
nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout
from elasticsearch import AsyncElasticsearch
from elasticsearch import exceptions as es_exceptions

from .errors import TransientBackendError
from .elasticsearch_client import translate_error

#: Statuses that mean "the cluster is busy, send it again later".
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Action:
    """One bulk action: its NDJSON lines and the document id (for messages and retries)."""

    doc_id: str
    body: bytes  # action line + document line, each ending in a newline
    row: int  # position in the partition (to find the original row)

    @property
    def document(self) -> bytes:
        """The document line (empty for a delete)."""
        return self.body.split(b"\n", 1)[1].rstrip(b"\n")


@dataclass
class DocumentFailure:
    """A document the cluster refused, with why."""

    doc_id: str
    row: int
    status: int
    error_type: str
    reason: str
    #: The document as sent (JSON), so the row can be rebuilt for the rejects file.
    document: bytes = b""

    def describe(self) -> str:
        return f"document {self.doc_id!r}: {self.status} {self.error_type}: {self.reason}"


@dataclass
class BulkStats:
    """What a writer did (for results and logs)."""

    documents: int = 0
    bytes_sent: int = 0
    requests: int = 0
    retried_documents: int = 0
    failures: list[DocumentFailure] = field(default_factory=list)


def index_action(index: str, doc_id: str, document: bytes, row: int, op: str = "index") -> Action:
    """An ``index`` (or ``create``) action for ``document`` with id ``doc_id``."""
    head = orjson.dumps({op: {"_index": index, "_id": doc_id}})
    return Action(doc_id, head + b"\n" + document + b"\n", row)


def delete_action(index: str, doc_id: str) -> Action:
    """A ``delete`` action (one line)."""
    return Action(doc_id, orjson.dumps({"delete": {"_index": index, "_id": doc_id}}) + b"\n", -1)


class BulkWriter:
    """Sends chunks of actions with up to ``max_requests_in_flight`` bulk requests at once."""

    def __init__(
        self,
        client: AsyncElasticsearch,
        *,
        where: str,
        index: str,
        max_requests_in_flight: int = 2,
        chunk_max_docs: int = 2000,
        chunk_max_bytes: int = 10 * 2**20,
        max_retries: int = 5,
        initial_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        refresh: str | bool | None = None,
        document_max_bytes: int = 100 * 2**20,
    ) -> None:
        self.client = client
        self.where = where
        self.index = index
        self.in_flight = max(1, max_requests_in_flight)
        self.chunk_max_docs = max(1, chunk_max_docs)
        self.chunk_max_bytes = max(1, chunk_max_bytes)
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff_seconds
        self.max_backoff = max_backoff_seconds
        self.refresh = refresh
        self.document_max_bytes = document_max_bytes
        self.stats = BulkStats()
        self._queue: asyncio.Queue[list[Action] | None] = asyncio.Queue(maxsize=self.in_flight)
        self._workers: list[asyncio.Task] = []
        self._pending: list[Action] = []
        self._pending_bytes = 0
        self._abandoned = False

    async def __aenter__(self) -> "BulkWriter":
        self._workers = [asyncio.ensure_future(self._consume()) for _ in range(self.in_flight)]
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.flush()
            for _ in self._workers:
                await self._put(None)
            await self._join()
            return
        # The producer failed: drop chunks not yet sent, but let requests in
        # flight finish, so that the caller's clean-up runs after them.
        self._abandoned = True
        while not self._queue.empty():
            self._queue.get_nowait()
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.shield(asyncio.gather(*self._workers, return_exceptions=True))

    async def add(self, actions: list[Action]) -> None:
        """Queue ``actions``; full chunks are handed to the consumers (waits when all are busy)."""
        for action in actions:
            size = len(action.body)
            if size > self.document_max_bytes:
                # Sent alone it would be refused whole (413) or hurt the cluster; report it instead.
                self.stats.failures.append(
                    DocumentFailure(
                        action.doc_id, action.row, 413, "document_too_large",
                        f"the document is {size:,} bytes, over document_max_bytes ({self.document_max_bytes:,})",
                        action.document,
                    )
                )
                continue
            if self._pending and (
                len(self._pending) >= self.chunk_max_docs or self._pending_bytes + size > self.chunk_max_bytes
            ):
                await self.flush()
            self._pending.append(action)
            self._pending_bytes += size

    async def flush(self) -> None:
        """Hand the partial chunk to the consumers."""
        if self._pending:
            chunk, self._pending, self._pending_bytes = self._pending, [], 0
            await self._put(chunk)

    async def _put(self, item: list[Action] | None) -> None:
        # A consumer that died must not leave the producer blocked on a full queue.
        put = asyncio.ensure_future(self._queue.put(item))
        while not put.done():
            done, _ = await asyncio.wait([put, *self._workers], return_when=asyncio.FIRST_COMPLETED)
            for worker in done:
                if worker is not put and worker.exception() is not None:
                    put.cancel()
                    raise worker.exception()

    async def _join(self) -> None:
        results = await asyncio.gather(*self._workers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _consume(self) -> None:
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                return
            if not self._abandoned:
                await self._send(chunk)

    async def _send(self, chunk: list[Action]) -> None:
        attempt = 0
        while chunk:
            body = b"".join(a.body for a in chunk)
            try:
                params: dict[str, Any] = {}
                if self.refresh is not None:
                    params["refresh"] = self.refresh
                response = await self.client.bulk(operations=body, **params)
            except (es_exceptions.ApiError, TransportConnectionError, ConnectionTimeout) as exc:
                status = getattr(getattr(exc, "meta", None), "status", None)
                if status == 413 and len(chunk) == 1:
                    action = chunk[0]
                    self.stats.failures.append(
                        DocumentFailure(
                            action.doc_id, action.row, 413, "request_too_large", str(exc)[:500], action.document
                        )
                    )
                    return
                retryable = status in RETRY_STATUSES or isinstance(exc, (TransportConnectionError, ConnectionTimeout))
                if not retryable or attempt >= self.max_retries:
                    raise translate_error(exc, where=self.where, index=self.index) from exc
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            self.stats.requests += 1
            self.stats.bytes_sent += len(body)
            retry: list[Action] = []
            items = response.body.get("items", [])
            if response.body.get("errors"):
                for action, item in zip(chunk, items):
                    (result,) = item.values()
                    status = result.get("status", 500)
                    if status < 300 or (status == 404 and "delete" in item):
                        continue
                    if status in RETRY_STATUSES and attempt < self.max_retries:
                        retry.append(action)
                        continue
                    error = result.get("error") or {}
                    if isinstance(error, str):
                        error = {"type": "error", "reason": error}
                    reason = error.get("reason", "")
                    cause = error.get("caused_by") or {}
                    if cause.get("reason"):
                        reason = f"{reason} (caused by {cause.get('type')}: {cause.get('reason')})"
                    self.stats.failures.append(
                        DocumentFailure(
                            action.doc_id, action.row, status, error.get("type", "error"), reason, action.document
                        )
                    )
            self.stats.documents += len(chunk) - len(retry)
            if retry:
                attempt += 1
                self.stats.retried_documents += len(retry)
                await asyncio.sleep(self._backoff(attempt))
            chunk = retry
        return

    def _backoff(self, attempt: int) -> float:
        delay = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)  # jitter: consumers do not retry in lockstep


def raise_if_overloaded(stats: BulkStats, where: str) -> None:
    """Turn documents still refused with 429/503 after every retry into a transient error."""
    busy = [f for f in stats.failures if f.status in RETRY_STATUSES]
    if busy:
        raise TransientBackendError(
            f"{where} kept refusing {len(busy)} document(s) with {busy[0].status} after every retry; "
            "lower `max_requests_in_flight` or `chunk_max_docs`, or let the partition be retried"
        )
