"""The object-store backend: Parquet, JSON Lines and CSV datasets in a folder or on S3.

The very same code serves local folders and S3 (``s3://bucket/prefix``, or
``bucket`` + ``prefix``); :mod:`ferry.backends.objectstore_fs` builds the
filesystems, :mod:`ferry.backends.objectstore_formats` the file formats and
:mod:`ferry.backends.objectstore_writers` the rolling and Hive writers, and
:mod:`ferry.backends.objectstore_plan` the schema, partition and pushdown helpers.

A dataset is the folder (prefix) ``<root>/<dataset>/``. Layout::

    <dataset>/[<col>=<v>/]<run>-<partition>-<n>.<ext>   appended data
    <dataset>/_ferry/CURRENT                         manifest of the published version (replace)
    <dataset>/_ferry/versions/<run>/...              data of a replace run
    <dataset>/_ferry/staging/<run>/<partition>/      appended files being written (never read)
    <dataset>/_ferry/commits/<run>/<partition>.json  commit markers (retry ledger)
    <data folder>/_partitioning.json                 types of the partition_by columns (per version)

Ferry's readers read the version that ``CURRENT`` names when it exists, or
else the dataset folder itself; names starting with ``_`` or ``.`` are never
data.

Writes, per (run, partition):

* append: files are written under ``staging`` and, when the partition has
  written everything, moved (a local rename; a server-side copy on S3) into
  the data folder, then the commit marker is written and the staging files
  removed. A reader never sees half a partition's files.
* replace: files are written straight into ``versions/<run>/`` (nobody reads
  it before the publish, so no copy is needed), then the commit marker.

A retried partition finds its marker and is skipped, or first removes what
its failed attempt left (files named ``<run>-<partition>-*``), so retries
never duplicate data and a second append run never overwrites the first.
A replace publishes by replacing ``CURRENT`` in one step -- an atomic rename
on a local folder, one PUT of the manifest object on S3 -- so Ferry's
readers see the old version or the new one, never a mix; a run killed before
that step leaves the old version as it was. Old versions are removed after
the publish (``keep_versions`` keeps the newest N).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterable, AsyncIterator, Callable, ClassVar, Literal, NamedTuple

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import Field, SecretStr, model_validator

from .base import Backend, Capabilities, Partition, UnreadableInput, WriteContext, WriteMode, WriteResult
from .errors import ConfigurationError, FerryError, PermanentBackendError, TransientBackendError
from .filters import Filter, columns_to_read, filter_batch
from .objectstore_formats import (
    READ_SUFFIXES,
    TEXT_FORMATS,
    TextReadOptions,
    check_text_schema,
    file_suffix,
    infer_file_schema,
    infer_text_schema,
    make_writer,
    read_text_batches,
)
from .objectstore_fs import (
    FileSystems,
    Location,
    S3PoolOptions,
    S3TransferOptions,
    acquire_filesystems,
    release_filesystems,
    resolve_location,
    translate_error,
)
from .objectstore_plan import (
    decode_schema,
    encode_schema,
    infer_partition_schema,
    pack_small_files,
    row_group_ranges,
    to_arrow_prefilter,
    unify_file_schemas,
)
from .objectstore_writers import DatasetWriter, check_partition_columns, parse_hive_values
from .logos import code_example, docs_url, logo_url
from .stream import thread_call

META_DIR = "_ferry"
#: Kept in the data folder itself, so a replace version carries its own (readers skip `_` names).
PARTITIONING_FILE = "_partitioning.json"
#: How messages name the formats.
FORMAT_NAMES = {"parquet": "Parquet", "jsonl": "JSON Lines", "csv": "CSV"}
PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")
#: Footers (or text samples) read at once while planning.
PLANNING_THREADS = 8
#: Settings that only mean something for s3:// locations.
S3_ONLY = (
    "endpoint_url", "region", "key", "secret", "session_token", "profile", "role_arn",
    "server_side_encryption", "sse_kms_key_id", "storage_class",
)


#: Batches and files a Parquet scan reads ahead of the pipeline (memory bound).
SCAN_BATCH_READAHEAD = 4
SCAN_FRAGMENT_READAHEAD = 1


class _Planned(NamedTuple):
    """What planning a read found: the readable files and the one schema they are read with."""

    root: str
    #: (path, size) of the files to read, in listing order (left-out files removed).
    files: list[tuple[str, int]]
    #: The unified schema, partition columns included.
    schema: pa.Schema
    partition_schema: pa.Schema
    #: Parquet footers of ``files`` (None for text files).
    footers: list[Any]
    #: Position of each of ``files`` in the full listing (partition ids stay stable when files are left out).
    indexes: list[int]


class ObjectStoreBackend(Backend):
    """Parquet, JSON Lines and CSV datasets in a local folder or on S3 (s3fs and pyarrow)."""

    _block_type_name = "Ferry Object Store"
    _block_type_slug = "ferry-object-store"
    _description = (
        "Parquet, JSON Lines and CSV datasets in a folder or on S3, written idempotently and published atomically."
    )
    _logo_url = logo_url("object-store.png")
    _documentation_url = docs_url("object-stores.md")
    _code_example = code_example(
        "ferry-object-store", "ferry.backends.objectstore", "ObjectStoreBackend", "objectstore_block", side="target"
    )

    kind: ClassVar[str] = "objectstore"
    capabilities: ClassVar[Capabilities] = Capabilities(
        write_modes=frozenset({WriteMode.APPEND, WriteMode.REPLACE}),
        pushdown_columns=True,
        pushdown_filters=True,
    )

    # -- where -------------------------------------------------------------------
    url: str | None = Field(
        None, description="Folder holding the datasets: a local path, file:// URL or s3://bucket/prefix."
    )
    bucket: str | None = Field(None, description="S3 bucket (instead of an s3:// url).")
    prefix: str = Field("", description="Key prefix inside `bucket` under which the datasets live.")

    # -- files -------------------------------------------------------------------
    format: Literal["parquet", "jsonl", "csv"] = Field(
        "parquet", description="File format: parquet, jsonl (JSON Lines) or csv."
    )
    compression: str = Field(
        "snappy",
        description="Parquet codec (snappy, zstd, gzip, lz4, brotli, none); for jsonl and csv: gzip or none (default).",
    )
    row_group_rows: int = Field(1_048_576, ge=1, description="Largest number of rows in one Parquet row group.")
    file_max_rows: int = Field(10_000_000, ge=1, description="A new file is started after this many rows.")
    file_max_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="A new file is started once a file holds this many bytes."
    )
    partition_by: list[str] = Field(
        default_factory=list, description="Columns to write as Hive folders (`year=2024/month=5/`)."
    )
    partition_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Parquet files larger than this are read as several partitions of whole row groups.",
    )
    partition_min_bytes: int = Field(
        128 * 1024 * 1024,
        ge=0,
        description="Files smaller than this are read together, packed into partitions of about this size (0: one per file).",
    )
    read_schema: dict[str, str] | None = Field(
        None,
        description="Columns and types of jsonl/csv files (e.g. {id: int64, at: 'timestamp[us, UTC]'}); inferred when unset.",
    )
    infer_sample_files: int = Field(3, ge=1, description="How many jsonl/csv files the schema is inferred from.")
    infer_sample_bytes: int = Field(
        1024 * 1024, ge=1024, description="How many bytes of each sampled jsonl/csv file inference reads."
    )
    csv_delimiter: str = Field(",", min_length=1, max_length=1, description="Field delimiter of csv files.")
    keep_versions: int = Field(
        0, ge=0, description="Previous versions kept after a replace publishes (0 removes them all)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra fsspec filesystem options (passed to s3fs on S3)."
    )

    # -- S3 ----------------------------------------------------------------------
    endpoint_url: str | None = Field(
        None, description="S3 endpoint of an S3-compatible store (MinIO, Ceph...); AWS when unset."
    )
    path_style: bool = Field(False, description="Address buckets as endpoint/bucket (path style) instead of bucket.host.")
    region: str | None = Field(None, description="AWS region; the default chain (AWS_DEFAULT_REGION...) when unset.")
    key: SecretStr | None = Field(None, description="AWS access key id.")
    secret: SecretStr | None = Field(None, description="AWS secret access key.")
    session_token: SecretStr | None = Field(None, description="AWS session token of temporary credentials.")
    profile: str | None = Field(None, description="AWS profile (shared config files) to take credentials from.")
    role_arn: str | None = Field(None, description="IAM role to assume (with the other credentials or the default chain).")
    role_session_name: str = Field("ferry", description="Session name used when assuming `role_arn`.")
    anonymous: bool = Field(False, description="Send unsigned requests (public buckets).")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        None, description="Server-side encryption of written objects: AES256 (SSE-S3) or aws:kms (SSE-KMS)."
    )
    sse_kms_key_id: str | None = Field(None, description="KMS key id for aws:kms encryption.")
    storage_class: str | None = Field(None, description="S3 storage class of written objects (e.g. STANDARD_IA).")
    requester_pays: bool = Field(False, description="Accept requester-pays charges on the bucket.")
    pool: S3PoolOptions = Field(default_factory=S3PoolOptions, description="S3 connection pool (performance guide names).")
    transfer: S3TransferOptions = Field(
        default_factory=S3TransferOptions, description="S3 transfer settings (performance guide names)."
    )
    io_filesystem: Literal["s3fs", "pyarrow"] = Field(
        "s3fs", description="Filesystem class that moves data bytes on S3: s3fs (default) or pyarrow's S3FileSystem."
    )
    connect_timeout_seconds: float = Field(10.0, gt=0, description="Seconds to wait for a connection to S3.")

    @model_validator(mode="after")
    def _check_settings(self) -> "ObjectStoreBackend":
        try:
            location = resolve_location(self.url, self.bucket, self.prefix)
        except ConfigurationError as exc:
            raise ValueError(exc.message) from None
        if location.protocol != "s3":
            given = [name for name in S3_ONLY if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to s3:// locations; url is a local folder")
        codec = self.compression.lower()
        if self.format == "parquet":
            if codec not in PARQUET_CODECS:
                raise ValueError(f"unknown compression {self.compression!r}; use one of {', '.join(PARQUET_CODECS)}")
        elif "compression" not in self.model_fields_set and codec == "snappy":
            codec = "none"  # the Parquet default does not apply to text files
        elif codec not in ("gzip", "none"):
            raise ValueError(f"{self.format} files take compression gzip or none, not {self.compression!r}")
        object.__setattr__(self, "compression", codec)
        if self.sse_kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("sse_kms_key_id needs server_side_encryption: aws:kms")
        if self.read_schema is not None:
            self.declared_schema()  # raises on an unknown type name
        if self.format != "parquet" and self.read_schema is None and self.format not in TEXT_FORMATS:
            raise ValueError(f"unknown format {self.format!r}")
        self.transfer.warn_no_effect()
        return self

    @property
    def effective_capabilities(self) -> Capabilities:
        if self.format != "parquet":
            # Text files are scanned whole: columns and filters apply after parsing.
            return Capabilities(write_modes=self.capabilities.write_modes)
        return self.capabilities

    def declared_schema(self) -> pa.Schema | None:
        """The ``read_schema`` as an Arrow schema (None when the read infers it)."""
        if self.read_schema is None:
            return None
        from .types import parse_arrow_type

        fields = []
        for name, text in self.read_schema.items():
            try:
                fields.append(pa.field(name, parse_arrow_type(text)))
            except (ConfigurationError, ValueError) as exc:
                message = getattr(exc, "message", str(exc))
                raise ValueError(f"read_schema.{name}: {message}") from None
        return pa.schema(fields)

    def location_info(self) -> Location:
        """Protocol and root path of this block's datasets."""
        return resolve_location(self.url, self.bucket, self.prefix)

    def describe(self) -> str:
        location = self.location_info()
        codec = self.compression
        where = location.display(location.root)
        extra = f", endpoint {self.endpoint_url}" if self.endpoint_url else ""
        return f"objectstore {where} ({self.format}, {codec}{extra})"

    def describe_target_schema(self, schema: pa.Schema) -> str:
        """The file schema the files will have."""
        if self.format != "parquet":
            return f"{self.format} columns: " + ", ".join(f"{f.name} {f.type}" for f in schema)
        sink = pa.BufferOutputStream()
        pq.write_table(schema.empty_table(), sink)
        text = str(pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema).strip()
        # The first line is the Python object's repr, not part of the schema.
        return "\n".join(line for line in text.splitlines() if not line.startswith("<pyarrow"))

    def location(self, dataset: str) -> str:
        path = self.data_path(dataset) if "filesystems" in self._live else self.dataset_path(dataset)
        return self.location_info().display(path)

    def partitions_written_by(self, run_id: str, partitions: list[Partition]) -> list[Partition] | None:
        own = []
        for part in partitions:
            keep = [i for i, r in enumerate(part.spec["relatives"]) if posixpath.basename(r).startswith(f"{run_id}-")]
            if len(keep) == len(part.spec["relatives"]):
                own.append(part)
            elif keep:
                # A group of small files mixes runs: read only this run's files of it.
                spec = {
                    **part.spec,
                    "files": [part.spec["files"][i] for i in keep],
                    "relatives": [part.spec["relatives"][i] for i in keep],
                }
                own.append(Partition(id=part.id, dataset=part.dataset, spec=spec))
        return own

    # -- filesystems -------------------------------------------------------------
    def _filesystems(self) -> FileSystems:
        pair = self._live.get("filesystems")
        if pair is None:
            raise RuntimeError("the backend is not open: use `async with backend:`")
        return pair

    async def open(self) -> None:
        if "filesystems" in self._live:
            return
        try:
            pair = await acquire_filesystems(self)
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"opening {self.location_info().display(self.location_info().root)}") from exc
        self._live["filesystems"] = pair
        if pair.location.protocol == "s3" and not getattr(pair, "checked", False):
            try:
                await asyncio.to_thread(self._check_bucket, pair)
            except BaseException:
                self._live.pop("filesystems", None)
                await release_filesystems(self)
                raise
            pair.checked = True  # type: ignore[attr-defined]

    def _check_bucket(self, pair: FileSystems) -> None:
        """Fail fast: the bucket exists and these credentials may list it."""
        bucket = pair.location.bucket
        try:
            pair.fs.ls(bucket, detail=False)
        except FileNotFoundError as exc:
            raise PermanentBackendError(
                f"s3://{bucket}: the bucket does not exist at {self.endpoint_url or 'AWS'}; create it or fix "
                "`url`/`bucket`"
            ) from exc
        except Exception as exc:
            raise translate_error(exc, f"listing s3://{bucket}", pair.location, self.endpoint_url) from exc

    async def close(self) -> None:
        if self._live.pop("filesystems", None) is None:
            return
        await release_filesystems(self)

    async def _run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking filesystem call in a worker thread; store errors become Ferry errors naming ``what``.

        A cancellation waits for the thread's call to return (``thread_call``),
        so the clean-up never closes a writer that a thread is still using.
        """
        try:
            return await thread_call(functools.partial(fn, *args, **kwargs))
        except FerryError:
            raise
        except Exception as exc:
            raise translate_error(exc, what, self.location_info(), self.endpoint_url) from exc

    def _display(self, path: str) -> str:
        return self.location_info().display(path)

    # -- paths -------------------------------------------------------------------
    def dataset_path(self, dataset: str) -> str:
        """Path of the dataset folder (without scheme on S3: ``bucket/prefix/dataset``)."""
        root = self.location_info().root
        clean = dataset.strip("/")
        if not clean or ".." in clean.split("/"):
            raise ConfigurationError(f"invalid dataset name {dataset!r}", path="dataset")
        return posixpath.join(root, clean)

    def _meta(self, dataset: str, *parts: str) -> str:
        return posixpath.join(self.dataset_path(dataset), META_DIR, *parts)

    def manifest(self, dataset: str) -> dict[str, Any] | None:
        """The published manifest (``_ferry/CURRENT``), or None for a plain folder."""
        body = _read_small(self._filesystems().fs, self._meta(dataset, "CURRENT"))
        return None if body is None else json.loads(body)

    def current_version(self, dataset: str) -> str | None:
        """The run id of the published replace version, or None for a plain folder."""
        manifest = self.manifest(dataset)
        return None if manifest is None else manifest["version"]

    def data_path(self, dataset: str, version: str | None = None) -> str:
        """Folder holding the readable files of ``dataset`` (or of ``version``)."""
        version = version if version is not None else self.current_version(dataset)
        if version is None:
            return self.dataset_path(dataset)
        return self._meta(dataset, "versions", version)

    def _is_data(self, relative: str) -> bool:
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            return False
        return relative.endswith(READ_SUFFIXES[self.format])

    def data_file_infos(self, dataset: str) -> tuple[str, list[tuple[str, int]]]:
        """The data folder and its data files with sizes, in a fixed, sorted order."""
        fs = self._filesystems().fs
        root = self.data_path(dataset)
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return root, []
        files = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            if self._is_data(posixpath.relpath(path, root)):
                files.append((path, int(info.get("size") or 0)))
                # What identifies this version of the object (for the footer cache).
                tags = self._live.setdefault("file_tags", {})
                tags[path] = (info.get("size"), info.get("ETag") or info.get("mtime") or info.get("LastModified"))
        return root, sorted(files)

    def data_files(self, dataset: str) -> list[str]:
        """The data files a read sees, in a fixed, sorted order."""
        return [path for path, _ in self.data_file_infos(dataset)[1]]

    def partition_schema(self, dataset: str, root: str, files: list[str]) -> pa.Schema:
        """Types of the Hive partition columns (recorded at write, else inferred from folder names)."""
        body = _read_small(self._filesystems().fs, posixpath.join(root, PARTITIONING_FILE))
        if body is not None:
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(json.loads(body)["schema"])))
        names: list[str] = []
        for path in files:
            for segment in posixpath.relpath(path, root).split("/")[:-1]:
                name, sep, _ = segment.partition("=")
                if sep and name not in names:
                    names.append(name)
        if not names:
            return pa.schema([])
        return infer_partition_schema([posixpath.relpath(p, root) for p in files], names)

    # -- reading -----------------------------------------------------------------
    async def exists(self, dataset: str) -> bool:
        infos = await self._run(f"listing {self._display(self.dataset_path(dataset))}", self.data_file_infos, dataset)
        return bool(infos[1])

    async def _plan(self, dataset: str) -> _Planned:
        """List the dataset, read footers (or infer the text schema) and unify the file schemas.

        A file whose footer or sample cannot be read, or whose schema cannot be
        unified with the others, fails the plan naming it; under the collect
        read policy it is left out instead and recorded (``unreadable_inputs``).
        """
        root, files = await self._run(
            f"listing {self._display(self.dataset_path(dataset))}", self.data_file_infos, dataset
        )
        if not files:
            raise ConfigurationError(
                f"no {FORMAT_NAMES[self.format]} files found for dataset {dataset!r} under {self._display(root)}; "
                "check `url`, `dataset` and `format`"
            )
        paths = [p for p, _ in files]
        collect = self.read_policy.collect
        footers: list[Any] = [None] * len(paths)
        # The files whose schema was looked at: position -> its schema, or the error met.
        found: dict[int, pa.Schema | FerryError] = {}
        text_schema = self.declared_schema()
        if self.format == "parquet":
            footers = await asyncio.to_thread(self._read_footers, paths, keep_going=collect)
            found = {i: m if isinstance(m, FerryError) else m.schema.to_arrow_schema() for i, m in enumerate(footers)}
        elif text_schema is None and collect:
            found = await asyncio.to_thread(self._sample_text_schemas, paths)
        elif text_schema is None:
            text_schema = await asyncio.to_thread(self._infer_text_schema, paths)
        left_out: dict[int, FerryError] = {}
        if not collect:
            schema = text_schema
            if self.format == "parquet":
                schema = unify_file_schemas([(self._display(paths[i]), found[i]) for i in sorted(found)])
        else:
            left_out = {i: f for i, f in found.items() if isinstance(f, FerryError)}
            readable = sorted(i for i in found if i not in left_out)
            schema = text_schema
            if readable:
                promote = "default" if self.format == "parquet" else "permissive"
                schema, conflicts = _unify_leaving_out([(self._display(paths[i]), found[i]) for i in readable], promote)
                left_out.update({readable[n]: PermanentBackendError(reason) for n, reason in conflicts.items()})
            for i in sorted(left_out):
                self._left_out_at_plan(paths[i], left_out[i])
            if schema is None or len(left_out) == len(paths):
                raise PermanentBackendError(
                    f"none of the {len(paths)} {FORMAT_NAMES[self.format]} files of dataset {dataset!r} under "
                    f"{self._display(root)} can be read; the first: {left_out[min(left_out)]}"
                )
        keep = [i for i in range(len(paths)) if i not in left_out]
        kept_paths = [paths[i] for i in keep]
        part_schema = await self._run(f"reading {self._display(root)}", self.partition_schema, dataset, root, kept_paths)
        for f in part_schema:
            if schema.get_field_index(f.name) < 0:
                schema = schema.append(f)
        return _Planned(root, [files[i] for i in keep], schema, part_schema, [footers[i] for i in keep], keep)

    def _left_out_at_plan(self, path: str, error: FerryError) -> None:
        """Record ``path`` as left out of the read at planning (collect policy), with the error it met."""
        self.note_unreadable(
            UnreadableInput(object=self._display(path), reason=str(error), error_class=type(error).__name__, step="plan")
        )

    def _read_footers(self, paths: list[str], *, keep_going: bool = False) -> list[Any]:
        """The Parquet footer of each file; with ``keep_going`` an unreadable one is its error instead.

        Errors a retry may fix always raise.
        """
        arrow_fs = self._filesystems().arrow_fs

        def one(path: str) -> pq.FileMetaData | FerryError:
            try:
                with arrow_fs.open_input_file(path) as handle:
                    return pq.read_metadata(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                failure = translate_error(
                    exc, f"reading the Parquet footer of {self._display(path)}", self.location_info(), self.endpoint_url
                )
                if isinstance(exc, pa.ArrowInvalid) or "parquet" in str(exc).lower():
                    failure = PermanentBackendError(
                        f"cannot read Parquet file {self._display(path)} (corrupt or truncated?): {exc}"
                    )
                if isinstance(failure, TransientBackendError):
                    raise failure from exc
                failure.__cause__ = exc
                return failure

        # Planning asks for the schema several times (plan, columns, partitions):
        # footers (and unreadable ones) are cached per object version while the block is open.
        cache: dict[tuple, pq.FileMetaData | FerryError] = self._live.setdefault("footer_cache", {})
        tags = self._live.get("file_tags", {})
        keys = [(path, tags.get(path)) for path in paths]
        missing = [key for key in keys if key[1] is None or key not in cache]
        with ThreadPoolExecutor(PLANNING_THREADS) as pool:
            for key, meta in zip(missing, pool.map(one, [path for path, _ in missing])):
                cache[key] = meta
        found = [cache[key] for key in keys]
        if not keep_going:
            for meta in found:
                if isinstance(meta, FerryError):
                    raise meta
        return found

    def _sample_text_schemas(self, paths: list[str]) -> dict[int, pa.Schema | FerryError]:
        """Infer each text file's schema, in order, until ``infer_sample_files`` of them could be read.

        A file that cannot be read maps to its error (and the next file is sampled instead).
        """
        arrow_fs = self._filesystems().arrow_fs
        found: dict[int, pa.Schema | FerryError] = {}
        good = 0
        for index, path in enumerate(paths):
            if good >= self.infer_sample_files:
                break
            display = self._display(path)
            try:
                found[index] = infer_file_schema(
                    arrow_fs, path, self._text_options(), sample_bytes=self.infer_sample_bytes, display=display
                )
                good += 1
            except FerryError as exc:
                found[index] = exc
            except (pa.ArrowInvalid, OSError) as exc:
                failure = translate_error(exc, f"reading {display}", self.location_info(), self.endpoint_url)
                if isinstance(failure, TransientBackendError):
                    raise failure from exc
                found[index] = failure
        return found

    def _text_options(self) -> TextReadOptions:
        return TextReadOptions(fmt=self.format, delimiter=self.csv_delimiter)

    def _infer_text_schema(self, paths: list[str]) -> pa.Schema:
        sample = paths[: self.infer_sample_files]
        return infer_text_schema(
            self._filesystems().arrow_fs,
            sample,
            self._text_options(),
            sample_bytes=self.infer_sample_bytes,
            displays=[self._display(p) for p in sample],
        )

    async def schema(self, dataset: str, columns: list[str] | None = None) -> pa.Schema:
        schema = (await self._plan(dataset)).schema
        if columns is None:
            return schema
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ConfigurationError(
                f"dataset {dataset!r} has no column(s) {', '.join(map(repr, missing))}; "
                f"available: {', '.join(schema.names)}",
                path="source.columns",
            )
        return pa.schema([schema.field(c) for c in columns])

    async def partitions(self, dataset: str, *, hint: int = 1, where: Filter | None = None) -> list[Partition]:
        """One partition per file; large Parquet files split into row-group ranges; small files packed.

        Files smaller than ``partition_min_bytes`` are packed, in order, into
        groups of about that size (never fewer groups than ``hint`` allows),
        because every partition costs a few Prefect task runs.
        """
        root, files, schema, part_schema, footers, indexes = await self._plan(dataset)
        common = {"schema": encode_schema(schema), "partition_schema": encode_schema(part_schema), "root": root}
        parts: list[Partition] = []
        small: list[tuple[str, int, int | None]] = []
        for index, (path, size), meta in zip(indexes, files, footers):
            relative = posixpath.relpath(path, root)
            rows = meta.num_rows if meta is not None else None
            if size < self.partition_min_bytes and size <= self.partition_max_bytes:
                small.append((path, size, rows))
                continue
            spec = {"files": [path], "relatives": [relative], **common}
            if meta is None or size <= self.partition_max_bytes or meta.num_row_groups <= 1:
                parts.append(Partition(id=f"file-{index:05d}", dataset=dataset, spec=spec, estimated_rows=rows))
                continue
            for number, (start, stop, group_rows) in enumerate(row_group_ranges(meta, self.partition_max_bytes)):
                parts.append(
                    Partition(
                        id=f"file-{index:05d}-rg-{number:04d}",
                        dataset=dataset,
                        spec={**spec, "row_groups": [start, stop]},
                        estimated_rows=group_rows,
                    )
                )
        for number, group in enumerate(pack_small_files(small, self.partition_min_bytes, hint)):
            paths = [path for path, _, _ in group]
            counts = [rows for _, _, rows in group]
            parts.append(
                Partition(
                    id=f"files-{number:05d}",
                    dataset=dataset,
                    spec={"files": paths, "relatives": [posixpath.relpath(p, root) for p in paths], **common},
                    estimated_rows=None if any(c is None for c in counts) else sum(counts),  # type: ignore[misc]
                )
            )
        return parts

    async def read(
        self,
        partition: Partition,
        *,
        columns: list[str] | None = None,
        where: Filter | None = None,
        batch_rows: int = 65536,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Stream the partition's files.

        A file that cannot be read fails the read naming it. Under the collect
        read policy it is left out instead -- recorded with the rows of it
        already passed on, which stay passed on -- and the other files are read.
        """
        spec = partition.spec
        schema = decode_schema(spec["schema"])
        part_schema = decode_schema(spec["partition_schema"]) if spec.get("partition_schema") else pa.schema([])
        needed = columns_to_read(columns, where, schema.names)
        pending = list(zip(spec["files"], spec["relatives"]))
        passed: dict[str, int] = {}  # rows of each file passed on so far
        skip = 0  # rows of pending[0] an earlier scan already passed on
        sentinel = object()
        while pending:
            if self.format == "parquet":
                # One scanner over all of the partition's files: Arrow reads the
                # next file ahead while this one decodes, instead of a cold start per file.
                group = pending
                iterator = self._parquet_batches(
                    [p for p, _ in group], [r for _, r in group], spec.get("row_groups"),
                    schema, part_schema, needed, where, batch_rows,
                )
            else:
                group = pending[:1]
                iterator = self._text_batches(
                    group[0][0], group[0][1], schema, part_schema, needed, self._display(group[0][0])
                )
            current, error = 0, None
            while True:
                try:
                    item = await thread_call(next, iterator, sentinel)
                except (FerryError, pa.ArrowInvalid, OSError) as exc:
                    error = exc
                    break
                if item is sentinel:
                    break
                current, batch = item
                if where is not None:
                    # The pushed-down filter only prunes; the exact semantics come from the evaluator.
                    batch = filter_batch(batch, where)
                if columns is not None and needed != columns:
                    batch = batch.select(columns)
                if skip and current == 0:
                    cut = min(skip, batch.num_rows)
                    batch, skip = batch.slice(cut), skip - cut
                if batch.num_rows:
                    path = group[current][0]
                    passed[path] = passed.get(path, 0) + batch.num_rows
                    yield batch
            if error is None:
                pending = pending[len(group):]
                continue
            culprit, failure = await self._locate_read_failure(
                error, group, current, spec.get("row_groups"), schema, part_schema, needed, where, batch_rows
            )
            if culprit is None or not self.read_policy.collect or isinstance(failure, TransientBackendError):
                if failure is error:
                    raise failure
                raise failure from error
            bad = group[culprit][0]
            self.note_unreadable(
                UnreadableInput(
                    object=self._display(bad),
                    reason=str(failure),
                    error_class=type(failure).__name__,
                    step="read",
                    partition=partition.id,
                    rows_read=passed.get(bad, 0),
                )
            )
            # Files before `current` were read whole (a scan is ordered by file). A new
            # scan resumes at `current`, skipping the rows of it already passed on,
            # unless `current` is the bad file itself; the bad file is not read again.
            skip = passed.get(group[current][0], 0) if current < culprit else 0
            pending = group[current:culprit] + group[culprit + 1:] + pending[len(group):]

    def _read_failure(self, exc: BaseException, display: str, *, parquet_file: bool = False) -> FerryError:
        """The Ferry error for ``exc`` met while reading ``display``."""
        if isinstance(exc, FerryError):
            return exc
        failure = translate_error(exc, f"reading {display}", self.location_info(), self.endpoint_url)
        if isinstance(failure, TransientBackendError) or isinstance(exc, (FileNotFoundError, PermissionError)):
            return failure
        if isinstance(exc, pa.ArrowInvalid) or parquet_file:
            kind = "Parquet file " if parquet_file else ""
            return PermanentBackendError(f"cannot read {kind}{display} (corrupt or truncated?): {exc}")
        return failure

    async def _locate_read_failure(
        self, error, group, current, row_groups, schema, part_schema, needed, where, batch_rows
    ) -> tuple[int | None, FerryError]:
        """Which file of a failed scan's ``group`` is bad, and the error naming it (None: cannot tell).

        A Parquet scan spans several files and Arrow's error does not say
        which: the files from ``current`` (the one being read) on are scanned
        again one by one, and the first that fails is the bad one.
        """
        if self.format != "parquet":
            return 0, self._read_failure(error, self._display(group[0][0]))
        if len(group) == 1:
            return 0, self._read_failure(error, self._display(group[0][0]), parquet_file=True)
        failure = self._read_failure(error, f"{self._display(group[0][0])} (+{len(group) - 1} more)")
        if isinstance(failure, TransientBackendError):
            return None, failure
        for index in range(current, len(group)):
            path, relative = group[index]
            probe = self._parquet_batches([path], [relative], row_groups, schema, part_schema, needed, where, batch_rows)
            try:
                await thread_call(_drain, probe)
            except (pa.ArrowInvalid, OSError) as exc:
                found = self._read_failure(exc, self._display(path), parquet_file=True)
                return (None if isinstance(found, TransientBackendError) else index), found
        return None, failure

    def _parquet_batches(self, paths, relatives, row_group_range, schema, part_schema, needed, where, batch_rows):
        arrow_fs = self._filesystems().arrow_fs
        fmt = pads.ParquetFileFormat()
        fragments = []
        for path, relative in zip(paths, relatives):
            kwargs: dict[str, Any] = {"filesystem": arrow_fs}
            if len(part_schema):
                kwargs["partition_expression"] = pads.HivePartitioning(part_schema).parse(relative)
            if row_group_range is not None:
                kwargs["row_groups"] = list(range(*row_group_range))
            fragments.append(fmt.make_fragment(path, **kwargs))
        dataset = pads.FileSystemDataset(fragments, schema=schema, format=fmt, filesystem=arrow_fs)
        prefilter = to_arrow_prefilter(where, schema) if where is not None else None
        # Bounded read-ahead keeps memory flat: Arrow's defaults (16 batches, 4 files)
        # hold hundreds of MiB per partition in flight.
        scanner = dataset.scanner(
            columns=needed,
            filter=prefilter,
            batch_size=batch_rows,
            use_threads=True,
            batch_readahead=SCAN_BATCH_READAHEAD,
            fragment_readahead=SCAN_FRAGMENT_READAHEAD,
        )
        # (position of the batch's file in `paths`, batch): the scan yields files in order.
        position = {fragment.path: index for index, fragment in enumerate(fragments)}
        return ((position[tagged.fragment.path], tagged.record_batch) for tagged in scanner.scan_batches())

    def _text_batches(self, path, relative, schema, part_schema, needed, display):
        arrow_fs = self._filesystems().arrow_fs
        file_fields = [f for f in schema if part_schema.get_field_index(f.name) < 0]
        file_schema = pa.schema(file_fields)
        wanted = needed if needed is not None else schema.names
        file_columns = [c for c in wanted if file_schema.get_field_index(c) >= 0]
        values = parse_hive_values(relative, part_schema)
        for batch in read_text_batches(
            arrow_fs, path, file_schema, self._text_options(), columns=file_columns, display=display
        ):
            arrays = []
            for name in wanted:
                if file_schema.get_field_index(name) >= 0:
                    arrays.append(batch.column(batch.schema.get_field_index(name)))
                else:
                    target = schema.field(name).type
                    arrays.append(pa.array([values.get(name)] * batch.num_rows, pa.string()).cast(target))
            yield 0, pa.RecordBatch.from_arrays(arrays, schema=pa.schema([schema.field(n) for n in wanted]))

    # -- writing -----------------------------------------------------------------
    async def begin_write(self, dataset: str, ctx: WriteContext) -> None:
        fs = self._filesystems().fs
        check_text_schema(ctx.schema, self.format)
        part_schema = check_partition_columns(ctx.schema, self.partition_by) if self.partition_by else None
        if ctx.mode is WriteMode.REPLACE:
            target = self._meta(dataset, "versions", ctx.run_id)
        else:
            target = await self._run(f"reading {self._display(self._meta(dataset, 'CURRENT'))}", self.data_path, dataset)
        ctx.state["objectstore_data_path"] = target
        if self.location_info().protocol == "file":
            # S3 has no folders; a local folder must exist before files go in.
            await asyncio.to_thread(fs.makedirs, target, exist_ok=True)
        if part_schema is not None:
            body = json.dumps({"columns": self.partition_by, "schema": encode_schema(part_schema)}).encode()
            await self._run(
                f"writing {self._display(posixpath.join(target, PARTITIONING_FILE))}",
                self._put, posixpath.join(target, PARTITIONING_FILE), body,
            )

    async def write(
        self,
        dataset: str,
        partition_id: str,
        batches: AsyncIterable[pa.RecordBatch],
        ctx: WriteContext,
    ) -> WriteResult:
        started = time.perf_counter()
        pair = self._filesystems()
        marker = self._meta(dataset, "commits", ctx.run_id, f"{partition_id}.json")
        if await self._run(f"reading {self._display(marker)}", pair.fs.exists, marker):
            async for _ in batches:
                pass
            return WriteResult(partition_id, skipped=True)
        data_path = ctx.state.get("objectstore_data_path") or self.data_path(dataset)
        staging = self._meta(dataset, "staging", ctx.run_id, partition_id)
        direct = ctx.mode is WriteMode.REPLACE
        await self._run(
            f"removing leftovers of {partition_id} under {self._display(data_path)}",
            self._remove_partition_leftovers, data_path, staging, ctx.run_id, partition_id, direct,
        )
        out_folder = data_path if direct else staging
        if not direct and pair.location.protocol == "file":
            await asyncio.to_thread(pair.fs.makedirs, staging, exist_ok=True)

        writer = DatasetWriter(
            out_folder,
            f"{ctx.run_id}-{partition_id}",
            file_suffix(self.format, self.compression == "gzip"),
            ctx.schema,
            lambda path, schema: make_writer(
                self.format, pair.arrow_fs, path, schema,
                compression=self.compression, row_group_rows=self.row_group_rows,
            ),
            partition_by=self.partition_by,
            file_max_rows=self.file_max_rows,
            file_max_bytes=self.file_max_bytes,
            max_open_files=self.transfer.max_concurrency or 10,
        )
        try:
            async for batch in batches:
                await self._run(f"writing {partition_id} to {self._display(out_folder)}", writer.write, batch)
            written = await self._run(f"writing {partition_id} to {self._display(out_folder)}", writer.close)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard_attempt, writer, staging, direct))
            raise
        final_files = await self._run(
            f"committing {partition_id} into {self._display(data_path)}",
            self._commit_partition, written, out_folder, data_path, staging, marker, direct,
        )
        return WriteResult(
            partition_id,
            rows_written=writer.rows,
            bytes_written=writer.bytes_written,
            duration_seconds=time.perf_counter() - started,
            files=[self._display(p) for p in final_files],
        )

    def _discard_attempt(self, writer: DatasetWriter, staging: str, direct: bool) -> None:
        fs = self._filesystems().fs
        created = writer.discard()
        if direct:
            for path in created:
                _rm(fs, path)
        _rm(fs, staging)

    def _remove_partition_leftovers(
        self, data_path: str, staging: str, run_id: str, partition_id: str, direct: bool
    ) -> None:
        """Remove what a failed attempt of (run, partition) left, before writing again."""
        fs = self._filesystems().fs
        had_staging = _rm(fs, staging)
        if not direct and not had_staging:
            # Appended files reach the data folder only while staging still holds
            # them (copy, marker, then staging removal): no staging, no leftovers.
            return
        prefix = f"{run_id}-{partition_id}-"
        try:
            found = fs.find(data_path)
        except FileNotFoundError:
            return
        leftovers = [
            p for p in found
            if posixpath.basename(p).startswith(prefix) and self._is_data(posixpath.relpath(p, data_path))
        ]
        if leftovers:
            fs.rm(leftovers)

    def _commit_partition(
        self,
        written: list[tuple[str, int]],
        out_folder: str,
        data_path: str,
        staging: str,
        marker: str,
        direct: bool,
    ) -> list[str]:
        fs = self._filesystems().fs
        local = self.location_info().protocol == "file"
        final = []
        for path, _rows in written:
            relative = posixpath.relpath(path, out_folder)
            destination = posixpath.join(data_path, relative)
            if not direct:
                if local:
                    fs.makedirs(posixpath.dirname(destination), exist_ok=True)
                    fs.mv(path, destination)  # a rename
                else:
                    fs.copy(path, destination)  # server-side; staging goes after the marker
            final.append(destination)
        record = {
            "files": [posixpath.relpath(p, data_path) for p in final],
            "rows": sum(r for _, r in written),
        }
        self._put(marker, json.dumps(record).encode())
        _rm(fs, staging)
        return final

    def _put(self, path: str, body: bytes) -> None:
        """Replace a small object in one step: an atomic rename locally, one PUT on S3."""
        fs = self._filesystems().fs
        if self.location_info().protocol == "s3":
            fs.pipe_file(path, body)
            return
        import uuid

        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(temporary, "wb") as handle:
            handle.write(body)
        fs.mv(temporary, path)

    async def publish(self, dataset: str, ctx: WriteContext) -> None:
        fs = self._filesystems().fs
        await self._run("removing staging", _rm, fs, self._meta(dataset, "staging", ctx.run_id))
        if ctx.mode is not WriteMode.REPLACE:
            return
        await self._run(
            f"publishing {self._display(self._meta(dataset, 'CURRENT'))}", self._publish_version, dataset, ctx
        )

    def _publish_version(self, dataset: str, ctx: WriteContext) -> None:
        fs = self._filesystems().fs
        commits = self._meta(dataset, "commits", ctx.run_id)
        try:
            markers = sorted(fs.find(commits))
        except FileNotFoundError:
            markers = []
        done = {posixpath.basename(m)[: -len(".json")] for m in markers}
        missing = sorted(set(ctx.committed) - done)
        if missing:
            raise PermanentBackendError(
                f"cannot publish {self._display(self.dataset_path(dataset))}: the commit markers of "
                f"{', '.join(missing)} are gone (another run removed this version?); run the job again"
            )
        records = [json.loads(body) for body in fs.cat(markers).values()] if markers else []
        previous = self.manifest(dataset)
        history = []
        if previous is not None:
            history = [previous["version"]] + [v for v in previous.get("history", []) if v != previous["version"]]
        manifest = {
            "version": ctx.run_id,
            "published_at": time.time(),
            "format": self.format,
            "rows": sum(r["rows"] for r in records),
            "files": sorted(f for r in records for f in r["files"]),
            "history": [v for v in history if v != ctx.run_id][:100],
        }
        # The publish: one atomic step. Everything before it is invisible to readers.
        self._put(self._meta(dataset, "CURRENT"), json.dumps(manifest).encode())
        self._prune_versions(dataset, ctx.run_id, manifest["history"], first_replace=previous is None)

    def _prune_versions(self, dataset: str, current: str, history: list[str], *, first_replace: bool) -> None:
        fs = self._filesystems().fs
        if first_replace:
            # First replace of a plain folder: the files at the top are now the old version.
            root = self.dataset_path(dataset)
            try:
                entries = fs.ls(root, detail=False)
            except FileNotFoundError:
                entries = []
            for path in entries:
                if not posixpath.basename(path.rstrip("/")).startswith(("_", ".")):
                    _rm(fs, path)
        keep = {current, *history[: self.keep_versions]}
        versions_dir = self._meta(dataset, "versions")
        for name in _child_names(fs, versions_dir):
            if name not in keep:
                _rm(fs, posixpath.join(versions_dir, name))
                _rm(fs, self._meta(dataset, "commits", name))

    async def abort(self, dataset: str, ctx: WriteContext) -> None:
        fs = self._filesystems().fs

        def clean() -> None:
            _rm(fs, self._meta(dataset, "staging", ctx.run_id))
            if ctx.mode is WriteMode.REPLACE:
                _rm(fs, self._meta(dataset, "versions", ctx.run_id))
                _rm(fs, self._meta(dataset, "commits", ctx.run_id))
                return
            # Append: committed partitions stay; files copied in place by a partition
            # whose marker was never written are unfinished and go.
            data_path = ctx.state.get("objectstore_data_path") or self.data_path(dataset)
            commits = self._meta(dataset, "commits", ctx.run_id)
            kept: set[str] = set()
            try:
                markers = fs.find(commits)
            except FileNotFoundError:
                markers = []
            for body in (fs.cat(markers).values() if markers else []):
                kept.update(json.loads(body)["files"])
            try:
                found = fs.find(data_path)
            except FileNotFoundError:
                return
            unfinished = [
                p for p in found
                if posixpath.basename(p).startswith(f"{ctx.run_id}-")
                and self._is_data(posixpath.relpath(p, data_path))
                and posixpath.relpath(p, data_path) not in kept
            ]
            if unfinished:
                fs.rm(unfinished)

        await asyncio.shield(self._run(f"cleaning up run {ctx.run_id} in {self._display(self.dataset_path(dataset))}", clean))

    async def repair(self, dataset: str) -> list[str]:
        """Remove what killed runs left: unpublished replace versions and unfinished appends.

        Run it only while no run writes ``dataset``: a live run's version or
        staging looks the same as a dead one's. Committed append partitions
        stay (they are data); a killed replace run can no longer be resumed
        with its run id afterwards.
        """
        return await self._run(f"repairing {self._display(self.dataset_path(dataset))}", self._repair, dataset)

    async def discard_run(self, dataset: str, run_id: str, mode: WriteMode) -> list[str]:
        """Remove a dead run's unpublished replace version or unfinished append files (not a published version)."""
        return await self._run(
            f"removing what run {run_id} left in {self._display(self.dataset_path(dataset))}",
            self._discard_runs, dataset, [run_id],
        )

    def _repair(self, dataset: str) -> list[str]:
        fs = self._filesystems().fs
        runs = set(_child_names(fs, self._meta(dataset, "staging"))) | set(_child_names(fs, self._meta(dataset, "versions")))
        return self._discard_runs(dataset, sorted(runs))

    def _discard_runs(self, dataset: str, run_ids: list[str]) -> list[str]:
        """Remove what ``run_ids`` left unfinished; the published version and its kept history stay."""
        fs = self._filesystems().fs
        done: list[str] = []
        manifest = self.manifest(dataset)
        keep: set[str] = set()
        if manifest is not None:
            keep = {manifest["version"], *manifest.get("history", [])[: self.keep_versions]}
        data_path = self.data_path(dataset)
        for run_id in run_ids:
            staging = self._meta(dataset, "staging", run_id)
            for partition_id in _child_names(fs, staging):
                self._remove_partition_leftovers(data_path, posixpath.join(staging, partition_id), run_id, partition_id, False)
                done.append(f"removed unfinished append files of run {run_id}, partition {partition_id}")
            _rm(fs, staging)
            if run_id not in keep and _rm(fs, self._meta(dataset, "versions", run_id)):
                _rm(fs, self._meta(dataset, "commits", run_id))
                done.append(f"removed unpublished replace version {run_id}")
        return done


