"""The Elasticsearch / OpenSearch record store: one document per record, bulk batches, exact queries.

* Layout and settings (:mod:`ferry.backends.records_elasticsearch_index`):
  the record id is the document ``_id``; the fields are stored exactly as
  JSON text in a storage-only field and indexed, per value kind, in typed
  sub-fields (strings as keyword). The index (``index``, default
  ``records``) is created on first use with that mapping.
* Connections: the migration backend's settings and pool. The config is an
  :class:`~ferry.backends.elasticsearch.ElasticsearchBackend` (a dict of its
  connection and bulk fields, a saved block, or a settings file's
  ``databases.elasticsearch`` section); its pooled client (with the dialect
  layer that serves OpenSearch too) comes from the pool manager, shared with
  migrations of the same settings.
* Batches: create, update, upsert and delete batches are one bulk request
  each (cut only where a request would pass ``chunk_max_bytes``), with
  per-record errors from the bulk response; ``read_batch`` is one ``mget``.
  Bulk requests carry ``refresh`` (default false, the guide's advice for
  bulk indexing); with ``read_your_writes`` (default) the index is
  refreshed once before the next search or count after a write.
* Queries (:mod:`ferry.backends.records_elasticsearch_query`): filters
  become ``bool.filter`` clauses (no scoring); what the index cannot answer
  exactly is pushed as a superset and finished by the reference evaluator.
  Pages follow ``search_after`` on the sort keys plus the id; an offset
  within ``index.max_result_window`` is a ``from``, a larger one is skipped
  with ``search_after`` pages of sort values only.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, ClassVar, Iterable, Mapping

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout
from elasticsearch import exceptions as es_exceptions

from . import records_elasticsearch_index as ri
from . import records_elasticsearch_query as rq
from .elasticsearch import ElasticsearchBackend, OpenSearchBackend, _prefetch
from .elasticsearch_bulk import RETRY_STATUSES, Action, delete_action, index_action
from .elasticsearch_client import translate_error
from .errors import ConfigurationError, FerryError
from .pools import pool_manager
from .records import AsyncDatabase, coerce_ids
from .records_elasticsearch_index import SLOWLOG_SETTINGS, ElasticsearchRecordSettings
from .records_model import BatchResult, Record, RecordError, normalize_id
from .records_query import Query
from .records_reference import compile_filter, ordered_batches, project

__all__ = ["ElasticsearchRecordStore", "OpenSearchRecordStore", "ElasticsearchRecordSettings", "SLOWLOG_SETTINGS"]


@dataclass
class _Plan:
    """How a query runs: the ES query, whether it is exact, the residual predicate and the sort."""

    query: dict[str, Any]
    exact: bool
    keep: Callable[[Mapping[str, Any]], bool] | None
    #: ES sort (sort keys, then rid); None: the matches are ordered in process.
    sort: list[dict[str, Any]] | None


_SOURCE = ["src", "meta"]
_BY_ID = [{"rid": {"order": "asc"}}]


class ElasticsearchRecordStore(AsyncDatabase):
    """Records in one Elasticsearch / OpenSearch index (see the module docstring)."""

    backend: ClassVar[str] = "elasticsearch"
    #: The migration backend whose settings, client and pool the store uses.
    block_class: ClassVar[type[ElasticsearchBackend]] = ElasticsearchBackend

    def __init__(self, connection: ElasticsearchBackend, settings: ElasticsearchRecordSettings) -> None:
        self.connection = connection
        self.settings = settings
        self.index = settings.index
        #: ``index.max_result_window`` of the index (read when the store opens).
        self.max_result_window = 10_000
        self._dirty = False
        self._open = False

    @classmethod
    async def open(cls, config: Any) -> "ElasticsearchRecordStore":
        """Connect (through the pool manager), create the index if it is missing, apply the slowlog settings."""
        connection, settings = ri.split_config(config, cls.block_class)
        store = cls(connection, settings)
        await connection.open()
        store._open = True
        try:
            await store._ensure_index()
            if settings.slowlog:
                await store.set_slowlog(settings.slowlog)
        except BaseException:
            await store.close()
            raise
        return store

    def _client(self) -> Any:
        if not self._open:
            raise ConfigurationError("this record store is closed; open a new one with AsyncDatabase.create")
        return self.connection._conn().client

    async def _call(self, coroutine: Any, what: str) -> Any:
        """Await a client call, turning its errors into Ferry's (with what the store was doing)."""
        try:
            return await coroutine
        except FerryError:
            raise
        except Exception as exc:
            error = translate_error(exc, where=self.connection.where, index=self.index)
            error.add_note(f"while {what}")
            raise error from None

    async def _ensure_index(self) -> None:
        client = self._client()
        if not await self._call(client.indices.exists(index=self.index), "checking the index"):
            body = ri.index_body(self.settings.index_settings)
            try:
                await client.indices.create(index=self.index, settings=body["settings"], mappings=body["mappings"])
            except es_exceptions.BadRequestError as exc:
                if "already_exists" not in str(exc):  # another store created it meanwhile: fine
                    raise translate_error(exc, where=self.connection.where, index=self.index) from None
            except Exception as exc:
                raise translate_error(exc, where=self.connection.where, index=self.index) from None
        mapping = (await self._call(client.indices.get_mapping(index=self.index), "reading the mapping")).body
        concrete = sorted(mapping)[-1]
        meta = (mapping[concrete].get("mappings") or {}).get("_meta") or {}
        if not (meta.get("ferry") or {}).get("records_layout"):
            raise ConfigurationError(
                f"index {self.index!r} on {self.connection.where} exists but is not a record index (its mapping has "
                "no _meta.ferry.records_layout); give the store another `index` name",
                path="config.index",
            )
        settings = await self._index_settings()
        window = settings.get("index.max_result_window")
        self.max_result_window = int(window) if window is not None else 10_000

    async def close(self) -> None:
        """Give the client back to the pool manager (the last user closes it)."""
        if self._open:
            self._open = False
            await self.connection.close()

    # -- refresh and slowlog -------------------------------------------------------------

    async def refresh(self) -> None:
        """Make every write so far visible to searches (``POST /<index>/_refresh``)."""
        self._dirty = False
        await self._call(self._client().indices.refresh(index=self.index), "refreshing")

    async def _before_search(self) -> None:
        if self._dirty and self.settings.read_your_writes:
            await self.refresh()

    async def set_slowlog(
        self, thresholds: Mapping[str, str | None] | None = None, **short: str | None
    ) -> dict[str, str | None]:
        """Set the index's slowlog thresholds; returns the settings sent.

        ``thresholds`` by full setting name (the guide's form) or short name
        (``query.warn``), or keywords (``query_warn="10s"``); None resets one
        (see :func:`~ferry.backends.records_elasticsearch_index.slowlog_settings`).
        """
        settings = ri.slowlog_settings(thresholds, **short)
        if settings:
            client = self._client()
            await self._call(client.indices.put_settings(index=self.index, settings=settings), "setting slowlog")
        return settings

    async def get_slowlog(self) -> dict[str, str]:
        """The slowlog thresholds set on the index, by full setting name (as the server reports them)."""
        settings = await self._index_settings()
        return {name: value for name, value in settings.items() if name in ri.SLOWLOG_SETTINGS.values()}

    async def _index_settings(self) -> dict[str, Any]:
        """The index's settings, flat (``index.max_result_window``: ``"10000"``)."""
        client = self._client()
        response = await self._call(client.indices.get_settings(index=self.index, flat_settings=True), "reading settings")
        body = response.body
        return body[sorted(body)[-1]]["settings"]  # an alias: its newest index

    # -- bulk ------------------------------------------------------------------------------

    def _chunks(self, actions: list[Action]) -> list[list[Action]]:
        """Bulk requests of a batch: one, cut only where it would pass ``chunk_max_bytes``."""
        chunks: list[list[Action]] = [[]]
        size = 0
        for action in actions:
            if chunks[-1] and size + len(action.body) > self.connection.chunk_max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(action)
            size += len(action.body)
        return [chunk for chunk in chunks if chunk]

    async def _bulk(self, actions: list[Action]) -> dict[int, dict[str, Any]]:
        """Send ``actions``; each item's result (status, result, error) by the action's ``row``.

        Items refused with 429 / 503, or a whole request refused so, are sent
        again after a backoff that doubles up to ``max_backoff_seconds``.
        """
        results: dict[int, dict[str, Any]] = {}
        if not actions:
            return results
        slots = asyncio.Semaphore(self.connection.max_requests_in_flight)

        async def send(chunk: list[Action]) -> None:
            async with slots:
                attempt = 0
                while chunk:
                    try:
                        response = await self._client().bulk(
                            operations=b"".join(a.body for a in chunk), refresh=self.settings.refresh
                        )
                    except (es_exceptions.ApiError, TransportConnectionError, ConnectionTimeout) as exc:
                        status = getattr(getattr(exc, "meta", None), "status", None)
                        busy = status in RETRY_STATUSES or not isinstance(exc, es_exceptions.ApiError)
                        if not busy or attempt >= self.connection.bulk_max_retries:
                            raise translate_error(exc, where=self.connection.where, index=self.index) from None
                        attempt += 1
                        await asyncio.sleep(self._backoff(attempt))
                        continue
                    retry = []
                    for action, item in zip(chunk, response.body.get("items", [])):
                        (outcome,) = item.values()
                        if outcome.get("status") in RETRY_STATUSES and attempt < self.connection.bulk_max_retries:
                            retry.append(action)
                        else:
                            results[action.row] = outcome
                    if retry:
                        attempt += 1
                        await asyncio.sleep(self._backoff(attempt))
                    chunk = retry

        tasks = [asyncio.ensure_future(send(chunk)) for chunk in self._chunks(actions)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one chunk failed for good: the others stop too
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if results and self.settings.refresh is False:
                self._dirty = True
        return results

    def _backoff(self, attempt: int) -> float:
        delay = min(self.connection.max_backoff_seconds, self.connection.initial_backoff_seconds * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)

    def _action(self, op: str, record_id: str, body: dict[str, Any], row: int) -> Action | RecordError:
        document = orjson.dumps(body)
        if len(document) > self.connection.document_max_bytes:
            return RecordError(
                row,
                f"the record is {len(document):,} bytes as a document, over document_max_bytes "
                f"({self.connection.document_max_bytes:,})",
                record_id,
            )
        return index_action(self.index, record_id, document, row, op=op)

    # -- writes ------------------------------------------------------------------------

    async def create_batch(self, records: Iterable[Record]) -> BatchResult:
        items = records if isinstance(records, list) else list(records)
        ids: list[str | None] = [None] * len(items)
        errors: list[RecordError] = []
        actions: list[Action] = []
        seen: set[str] = set()
        now = _now_ms()
        for index, item in enumerate(items):
            prepared = ri.prepare(index, item, pairs=False)
            if isinstance(prepared, RecordError):
                errors.append(prepared)
                continue
            record_id, doc = prepared
            if record_id is None:
                record_id = uuid.uuid4().hex
            elif record_id in seen:
                reason = f"a record with id {record_id!r} already exists (earlier in this batch)"
                errors.append(RecordError(index, reason, record_id))
                continue
            seen.add(record_id)
            document = {"rid": record_id, **doc, "created_at": now, "updated_at": now}
            action = self._action("create", record_id, document, index)
            if isinstance(action, RecordError):
                errors.append(action)
            else:
                actions.append(action)
        outcomes = await self._bulk(actions)
        for action in actions:
            outcome = outcomes[action.row]
            if outcome.get("status", 500) < 300:
                ids[action.row] = action.doc_id
            elif outcome.get("status") == 409:
                reason = f"a record with id {action.doc_id!r} already exists"
                errors.append(RecordError(action.row, reason, action.doc_id))
            else:
                errors.append(RecordError(action.row, _reason(outcome), action.doc_id))
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def update_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return await self._replace(items, insert=False)

    async def upsert_batch(self, items: Iterable[Record | tuple[str | int, Record]]) -> BatchResult:
        return await self._replace(items, insert=True)

    async def _replace(self, items: Iterable[Any], *, insert: bool) -> BatchResult:
        """One bulk request of ``update`` actions (with ``upsert`` bodies when inserting); the last item for an id wins."""
        ids: list[str | None] = []
        errors: list[RecordError] = []
        actions: list[Action] = []
        now = _now_ms()
        for index, item in enumerate(items):
            ids.append(None)
            prepared = ri.prepare(index, item, pairs=True)
            if isinstance(prepared, RecordError):
                errors.append(prepared)
                continue
            record_id, doc = prepared
            if record_id is None:
                if not insert:
                    errors.append(RecordError(index, "an update needs the record's id: pass (id, record)"))
                    continue
                record_id = uuid.uuid4().hex
            # created_at is set on insert only: an update merges into the stored document.
            body: dict[str, Any] = {"doc": {"rid": record_id, **doc, "updated_at": now}}
            if insert:
                body["upsert"] = {"rid": record_id, **doc, "created_at": now, "updated_at": now}
            action = self._action("update", record_id, body, index)
            if isinstance(action, RecordError):
                errors.append(action)
            else:
                actions.append(action)
        outcomes = await self._bulk(actions)
        for action in actions:
            outcome = outcomes[action.row]
            if outcome.get("status", 500) < 300:
                ids[action.row] = action.doc_id
            elif outcome.get("status") == 404 and not insert:
                errors.append(RecordError(action.row, f"no record with id {action.doc_id!r} to update", action.doc_id))
            else:
                errors.append(RecordError(action.row, _reason(outcome), action.doc_id))
        errors.sort(key=lambda error: error.index)
        return BatchResult(ids, errors)

    async def delete_batch(self, ids: Iterable[str | int]) -> list[bool]:
        keys = coerce_ids(ids)
        actions = [Action(key, delete_action(self.index, key).body, row) for row, key in enumerate(keys)]
        outcomes = await self._bulk(actions)
        # A repeated id was deleted once: the later actions find nothing (404).
        return [outcomes[row].get("result") == "deleted" for row in range(len(keys))]

    async def clear(self) -> None:
        """Delete every record (the index, its mapping and settings stay)."""
        client = self._client()
        await self.refresh()  # delete_by_query sees what a search sees
        await self._call(
            client.delete_by_query(index=self.index, query=rq.MATCH_ALL, conflicts="proceed", refresh=True),
            "clearing records",
        )

    # -- reads by id -------------------------------------------------------------------

    async def read_batch(self, ids: Iterable[str | int]) -> list[Record | None]:
        keys = coerce_ids(ids)
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        response = await self._call(
            self._client().mget(index=self.index, ids=unique, source_includes=_SOURCE), "reading records"
        )
        found = {doc["_id"]: doc["_source"] for doc in response.body["docs"] if doc.get("found")}
        # One Record per position: a repeated id gives independent copies.
        return [None if (source := found.get(key)) is None else ri.record_from_source(key, source) for key in keys]

    async def exists(self, id: str | int) -> bool:
        key = normalize_id(id)
        return bool(await self._call(self._client().exists(index=self.index, id=key), "checking a record"))

    # -- queries -----------------------------------------------------------------------

    async def _search(self, **body: Any) -> dict[str, Any]:
        response = await self._call(self._client().search(index=self.index, **body), "searching records")
        return response.body

    async def _plan(self, query: Query, *, with_sort: bool = True) -> _Plan:
        """Translate the filter; one request checks for values the index cannot compare or order exactly."""
        node = query.filter_spec
        predicate = compile_filter(node)  # refuses a bad regex before any request
        columns = sorted(rq.value_columns(node))
        sort_fields = [key.field for key in query.sort_keys] if with_sort else []
        aggs: dict[str, Any] = {}
        if columns:
            aggs["inexact"] = {"filters": {"filters": {f"c{i}": rq.inexact_clause(c) for i, c in enumerate(columns)}}}
        if sort_fields:
            superset, _ = rq.translate(node, set(columns))
            odd = {"bool": {"should": [rq.unsortable_clause(f) for f in sort_fields], "minimum_should_match": 1}}
            aggs["unsortable"] = {"filter": {"bool": {"filter": [superset, odd]}}}
        inexact: set[str] = set()
        in_process = False
        if aggs:
            await self._before_search()
            found = (await self._search(size=0, aggs=aggs, track_total_hits=False)).get("aggregations", {})
            buckets = (found.get("inexact") or {}).get("buckets") or {}
            inexact = {c for i, c in enumerate(columns) if (buckets.get(f"c{i}") or {}).get("doc_count", 0)}
            in_process = bool((found.get("unsortable") or {}).get("doc_count", 0))
        es_query, exact = rq.translate(node, inexact)
        if in_process:
            sort = None
        else:
            sort = rq.sort_clauses(query.sort_keys) if sort_fields else _BY_ID
        return _Plan(es_query, exact, None if exact else predicate, sort)

    async def count(self, query: Query | None = None) -> int:
        query = query or Query()
        plan = await self._plan(query, with_sort=False)
        if not plan.exact:
            total = 0
            unsorted = Query(query.filter_spec, offset=query.offset_value, limit=query.limit_value)
            async for batch in self._read_batches(unsorted, 10_000):
                total += len(batch)
            return total
        await self._before_search()
        response = await self._call(self._client().count(index=self.index, query=plan.query), "counting records")
        total = max(0, response.body["count"] - query.offset_value)
        return total if query.limit_value is None else min(total, query.limit_value)

    async def _read_batches(self, query: Query, batch_size: int) -> AsyncIterator[list[Record]]:
        plan = await self._plan(query)
        offset, limit, select = query.offset_value, query.limit_value, query.select_fields
        if limit == 0:
            return
        await self._before_search()
        if plan.sort is None:
            async for batch in self._sorted_in_process(query, plan, batch_size):
                yield batch
            return
        # Exact: the server skips and limits. Otherwise the reference evaluator filters, then skip and limit here.
        if plan.exact:
            pages = self._pages(plan.query, plan.sort, batch_size, offset=offset, limit=limit)
            skip, take = 0, None
        else:
            pages = self._pages(plan.query, plan.sort, batch_size)
            skip, take = offset, limit
        pending: list[Record] = []
        async for hits in _prefetch(pages):
            for hit in hits:
                record = ri.record_from_source(hit["_id"], hit.get("_source") or {})
                if plan.keep is not None and not plan.keep(record.fields):
                    continue
                if skip:
                    skip -= 1
                    continue
                if select is not None:
                    record.fields = project(record.fields, select)
                pending.append(record)
                if take is not None:
                    take -= 1
                    if take == 0:
                        break
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
            if take == 0:
                break
        if pending:
            yield pending

    async def _pages(
        self,
        query: dict[str, Any],
        sort: list[dict[str, Any]],
        page_size: int,
        *,
        offset: int = 0,
        limit: int | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Hits in ``sort`` order from ``offset``, at most ``limit``, ``search_after`` from page to page.

        ``from + size`` never passes ``max_result_window``: an offset within
        the window is the first request's ``from``; a larger one is skipped
        with pages of sort values only (``_source: false``).
        """
        window = max(1, self.max_result_window)
        size_cap = max(1, min(page_size, window))
        search_after: list[Any] | None = None
        start = offset
        if offset >= window:
            while start > 0:
                size = min(window, start)
                hits = (await self._search(query=query, sort=sort, size=size, source=False, track_total_hits=False,
                                           **({"search_after": search_after} if search_after else {})))["hits"]["hits"]
                if not hits:
                    return
                start -= len(hits)
                search_after = hits[-1]["sort"]
                if len(hits) < size:
                    return
        remaining = limit
        while remaining is None or remaining > 0:
            size = size_cap if remaining is None else min(size_cap, remaining)
            body: dict[str, Any] = {"query": query, "sort": sort, "source": _SOURCE, "track_total_hits": False}
            if search_after is not None:
                body["search_after"] = search_after
            elif start:
                size = min(size, window - start)
                body["from_"] = start
            hits = (await self._search(size=size, **body))["hits"]["hits"]
            if not hits:
                return
            yield hits
            if remaining is not None:
                remaining -= len(hits)
            if len(hits) < size:
                return
            search_after = hits[-1]["sort"]

    async def _sorted_in_process(self, query: Query, plan: _Plan, batch_size: int) -> AsyncIterator[list[Record]]:
        """Sort on values the index cannot order (lists, dicts, x values): the matches are ordered by the reference."""
        matches: dict[str, Record] = {}
        async for hits in _prefetch(self._pages(plan.query, _BY_ID, self.max_result_window)):
            for hit in hits:
                record = ri.record_from_source(hit["_id"], hit.get("_source") or {})
                if plan.keep is None or plan.keep(record.fields):
                    matches[record.id] = record
        for batch in ordered_batches(matches, query, batch_size):
            yield batch

    # -- pools -----------------------------------------------------------------------------------

    def get_pool_info(self) -> dict[str, dict[str, Any]]:
        """The pool manager's report on every open pool (this store's client among them)."""
        return pool_manager.get_pool_info()

    def get_pool_count(self) -> int:
        """Number of open pools in this process."""
        return pool_manager.get_pool_count()


class OpenSearchRecordStore(ElasticsearchRecordStore):
    """The same store for OpenSearch 2/3 (the dialect is detected either way; settings of an OpenSearchBackend)."""

    backend: ClassVar[str] = "opensearch"
    block_class: ClassVar[type[ElasticsearchBackend]] = OpenSearchBackend


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _reason(outcome: Mapping[str, Any]) -> str:
    error = outcome.get("error") or {}
    if isinstance(error, str):
        return f"{outcome.get('status')} {error}"
    reason = f"{outcome.get('status')} {error.get('type', 'error')}: {error.get('reason', '')}"
    cause = error.get("caused_by") or {}
    if cause.get("reason"):
        reason += f" (caused by {cause.get('type')}: {cause.get('reason')})"
    return reason
