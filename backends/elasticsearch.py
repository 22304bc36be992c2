"""The Elasticsearch / OpenSearch backend: bulk loads, sliced point-in-time reads, alias swaps.

* Connection: one pooled async client per configuration and event loop
  (through the pool manager), speaking to Elasticsearch 8/9 and OpenSearch 2/3
  through the dialect layer of :mod:`.elasticsearch_client`.
* Reads: a partition is a slice of one point in time (``slice`` +
  ``search_after`` on ``_shard_doc``), so N slices read one consistent view in
  parallel; sliced scroll where point in time is unavailable. ``columns``
  become ``_source`` includes, ``where`` becomes ``bool.filter`` clauses
  (:mod:`.elasticsearch_query`), and the reference evaluator runs on the
  result for exactness.
* Writes: :mod:`.elasticsearch_bulk`, several requests in flight. Document
  ids come from the key columns, or from (run, partition, row position)
  without a key, so a retried partition overwrites rather than duplicates; a
  ledger index (``ledger_index``) records committed partitions so a retry
  skips them. Replace loads ``<name>-<run id>`` and moves the alias in one
  ``_aliases`` call at publish (:mod:`.elasticsearch_write`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterable, AsyncIterator, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, SecretStr, model_validator

from .base import Backend, Capabilities, Partition, WriteContext, WriteMode, WriteResult
from .elasticsearch_client import DialectClient, PlainJsonNode, detect_dialect, translate_error
from .elasticsearch_mapping import META_KEY, array_paths, decode_schema, decode_sources, index_mapping, schema_from_mapping
from .elasticsearch_query import to_query
from .errors import ConfigurationError, FerryError
from .filters import Filter, filter_batch
from .logos import code_example, docs_url, logo_url
from .pools import pool_manager

logger = logging.getLogger("ferry.elasticsearch")


class _Connection:
    """A live client with the dialect of the server it talks to (one per pool)."""

    def __init__(self, client: DialectClient, dialect, where: str) -> None:
        self.client = client
        self.dialect = dialect
        self.where = where


class ElasticsearchBackend(Backend):
    """Elasticsearch 8/9 and OpenSearch 2/3 indexes as a Ferry source and target."""

    _block_type_name = "Ferry Elasticsearch"
    _block_type_slug = "ferry-elasticsearch"
    _description = "Elasticsearch or OpenSearch indexes: parallel bulk loads, sliced point-in-time reads, alias swaps."
    _logo_url = logo_url("elasticsearch.png")
    _documentation_url = docs_url("elasticsearch.md")
    _code_example = code_example(
        "ferry-elasticsearch", "ferry.backends.elasticsearch", "ElasticsearchBackend", "elasticsearch", side="target"
    )

    kind: ClassVar[str] = "elasticsearch"
    capabilities: ClassVar[Capabilities] = Capabilities(pushdown_columns=True, pushdown_filters=True)

    # -- connection --------------------------------------------------------------
    hosts: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:9200"], description="Node URLs, e.g. https://es1:9200."
    )
    cloud_id: str | None = Field(None, description="Elastic Cloud deployment id (instead of hosts).")
    api_key: SecretStr | None = Field(None, description="API key (base64 'id:key' form).")
    username: str | None = Field(None, description="User name for basic authentication.")
    password: SecretStr | None = Field(None, description="Password for basic authentication.")
    ca_certs: str | None = Field(None, description="Path of a CA certificate bundle to verify the server with.")
    verify_certs: bool = Field(True, description="Verify the server's TLS certificate.")
    request_timeout_seconds: float = Field(60.0, gt=0, description="Timeout of one request, in seconds.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed request on another node (transport level).")
    retry_on_timeout: bool = Field(True, description="Also retry requests that timed out.")
    connections: int | None = Field(None, ge=1, description="Connections per node (the guide's name; same as maxsize).")
    maxsize: int | None = Field(None, ge=1, description="Connections per node (same as connections).")
    dialect: Literal["auto", "elasticsearch", "opensearch"] = Field(
        "auto", description="Server product; auto asks the root endpoint."
    )

    # -- writes ------------------------------------------------------------------
    max_requests_in_flight: int = Field(2, ge=1, description="Bulk requests sent at once per partition.")
    chunk_max_docs: int = Field(2000, ge=1, description="Most documents in one bulk request.")
    chunk_max_bytes: int = Field(10 * 2**20, ge=1024, description="Most bytes in one bulk request.")
    document_max_bytes: int = Field(
        100 * 2**20, ge=1024, description="Largest document sent; bigger ones are refused documents (the server's default request limit is 100 MiB)."
    )
    bulk_max_retries: int = Field(6, ge=0, description="Retries of documents refused with 429 or 503.")
    initial_backoff_seconds: float = Field(0.5, ge=0, description="First wait before retrying refused documents.")
    max_backoff_seconds: float = Field(30.0, ge=0, description="Longest wait between retries (the backoff doubles up to it).")
    number_of_shards: int | None = Field(None, ge=1, description="Primary shards of indexes Ferry creates (cluster default when unset).")
    number_of_replicas: int = Field(1, ge=0, description="Replicas of indexes Ferry loads, after the load.")
    refresh_interval: str = Field("1s", description="Refresh interval of indexes Ferry loads, after the load.")
    tune_existing_index: bool = Field(
        False,
        description="Also set refresh_interval -1 and 0 replicas on an existing index during the load "
        "(its settings are saved in the index's _meta first and restored after).",
    )
    mapping: dict[str, Any] | None = Field(None, description="Mapping of new indexes; its properties win over the inferred ones.")
    searchable: list[str] = Field(
        default_factory=list, description="String columns mapped as text with a keyword sub-field."
    )
    object_fields: dict[str, Literal["object", "nested", "flattened", "disabled"]] = Field(
        default_factory=dict, description="Mapping of struct columns: object (default), nested, flattened or disabled."
    )
    on_document_error: Literal["fail", "collect"] = Field(
        "fail", description="Documents the cluster refuses: fail the run or collect them in a rejects file."
    )
    rejects_dir: str = Field(".ferry/rejects", description="Folder of refused documents with on_document_error collect.")
    ledger_index: str = Field("ferry-ledger", description="Hidden index recording committed partitions (retries skip them).")

    # -- reads -------------------------------------------------------------------
    read_mode: Literal["pit", "scroll"] = Field(
        "pit",
        description="pit: slices of one point in time (one consistent view); scroll: sliced scroll, each "
        "slice consistent on its own (used anyway where point in time is unavailable).",
    )
    page_size: int | None = Field(
        None, ge=1, le=10000, description="Documents per search request (default 10000 with pit, 5000 with scroll)."
    )
    keep_alive: str = Field("5m", description="How long a point in time (or scroll) lives between requests.")
    query: dict[str, Any] | None = Field(
        None, description="Raw query DSL added to every read (not portable to other backends)."
    )
    list_fields: list[str] = Field(default_factory=list, description="Fields read as lists (indexes Ferry did not create).")
    sample_documents: int = Field(200, ge=0, description="Documents sampled to find array fields of indexes Ferry did not create.")
    expose_id: bool = Field(False, description="Add the document _id as a string column named _id.")

    @model_validator(mode="after")
    def _check_connections(self) -> "ElasticsearchBackend":
        if self.connections is not None and self.maxsize is not None and self.connections != self.maxsize:
            raise ValueError(
                f"connections ({self.connections}) and maxsize ({self.maxsize}) both set the connections per node "
                "and differ; set one of them, or both to the same value"
            )
        if not self.hosts and not self.cloud_id:
            raise ValueError("set `hosts` (node URLs) or `cloud_id`")
        return self

    @property
    def connections_per_node(self) -> int:
        """The client's connections per node (``connections`` or ``maxsize``, default 10)."""
        return self.connections or self.maxsize or 10

    @property
    def where(self) -> str:
        return f"cloud {self.cloud_id.split(':', 1)[0]}" if self.cloud_id else ", ".join(self.hosts)

    def describe(self) -> str:
        return f"{self.kind} ({self.where})"

    def location(self, dataset: str) -> str:
        return f"{self.where}/{dataset}"

    # -- lifecycle ---------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "node_class": PlainJsonNode,
            "connections_per_node": self.connections_per_node,
            "request_timeout": self.request_timeout_seconds,
            "max_retries": self.max_retries,
            "retry_on_timeout": self.retry_on_timeout,
            "retry_on_status": (502, 503, 504),
            "verify_certs": self.verify_certs,
        }
        try:
            from elasticsearch.serializer import OrjsonSerializer

            kwargs["serializer"] = OrjsonSerializer()
        except ImportError:  # orjson missing: the stdlib serializer works, slower
            pass
        if self.cloud_id:
            kwargs["cloud_id"] = self.cloud_id
        else:
            kwargs["hosts"] = list(self.hosts)
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key.get_secret_value()
        elif self.username is not None:
            secret = self.password.get_secret_value() if self.password is not None else ""
            kwargs["basic_auth"] = (self.username, secret)
        if self.ca_certs:
            kwargs["ca_certs"] = self.ca_certs
        return kwargs

    async def _create_connection(self) -> _Connection:
        client = DialectClient(**self._client_kwargs())
        try:
            dialect = await detect_dialect(client, self.where)
            if self.dialect != "auto" and dialect.product != self.dialect:
                raise ConfigurationError(
                    f"`dialect: {self.dialect}` but {self.where} answers as {dialect.label}; "
                    "remove the setting or point `hosts` at the right cluster"
                )
        except BaseException as exc:
            await client.close()
            if isinstance(exc, FerryError) or not isinstance(exc, Exception):
                raise
            raise translate_error(exc, where=self.where) from exc
        logger.debug("connected to %s at %s", dialect.label, self.where)
        return _Connection(client, dialect, self.where)

    async def open(self) -> None:
        if "conn" in self._live:
            return
        conn = await pool_manager.acquire(
            self.kind,
            self.config_hash(),
            self._create_connection,
            closer=lambda c: c.client.close(),
            stats=_pool_stats,
            limits={
                "connections_per_node": self.connections_per_node,
                "max_requests_in_flight": self.max_requests_in_flight,
                "request_timeout_seconds": self.request_timeout_seconds,
                "max_retries": self.max_retries,
            },
        )
        self._live["conn"] = conn

    async def close(self) -> None:
        conn = self._live.pop("conn", None)
        if conn is None:
            return
        for pit_id in self._live.pop("pits", []):
            try:
                await asyncio.shield(conn.dialect.close_pit(conn.client, pit_id))
            except Exception:  # it expires after keep_alive anyway
                pass
        await pool_manager.release(self.kind, self.config_hash())

    def _conn(self) -> _Connection:
        conn = self._live.get("conn")
        if conn is None:
            raise RuntimeError("the Elasticsearch backend is not open; use `async with backend:`")
        return conn

    async def _call(self, coroutine, index: str | None = None):
        """Await a client call, turning its errors into Ferry's."""
        try:
            return await coroutine
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, where=self._conn().where, index=index) from exc

    # -- metadata ----------------------------------------------------------------
    async def index_info(self, dataset: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(concrete index, mapping properties, Ferry's _meta) of ``dataset`` (an index or alias)."""
        response = await self._call(self._conn().client.indices.get_mapping(index=dataset), dataset)
        if not response.body:
            raise ConfigurationError(f"index {dataset!r} on {self.where} does not exist; check the dataset name")
        # An alias over several indexes: the newest name (versioned names sort by run id) wins.
        concrete = sorted(response.body)[-1]
        mappings = response.body[concrete].get("mappings", {})
        return concrete, mappings.get("properties", {}) or {}, (mappings.get("_meta") or {}).get(META_KEY) or {}

    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        cache = self._live.setdefault("schemas", {})
        if dataset not in cache:
            _, properties, meta = await self.index_info(dataset)
            if meta.get("arrow_schema"):
                schema = decode_schema(meta["arrow_schema"])
            else:
                schema = schema_from_mapping(properties, set(self.list_fields) | await self._sampled_arrays(dataset))
            if self.expose_id and schema.get_field_index("_id") < 0:
                schema = schema.append(pa.field("_id", pa.string()))
            cache[dataset] = (schema, properties)
        schema = cache[dataset][0]
        if columns is None:
            return schema
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ConfigurationError(
                f"index {dataset!r} has no field(s) {', '.join(map(repr, missing))}; available: {', '.join(schema.names)}",
                path="source.columns",
            )
        return pa.schema([schema.field(c) for c in columns])

    async def _sampled_arrays(self, dataset: str) -> set[str]:
        if not self.sample_documents:
            return set()
        response = await self._call(self._conn().client.search(index=dataset, size=self.sample_documents), dataset)
        return array_paths(hit.get("_source") or {} for hit in response.body["hits"]["hits"])

    async def count(self, dataset: str, where: Filter | None = None) -> int:
        if where is not None:  # only the reference evaluator is exact: read and count
            return await super().count(dataset, where)
        response = await self._call(self._conn().client.count(index=dataset, query=self._query(None, pa.schema([]), {})), dataset)
        return response.body["count"]

    async def exists(self, dataset: str) -> bool:
        response = await self._call(self._conn().client.indices.exists(index=dataset), dataset)
        return bool(response)

    # -- reading -----------------------------------------------------------------
    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        conn = self._conn()
        schema = await self.schema(dataset)
        properties = self._live["schemas"][dataset][1]
        query = self._query(where, schema, properties)
        count = (await self._call(conn.client.count(index=dataset, query=query), dataset)).body["count"]
        slices = max(1, min(hint, 1024))
        pit_id = None
        if self.read_mode == "pit":
            try:
                pit_id = await conn.dialect.open_pit(conn.client, dataset, self.keep_alive)
                self._live.setdefault("pits", []).append(pit_id)
            except Exception as exc:
                status = getattr(getattr(exc, "meta", None), "status", None)
                if status not in (400, 404, 405):
                    raise translate_error(exc, where=conn.where, index=dataset) from exc
                logger.warning("point in time unavailable on %s (%s); reading with sliced scroll", conn.where, status)
        return [
            Partition(
                id=f"slice-{i:04d}-of-{slices:04d}",
                dataset=dataset,
                spec={"pit": pit_id, "slice": i, "max": slices},
                estimated_rows=count // slices + (1 if i < count % slices else 0),
            )
            for i in range(slices)
        ]

    def _query(self, where: Filter | None, schema: pa.Schema, properties: dict[str, Any]) -> dict[str, Any]:
        pushed = to_query(where, schema, properties)
        clauses: dict[str, Any] = {}
        if pushed is not None:
            clauses["filter"] = pushed["bool"]["filter"]
        if self.query:
            clauses["must"] = [self.query]
        return {"bool": clauses} if clauses else {"match_all": {}}

    async def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        dataset = partition.dataset
        full = await self.schema(dataset)
        properties = self._live["schemas"][dataset][1]
        needed = full.names if columns is None else list(columns) + sorted((where.columns() if where else set()) - set(columns))
        needed = [n for n in needed if full.get_field_index(n) >= 0]
        read_schema = pa.schema([full.field(n) for n in needed])
        body: dict[str, Any] = {
            "query": self._query(where, full, properties),
            "_source": {"includes": [n for n in needed if n != "_id"]} if columns is not None else True,
            "size": min(self.page_size or (10000 if partition.spec.get("pit") else 5000), batch_rows),
            "track_total_hits": False,
        }
        if partition.spec["max"] > 1:
            body["slice"] = {"id": partition.spec["slice"], "max": partition.spec["max"]}
        pages = self._pit_pages(partition, body) if partition.spec.get("pit") else self._scroll_pages(dataset, body)
        async for hits in _prefetch(pages):
            sources = [h.get("_source") or {} for h in hits]
            ids = [h["_id"] for h in hits] if "_id" in needed else None
            batch = await asyncio.to_thread(decode_sources, sources, read_schema, ids)
            if where is not None:
                batch = filter_batch(batch, where)
            if columns is not None and batch.schema.names != list(columns):
                batch = batch.select(columns)
            if batch.num_rows:
                yield batch

    async def _pit_pages(self, partition: Partition, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        conn = self._conn()
        pit_id = partition.spec["pit"]
        body = {**body, "sort": [{"_shard_doc": "asc"}]}
        search_after = None
        while True:
            request = {**body, "pit": {"id": pit_id, "keep_alive": self.keep_alive}}
            if search_after is not None:
                request["search_after"] = search_after
            response = await self._call(conn.client.search(body=request), partition.dataset)
            hits = response.body["hits"]["hits"]
            pit_id = response.body.get("pit_id", pit_id)
            if not hits:
                return
            search_after = hits[-1]["sort"]
            yield hits
            if len(hits) < body["size"]:
                return

    async def _scroll_pages(self, dataset: str, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        client = self._conn().client
        body = {key: value for key, value in body.items() if key != "track_total_hits"}  # refused with scroll
        response = await self._call(
            client.search(index=dataset, body={**body, "sort": ["_doc"]}, scroll=self.keep_alive), dataset
        )
        scroll_id = response.body.get("_scroll_id")
        try:
            while True:
                hits = response.body["hits"]["hits"]
                if not hits:
                    return
                yield hits
                response = await self._call(client.scroll(scroll_id=scroll_id, scroll=self.keep_alive), dataset)
                scroll_id = response.body.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                try:
                    await asyncio.shield(client.clear_scroll(scroll_id=scroll_id))
                except Exception:
                    pass

    # -- writing (see elasticsearch_write) ---------------------------------------------
    def check_write(self, mode: WriteMode, key: tuple[str, ...]) -> None:
        super().check_write(mode, key)
        if mode is WriteMode.APPEND and not key:
            note = (
                "no `key`: document ids come from run, partition and row position, so appends are not "
                "retry-safe across runs and a retried partition overwrites its earlier attempt only when "
                "the source returns the same rows in the same order; set `key: [...]` for deterministic ids"
            )
            self._live["plan_note"] = note
            logger.warning(note)

    def describe_target_schema(self, schema: pa.Schema) -> str:
        import json

        conn = self._live.get("conn")
        mapping = index_mapping(
            schema,
            searchable=self.searchable,
            object_modes=self.object_fields,
            user_mapping=self.mapping,
            product=conn.dialect.product if conn is not None else "elasticsearch",
        )
        mapping["_meta"][META_KEY]["arrow_schema"] = "<the Arrow schema, base64 IPC>"
        text = json.dumps({"mappings": mapping}, indent=2)
        note = self._live.get("plan_note")
        return f"{text}\n# note: {note}" if note else text

    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        from .elasticsearch_write import begin_write

        await begin_write(self, dataset, ctx)

    async def write(
        self, dataset: str, partition_id: str, batches: AsyncIterable[pa.RecordBatch], ctx: WriteContext
    ) -> WriteResult:
        from .elasticsearch_write import write_partition

        return await write_partition(self, dataset, partition_id, batches, ctx)

    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        from .elasticsearch_write import publish

        await publish(self, dataset, ctx)
        self._live.pop("schemas", None)

    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        from .elasticsearch_write import abort

        await asyncio.shield(abort(self, dataset, ctx))
        self._live.pop("schemas", None)

    async def discard_run(self, dataset: str, run_id: str, mode: WriteMode) -> list[str]:
        """Delete the unfinished index of a dead replace run (an index behind the alias stays).

        A dead append or upsert run's documents are data (bulk writes are
        idempotent by id); the index settings its load changed are restored
        by ``ferry repair``.
        """
        from .elasticsearch_write import discard_replace_index

        if mode is not WriteMode.REPLACE:
            return []
        return await discard_replace_index(self, dataset, run_id)

    async def repair(self, dataset: str) -> list[str]:
        """Restore settings a crashed load left and delete its unfinished replace index."""
        from .elasticsearch_write import repair

        return await repair(self, dataset)


class OpenSearchBackend(ElasticsearchBackend):
    """The same backend for OpenSearch 2/3 (the dialect is still detected; this name reads better in jobs)."""

    _block_type_name = "Ferry OpenSearch"
    _block_type_slug = "ferry-opensearch"
    _description = "OpenSearch indexes: parallel bulk loads, sliced point-in-time reads, alias swaps."
    _logo_url = logo_url("opensearch.png")
    _documentation_url = docs_url("elasticsearch.md")
    _code_example = code_example(
        "ferry-opensearch", "ferry.backends.elasticsearch", "OpenSearchBackend", "opensearch", side="target"
    )

    kind: ClassVar[str] = "opensearch"

    hosts: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:9200"], description="Node URLs, e.g. https://os1:9200."
    )


async def _prefetch(pages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Iterate ``pages`` one item ahead: the next search runs while the caller decodes this page."""
    iterator = pages.__aiter__()
    pending = asyncio.ensure_future(anext(iterator, None))
    try:
        while True:
            item = await pending
            if item is None:
                return
            pending = asyncio.ensure_future(anext(iterator, None))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()


def _pool_stats(conn: _Connection) -> dict[str, Any]:
    nodes = list(conn.client.transport.node_pool.all())
    return {"product": conn.dialect.label, "nodes": len(nodes), "where": conn.where}