def _drain(batches) -> None:
    """Read an iterator to its end (a probe: only its errors matter)."""
    for _ in batches:
        pass


def _unify_leaving_out(named: list[tuple[str, pa.Schema]], promote: str) -> tuple[pa.Schema, dict[int, str]]:
    """Unify file schemas, leaving out files that conflict: the schema and ``{position: reason}``.

    Files join one by one starting with the schema most of them share (the
    first such file on a tie), so the odd file is the one left out rather
    than every file after it. The kept files are unified in listing order, so
    the columns come in the order a read without conflicts would give.
    """
    schemas = [schema for _, schema in named]
    try:
        return pa.unify_schemas(schemas, promote_options=promote), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    shapes: list[tuple[pa.Schema, list[int]]] = []
    for position, schema in enumerate(schemas):
        for shape, members in shapes:
            if shape.equals(schema, check_metadata=False):
                members.append(position)
                break
        else:
            shapes.append((schema, [position]))
    seed = max(shapes, key=lambda shape: len(shape[1]))[1][0]
    unified = schemas[seed]
    conflicts: dict[int, str] = {}
    for position, (name, schema) in enumerate(named):
        if position == seed:
            continue
        try:
            unified = pa.unify_schemas([unified, schema], promote_options=promote)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            try:
                unify_file_schemas([(named[seed][0], unified), (name, schema)])
                conflicts[position] = f"{name} has a schema that differs from {named[seed][0]} ({exc})"
            except PermanentBackendError as described:
                conflicts[position] = str(described)
    kept = [schema for position, schema in enumerate(schemas) if position not in conflicts]
    return pa.unify_schemas(kept, promote_options=promote), conflicts


def _read_small(fs, path: str) -> bytes | None:
    """A small object's bytes, or None when it does not exist."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _child_names(fs, folder: str) -> list[str]:
    """Names of the entries directly under ``folder`` (sorted; [] when it does not exist)."""
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def _rm(fs, path: str) -> bool:
    """Remove a file or folder (recursively); True when something was there."""
    try:
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=True)
        return True
    except FileNotFoundError:
        return False
