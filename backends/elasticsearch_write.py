"""The write protocol of the Elasticsearch / OpenSearch backend.

* ``begin_write`` creates the index a run loads (``<name>-<run id>`` for
  replace, ``<name>`` for a new target) from the Arrow schema, with
  ``refresh_interval: -1`` and 0 replicas; the values to restore are saved
  first in the index's ``_meta`` (``ferry.saved_settings``), so a later run
  restores them even after a crash. An existing index is tuned the same way
  only with ``tune_existing_index``.
* ``write`` bulk-loads one partition (idempotent per run and partition: ids
  are deterministic and a ledger index records committed partitions).
* ``publish`` restores the settings, refreshes, and for replace moves the
  alias in one atomic ``_aliases`` call (on the first replace of a concrete
  index, adds the alias and removes that index in the same call), then
  deletes the old index.
* ``abort`` deletes an unfinished replace index; for other modes it restores
  the saved settings (committed partitions stay).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import TYPE_CHECKING, Any, AsyncIterable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .base import WriteContext, WriteMode, WriteResult
from .elasticsearch_bulk import BulkWriter, delete_action, index_action, raise_if_overloaded
from .elasticsearch_mapping import (
    META_KEY,
    decode_schema,
    decode_sources,
    encode_documents,
    encode_schema,
    field_mapping,
    index_mapping,
    key_ids,
)
from .errors import ConfigurationError, DataError

if TYPE_CHECKING:
    from .elasticsearch import ElasticsearchBackend


def version_index(dataset: str, run_id: str) -> str:
    """The index a replace run loads: ``<name>-<run id>`` (lower case, as index names must be)."""
    return f"{dataset}-{re.sub(r'[^a-z0-9_-]', '-', run_id.lower())}"


async def _meta(backend: "ElasticsearchBackend", index: str) -> dict[str, Any]:
    response = await backend._call(backend._conn().client.indices.get_mapping(index=index), index)
    (mappings,) = [v.get("mappings", {}) for v in response.body.values()][:1] or [{}]
    return dict(mappings.get("_meta") or {})


async def _update_ferry_meta(backend: "ElasticsearchBackend", index: str, **changes: Any) -> None:
    """Set (or, with None, remove) keys of ``_meta.ferry`` of ``index`` (read, modify, write)."""
    meta = await _meta(backend, index)
    ferry = dict(meta.get(META_KEY) or {})
    for key, value in changes.items():
        if value is None:
            ferry.pop(key, None)
        else:
            ferry[key] = value
    meta[META_KEY] = ferry
    await backend._call(backend._conn().client.indices.put_mapping(index=index, meta=meta), index)


async def _settings(backend: "ElasticsearchBackend", index: str) -> dict[str, Any]:
    response = await backend._call(
        backend._conn().client.indices.get_settings(index=index, include_defaults=True), index
    )
    (body,) = list(response.body.values())[:1]
    settings = body.get("settings", {}).get("index", {})
    defaults = body.get("defaults", {}).get("index", {})
    return {
        "refresh_interval": settings.get("refresh_interval", defaults.get("refresh_interval", "1s")),
        "number_of_replicas": int(settings.get("number_of_replicas", defaults.get("number_of_replicas", 1))),
    }


async def _put_settings(backend: "ElasticsearchBackend", index: str, values: dict[str, Any]) -> None:
    await backend._call(
        backend._conn().client.indices.put_settings(index=index, settings={"index": values}), index
    )


async def _ensure_ledger(backend: "ElasticsearchBackend") -> None:
    client = backend._conn().client
    name = backend.ledger_index
    if await backend._call(client.indices.exists(index=name), name):
        return
    try:
        await client.indices.create(
            index=name,
            settings={"index": {"hidden": True, "number_of_replicas": 0}},
            mappings={"dynamic": False, "properties": {"index": {"type": "keyword"}, "run_id": {"type": "keyword"}}},
        )
    except Exception as exc:
        if "resource_already_exists" not in str(exc):
            raise


def _ledger_id(index: str, run_id: str, partition_id: str) -> str:
    return f"{index}/{run_id}/{partition_id}"


async def begin_write(backend: "ElasticsearchBackend", dataset: str, ctx: WriteContext) -> None:
    """Create or prepare the index this run loads; see the module docstring."""
    client = backend._conn().client
    backend._live.pop("schemas", None)
    await _ensure_ledger(backend)
    exists = await backend._call(client.indices.exists(index=dataset), dataset)
    job_settings = {"refresh_interval": backend.refresh_interval, "number_of_replicas": backend.number_of_replicas}
    if ctx.mode is WriteMode.REPLACE or not exists:
        index = version_index(dataset, ctx.run_id) if ctx.mode is WriteMode.REPLACE else dataset
        settings: dict[str, Any] = {"refresh_interval": "-1", "number_of_replicas": 0}
        if backend.number_of_shards:
            settings["number_of_shards"] = backend.number_of_shards
        mapping = index_mapping(
            ctx.schema,
            searchable=backend.searchable,
            object_modes=backend.object_fields,
            user_mapping=backend.mapping,
            meta={"saved_settings": job_settings, "id_key": list(ctx.key) or None, "run_id": ctx.run_id},
            product=backend._conn().dialect.product,
        )
        if not await backend._call(client.indices.exists(index=index), index):
            # A fresh index holds no partition: forget ledger entries of an index of that name.
            await backend._call(
                client.delete_by_query(index=backend.ledger_index, query={"term": {"index": index}}, refresh=True),
                backend.ledger_index,
            )
            await backend._call(client.indices.create(index=index, settings={"index": settings}, mappings=mapping), index)
        # else: a rerun of this run id (`--run-id`) keeps what its committed partitions loaded.
        ctx.state.update(es_index=index, es_created=True, es_dedupe=False)
        return
    concrete, _, meta = await backend.index_info(dataset)
    saved = meta.get("saved_settings")
    if saved and not backend.tune_existing_index:
        # A run that crashed left its load settings: put the saved ones back now.
        await _put_settings(backend, dataset, saved)
        await _update_ferry_meta(backend, concrete, saved_settings=None)
    if backend.tune_existing_index:
        if not saved:  # keep the originals a crashed run saved, never the -1 it set
            await _update_ferry_meta(backend, concrete, saved_settings=await _settings(backend, concrete))
        await _put_settings(backend, dataset, {"refresh_interval": "-1", "number_of_replicas": 0})
    if meta.get("arrow_schema"):
        await _add_columns(backend, concrete, decode_schema(meta["arrow_schema"]), ctx.schema)
    id_key = meta.get("id_key")
    if id_key and list(ctx.key) != list(id_key):
        await _update_ferry_meta(backend, concrete, id_key=None)
    ctx.state.update(
        es_index=dataset,
        es_created=False,
        es_tuned=backend.tune_existing_index,
        # Upsert must remove documents of the same key written under other ids.
        es_dedupe=ctx.mode is WriteMode.UPSERT and list(ctx.key) != list(id_key or []),
    )


async def _add_columns(backend, index: str, known: pa.Schema, schema: pa.Schema) -> None:
    """Map the columns a run adds (schema_policy evolve) and keep the Arrow schema in ``_meta`` whole."""
    added = [f for f in schema if known.get_field_index(f.name) < 0]
    if not added:
        return
    properties = {
        f.name: field_mapping(f.name, f.type, searchable=set(backend.searchable), object_modes=backend.object_fields)
        for f in added
    }
    await backend._call(backend._conn().client.indices.put_mapping(index=index, properties=properties), index)
    await _update_ferry_meta(backend, index, arrow_schema=encode_schema(pa.schema(list(known) + added)))


async def write_partition(
    backend: "ElasticsearchBackend",
    dataset: str,
    partition_id: str,
    batches: AsyncIterable[pa.RecordBatch],
    ctx: WriteContext,
) -> WriteResult:
    """Bulk-load one partition; idempotent per (run, partition)."""
    started = time.perf_counter()
    conn = backend._conn()
    index = ctx.state.get("es_index") or dataset
    ledger_id = _ledger_id(index, ctx.run_id, partition_id)
    found = await backend._call(
        conn.client.options(ignore_status=404).get(index=backend.ledger_index, id=ledger_id, source=False),
        backend.ledger_index,
    )
    if found.body.get("found"):
        async for _ in batches:  # drain so the upstream stages finish
            pass
        return WriteResult(partition_id, skipped=True)
    key = tuple(ctx.key)
    rows = 0
    writer = BulkWriter(
        conn.client,
        where=conn.where,
        index=index,
        max_requests_in_flight=backend.max_requests_in_flight,
        chunk_max_docs=backend.chunk_max_docs,
        chunk_max_bytes=backend.chunk_max_bytes,
        max_retries=backend.bulk_max_retries,
        initial_backoff_seconds=backend.initial_backoff_seconds,
        max_backoff_seconds=backend.max_backoff_seconds,
        document_max_bytes=backend.document_max_bytes,
    )
    try:
        async with writer:
            async for batch in batches:
                first = rows
                rows += batch.num_rows
                actions = await asyncio.to_thread(_actions, batch, index, key, ctx.run_id, partition_id, first)
                if ctx.state.get("es_dedupe"):
                    actions = await _stale_key_deletes(backend, index, batch, key, actions) + actions
                await writer.add(actions)
    except BaseException:
        if not key:
            # Positional ids: remove what this attempt sent, so an aborted append leaves nothing half-written.
            await asyncio.shield(_delete_positional(backend, index, ctx.run_id, partition_id, rows))
        raise
    stats = writer.stats
    raise_if_overloaded(stats, f"index {index!r} on {conn.where}")
    rejected = len(stats.failures)
    if stats.failures:
        collect = getattr(ctx, "on_error", "fail") == "collect" or backend.on_document_error == "collect"
        first = stats.failures[0]
        if not collect:
            raise DataError(
                f"index {index!r} refused {rejected} document(s) of partition {partition_id}; first: "
                f"{first.describe()}; fix the data or the mapping, or collect refused documents "
                "(on_error: collect, or on_document_error: collect on the target)",
                row_key=first.doc_id,
                rows=rejected,
            )
        reject = getattr(ctx, "reject", None)
        if reject is not None:
            # The pipeline's rejects file: rebuild the refused rows from the documents sent.
            batch, table = await asyncio.to_thread(_rejected_rows, stats.failures, ctx.schema)
            reject(batch, table)
        else:
            await asyncio.to_thread(_write_rejects, backend, ctx, partition_id, stats.failures)
    await backend._call(
        conn.client.index(
            index=backend.ledger_index,
            id=ledger_id,
            document={"index": index, "run_id": ctx.run_id, "partition": partition_id, "rows": rows - rejected},
        ),
        backend.ledger_index,
    )
    return WriteResult(
        partition_id,
        rows_written=rows - rejected,
        rows_rejected=rejected,
        bytes_written=stats.bytes_sent,
        duration_seconds=time.perf_counter() - started,
    )


def _actions(batch: pa.RecordBatch, index: str, key: tuple[str, ...], run_id: str, partition_id: str, first: int):
    documents = encode_documents(batch)
    if key:
        missing = [k for k in key if batch.schema.get_field_index(k) < 0]
        if missing:
            raise ConfigurationError(f"key column(s) {', '.join(missing)} are not in the written data", path="key")
        ids = key_ids(batch, key)
    else:
        ids = [f"{run_id}:{partition_id}:{first + i}" for i in range(batch.num_rows)]
    return [index_action(index, doc_id, doc, first + i) for i, (doc_id, doc) in enumerate(zip(ids, documents))]


async def _stale_key_deletes(backend, index: str, batch: pa.RecordBatch, key: tuple[str, ...], actions) -> list:
    """Delete actions for documents holding a key of ``batch`` under another id (upsert over old ids)."""
    client = backend._conn().client
    wanted = {a.doc_id for a in actions}
    values = batch.select(list(key)).to_pylist()
    deletes = []
    for start in range(0, len(values), 500):
        shoulds = [
            {"bool": {"filter": [{"term": {k: _term_value(row[k])}} for k in key]}} for row in values[start : start + 500]
        ]
        query = {"bool": {"should": shoulds, "minimum_should_match": 1}}
        response = await backend._call(
            client.search(index=index, query=query, source=False, size=10000, track_total_hits=False), index
        )
        deletes.extend(delete_action(index, h["_id"]) for h in response.body["hits"]["hits"] if h["_id"] not in wanted)
    return deletes


def _term_value(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if not isinstance(value, (str, int, float, bool)):
        return str(value)
    return value


async def _delete_positional(backend, index: str, run_id: str, partition_id: str, rows: int) -> None:
    conn = backend._conn()
    writer = BulkWriter(conn.client, where=conn.where, index=index, max_requests_in_flight=2, chunk_max_docs=5000)
    async with writer:
        for start in range(0, rows, 5000):
            await writer.add(
                [delete_action(index, f"{run_id}:{partition_id}:{n}") for n in range(start, min(rows, start + 5000))]
            )
    await backend._call(conn.client.indices.refresh(index=index), index)


def _rejected_rows(failures, schema: pa.Schema) -> tuple[pa.RecordBatch, pa.Table]:
    """The refused documents as rows of ``schema`` plus the rejects table ``WriteContext.reject`` takes."""
    sources = [orjson.loads(f.document) if f.document else {} for f in failures]
    batch = decode_sources(sources, schema)
    count = len(failures)
    table = pa.table(
        {
            "row_index": pa.array(range(count), pa.int64()),
            "column": pa.nulls(count, pa.string()),
            "value": pa.array([f.doc_id for f in failures], pa.string()),
            "reason": pa.array([f"{f.status} {f.error_type}: {f.reason}" for f in failures], pa.string()),
            "error_class": pa.array(["DocumentRefused"] * count, pa.string()),
            "step": pa.array(["write"] * count, pa.string()),
        }
    )
    return batch, table


#: Columns of the rejects file written without the pipeline (as tasks/rejects.py writes them).
_REJECT_COLUMNS = ("partition", "row_key", "column", "value", "reason", "error_class", "step", "record")


def _write_rejects(backend, ctx: WriteContext, partition_id: str, failures) -> str:
    """Refused documents to ``<rejects_dir>/<job>/<run>/<partition>-documents.parquet`` (no pipeline)."""
    folder = os.path.join(backend.rejects_dir, ctx.job_name, ctx.run_id)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{partition_id}-documents.parquet")
    count = len(failures)
    columns = {
        "partition": [partition_id] * count,
        "row_key": [f.doc_id for f in failures],
        "column": [None] * count,
        "value": [None] * count,
        "reason": [f"{f.status} {f.error_type}: {f.reason}" for f in failures],
        "error_class": ["DocumentRefused"] * count,
        "step": ["write"] * count,
        "record": [f.document.decode() for f in failures],
    }
    pq.write_table(pa.table(columns, schema=pa.schema([(n, pa.string()) for n in _REJECT_COLUMNS])), path)
    return path


async def _restore_settings(backend, index: str) -> None:
    """Put the settings saved in ``_meta`` back and forget them (after the load, or after a failed one)."""
    concrete, _, meta = await backend.index_info(index)
    saved = meta.get("saved_settings")
    if saved:
        await _put_settings(backend, index, saved)
        await _update_ferry_meta(backend, concrete, saved_settings=None)


async def publish(backend: "ElasticsearchBackend", dataset: str, ctx: WriteContext) -> None:
    """Restore settings, refresh and (replace) swap the alias; see the module docstring."""
    client = backend._conn().client
    index = ctx.state.get("es_index") or dataset
    if ctx.state.get("es_created") or ctx.state.get("es_tuned"):
        await _restore_settings(backend, index)
    await backend._call(client.indices.refresh(index=index), index)
    if ctx.mode is not WriteMode.REPLACE:
        return
    actions: list[dict[str, Any]] = []
    old: list[str] = []
    alias = await backend._call(client.options(ignore_status=404).indices.get_alias(name=dataset), dataset)
    if alias.meta.status == 200 and alias.body:
        old = [name for name in alias.body if name != index]
        actions += [{"remove": {"index": name, "alias": dataset}} for name in old]
    elif await backend._call(client.indices.exists(index=dataset), dataset):
        # First replace of a concrete index: the alias takes its name in the same atomic call.
        actions.append({"remove_index": {"index": dataset}})
    actions.insert(0, {"add": {"index": index, "alias": dataset}})
    await backend._call(client.indices.update_aliases(actions=actions), dataset)
    for name in old:
        await backend._call(client.options(ignore_status=404).indices.delete(index=name), name)


async def abort(backend: "ElasticsearchBackend", dataset: str, ctx: WriteContext) -> None:
    """Remove an unfinished replace index, or restore the settings of an appended one."""
    client = backend._conn().client
    index = ctx.state.get("es_index")
    if index is None:
        return
    if ctx.mode is WriteMode.REPLACE:
        await _delete_replace_index(backend, index, ctx.run_id)
        return
    if ctx.state.get("es_created") or ctx.state.get("es_tuned"):
        await _restore_settings(backend, index)
    await backend._call(client.indices.refresh(index=index), index)


__all__ = ["abort", "begin_write", "discard_replace_index", "publish", "version_index", "write_partition"]


async def repair(backend: "ElasticsearchBackend", dataset: str) -> list[str]:
    """Undo what a crashed run left on ``dataset``; returns what was done (one line each).

    Restores settings saved in ``_meta`` (the load's ``refresh_interval: -1`` and
    0 replicas) and deletes unfinished replace indexes (``<name>-*`` created by
    Ferry and not behind the alias).
    """
    client = backend._conn().client
    done: list[str] = []
    alias = await backend._call(client.options(ignore_status=404).indices.get_alias(name=dataset), dataset)
    published = set(alias.body) if alias.meta.status == 200 else set()
    candidates = await backend._call(
        client.options(ignore_status=404).indices.get_mapping(index=f"{dataset},{dataset}-*", expand_wildcards="all"),
        dataset,
    )
    for name, body in (candidates.body or {}).items():
        ferry = ((body.get("mappings") or {}).get("_meta") or {}).get(META_KEY) or {}
        if name.startswith(f"{dataset}-") and name not in published and ferry.get("run_id"):
            if name == version_index(dataset, ferry["run_id"]):
                await backend._call(client.indices.delete(index=name), name)
                done.append(f"deleted unfinished replace index {name} (run {ferry['run_id']})")
                continue
        if ferry.get("saved_settings"):
            await _put_settings(backend, name, ferry["saved_settings"])
            await _update_ferry_meta(backend, name, saved_settings=None)
            values = ", ".join(f"{k} {v}" for k, v in sorted(ferry["saved_settings"].items()))
            done.append(f"restored {values} on {name}")
    return done


async def discard_replace_index(backend: "ElasticsearchBackend", dataset: str, run_id: str) -> list[str]:
    """Delete ``run_id``'s replace index unless the alias points at it (it was published)."""
    client = backend._conn().client
    index = version_index(dataset, run_id)
    alias = await backend._call(client.options(ignore_status=404).indices.get_alias(name=dataset), dataset)
    if alias.meta.status == 200 and index in alias.body:
        return []
    if await _delete_replace_index(backend, index, run_id):
        return [f"deleted unfinished replace index {index} (run {run_id})"]
    return []


async def _delete_replace_index(backend: "ElasticsearchBackend", index: str, run_id: str) -> bool:
    """Delete a replace run's index and its ledger entries; True when the index was there."""
    client = backend._conn().client
    deleted = await backend._call(client.options(ignore_status=404).indices.delete(index=index), index)
    await backend._call(
        client.options(ignore_status=404).delete_by_query(
            index=backend.ledger_index, query={"term": {"run_id": run_id}}, refresh=True
        ),
        backend.ledger_index,
    )
    return deleted.meta.status == 200
