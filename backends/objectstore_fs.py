"""Filesystem resolution for the object-store backend: local folders and S3.

One place turns the block's settings into the two filesystem objects a
backend uses, and turns store errors into Ferry's error types:

* ``fs`` -- an fsspec filesystem (``s3fs.S3FileSystem`` or the local one) for
  listing, copying, deleting and the small JSON objects (markers, manifest);
* ``arrow_fs`` -- the ``pyarrow.fs.FileSystem`` that serves data I/O
  (Parquet, JSON Lines and CSV bytes): ``LocalFileSystem`` for folders; for S3
  either s3fs wrapped in ``PyFileSystem(FSSpecHandler(...))`` (the default,
  measured faster against our S3 server, see docs/object-stores.md) or
  pyarrow's native ``S3FileSystem`` (``io_filesystem: pyarrow``).

Both are synchronous objects shared by every partition of the process: they
are pooled per (configuration, process) through the pool manager, listed by
``get_pool_info()`` and closed when the last user leaves or at exit. s3fs runs
its requests on fsspec's own I/O event loop thread, so no client is bound to
the caller's event loop; Ferry calls them from worker threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigurationError, FerryError, PermanentBackendError, TransientBackendError
from .pools import pool_manager

if TYPE_CHECKING:  # pragma: no cover
    from .objectstore import ObjectStoreBackend

#: s3fs's own default block size (50 MiB): one PUT for files up to this size.
S3FS_DEFAULT_BLOCK_SIZE = 50 * 1024 * 1024


class ObjectStoreSettingWarning(UserWarning):
    """An object-store setting was accepted but has no effect; the message says why."""


class S3PoolOptions(BaseModel):
    """The performance guide's ``pool`` section for S3."""

    model_config = ConfigDict(extra="forbid")

    max_connections: int | None = Field(
        None, ge=1, description="botocore `max_pool_connections` of the s3fs client (default 10)."
    )


class S3TransferOptions(BaseModel):
    """The performance guide's ``transfer`` section, mapped onto s3fs (see docs/object-stores.md)."""

    model_config = ConfigDict(extra="forbid")

    multipart_threshold: int | None = Field(
        None,
        ge=5 * 1024 * 1024,
        description="Files up to this size are sent with one PUT: s3fs's block size when multipart_chunksize is unset.",
    )
    multipart_chunksize: int | None = Field(
        None, ge=5 * 1024 * 1024, description="s3fs `default_block_size`: the part size of multipart uploads."
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description="s3fs `max_concurrency` for whole-file transfers, and the files open at once in a partitioned write.",
    )
    max_io_queue: int | None = Field(
        None, ge=1, description="No equivalent in s3fs or pyarrow: accepted with a warning."
    )

    def warn_no_effect(self) -> None:
        """Say, in one line, which keys have no effect and why."""
        if self.max_io_queue is not None:
            warnings.warn(
                "transfer.max_io_queue has no effect: s3fs and pyarrow have no I/O queue setting "
                "(boto3's transfer manager does); bound parallel transfers with transfer.max_concurrency",
                ObjectStoreSettingWarning,
                stacklevel=4,
            )
        if (
            self.multipart_threshold is not None
            and self.multipart_chunksize is not None
            and self.multipart_threshold != self.multipart_chunksize
        ):
            warnings.warn(
                f"transfer.multipart_threshold ({self.multipart_threshold}) differs from multipart_chunksize "
                f"({self.multipart_chunksize}); s3fs has one block size for both, so multipart_chunksize is used",
                ObjectStoreSettingWarning,
                stacklevel=4,
            )

    @property
    def block_size(self) -> int | None:
        """The s3fs block size these settings give (None: s3fs's default)."""
        return self.multipart_chunksize or self.multipart_threshold


@dataclass(frozen=True)
class Location:
    """Where a block's datasets live: ``protocol`` (file or s3) and a root path without scheme."""

    protocol: str
    root: str

    @property
    def bucket(self) -> str | None:
        return self.root.split("/", 1)[0] if self.protocol == "s3" else None

    def display(self, path: str) -> str:
        """A path as users write it (``s3://bucket/key`` or a local path)."""
        return f"s3://{path}" if self.protocol == "s3" else path


def resolve_location(url: str | None, bucket: str | None, prefix: str) -> Location:
    """Parse ``url`` (local path, ``file://`` or ``s3://bucket/prefix``) or ``bucket`` + ``prefix``."""
    if bucket is not None:
        if url is not None:
            raise ConfigurationError("give either `url` or `bucket` (+ `prefix`), not both", path="url")
        return Location("s3", _s3_root(bucket, prefix))
    if url is None:
        raise ConfigurationError("set `url` (a folder or s3://bucket/prefix) or `bucket`", path="url")
    protocol, path = fsspec.core.split_protocol(url)
    protocol = protocol or "file"
    if protocol in ("file", "local"):
        return Location("file", os.path.abspath(os.path.expanduser(path)))
    if protocol in ("s3", "s3a"):
        name, _, rest = path.partition("/")
        return Location("s3", _s3_root(name, rest))
    raise ConfigurationError(
        f"url {url!r}: the {protocol!r} protocol is not supported; use a local folder or s3://bucket/prefix",
        path="url",
    )


def _s3_root(bucket: str, prefix: str) -> str:
    if len(bucket) < 3 or len(bucket) > 63 or bucket.lower() != bucket or "/" in bucket:
        raise ConfigurationError(
            f"invalid S3 bucket name {bucket!r}: a bucket name has 3 to 63 lower-case letters, digits, '.' or '-'",
            path="url",
        )
    clean = prefix.strip("/")
    if ".." in clean.split("/"):
        raise ConfigurationError(f"invalid S3 prefix {prefix!r}", path="prefix")
    return posixpath.join(bucket, clean) if clean else bucket


# -- building the clients ---------------------------------------------------------


def s3fs_options(block: "ObjectStoreBackend") -> dict[str, Any]:
    """Keyword arguments of ``s3fs.S3FileSystem`` for this block (secrets unwrapped here only)."""
    config: dict[str, Any] = {"connect_timeout": block.connect_timeout_seconds, "retries": {"max_attempts": 3}}
    if block.pool.max_connections is not None:
        config["max_pool_connections"] = block.pool.max_connections
    if block.path_style:
        config["s3"] = {"addressing_style": "path"}
    # Never region_name in client_kwargs (moto and some stores then refuse bucket
    # creation with InvalidLocationConstraint): the region goes into the session.
    client: dict[str, Any] = {}
    options: dict[str, Any] = {
        "skip_instance_cache": True,  # Ferry's pool owns the instance and closes it
        # Listings must see other writers (and pyarrow's native writes) at once.
        "use_listings_cache": False,
        "config_kwargs": config,
        "client_kwargs": client,
        "requester_pays": block.requester_pays,
    }
    if block.endpoint_url:
        options["endpoint_url"] = block.endpoint_url
    if block.anonymous:
        options["anon"] = True
    if block.key is not None:
        options["key"] = block.key.get_secret_value()
    if block.secret is not None:
        options["secret"] = block.secret.get_secret_value()
    if block.session_token is not None:
        options["token"] = block.session_token.get_secret_value()
    if block.profile is not None:
        options["profile"] = block.profile
    extra = upload_arguments(block)
    if extra:
        options["s3_additional_kwargs"] = extra
    if block.transfer.block_size is not None:
        options["default_block_size"] = block.transfer.block_size
    if block.transfer.max_concurrency is not None:
        options["max_concurrency"] = block.transfer.max_concurrency
    options.update(block.storage_options)
    return options


def upload_arguments(block: "ObjectStoreBackend") -> dict[str, str]:
    """Per-request S3 arguments for every object Ferry writes (encryption, storage class)."""
    extra: dict[str, str] = {}
    if block.server_side_encryption is not None:
        extra["ServerSideEncryption"] = block.server_side_encryption
    if block.sse_kms_key_id is not None:
        extra["SSEKMSKeyId"] = block.sse_kms_key_id
    if block.storage_class is not None:
        extra["StorageClass"] = block.storage_class
    return extra


def _make_s3fs(block: "ObjectStoreBackend"):
    import s3fs

    options = s3fs_options(block)
    session = _aio_session(block)
    if session is not None:
        options.pop("profile", None)
        options["session"] = session
    if block.role_arn is not None:
        # The key/secret are the base credentials STS is called with; requests
        # must be signed with the assumed role's credentials from the session.
        for name in ("key", "secret", "token"):
            options.pop(name, None)
    return s3fs.S3FileSystem(**options)


def _aio_session(block: "ObjectStoreBackend"):
    """An aiobotocore session for a region or a role to assume (None: s3fs builds its own)."""
    if block.region is None and block.role_arn is None:
        return None
    from aiobotocore.session import AioSession

    session = AioSession(profile=block.profile)
    if block.region is not None:
        session.set_config_variable("region", block.region)
    if block.role_arn is not None:
        session._credentials = _assumed_role_credentials(block, session)  # noqa: SLF001 (aiobotocore's documented pattern)
    return session


def _assumed_role_credentials(block: "ObjectStoreBackend", session):
    """Refreshable credentials of ``role_arn``, fetched through STS with the block's base credentials.

    The base credentials are the block's key/secret (and token) or, without
    them, the default chain (environment, profile); STS is reached at
    ``endpoint_url`` when one is set (S3-compatible stores serve STS there).
    """
    import botocore.session
    from aiobotocore.credentials import (
        AioAssumeRoleCredentialFetcher,
        AioCredentials,
        AioDeferredRefreshableCredentials,
    )

    if block.key is not None and block.secret is not None:
        token = block.session_token.get_secret_value() if block.session_token is not None else None
        source = AioCredentials(block.key.get_secret_value(), block.secret.get_secret_value(), token)
    else:
        found = botocore.session.Session(profile=block.profile).get_credentials()
        if found is None:
            raise ConfigurationError(
                f"role_arn {block.role_arn!r}: no base credentials to assume it with; set `key`/`secret`, "
                "`profile` or the AWS_* environment variables",
                path="role_arn",
            )
        frozen = found.get_frozen_credentials()
        source = AioCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    def client_creator(service: str, **kwargs: Any):
        if block.endpoint_url:
            kwargs.setdefault("endpoint_url", block.endpoint_url)
        kwargs.setdefault("region_name", block.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        return session.create_client(service, **kwargs)

    fetcher = AioAssumeRoleCredentialFetcher(
        client_creator,
        source_credentials=source,
        role_arn=block.role_arn,
        extra_args={"RoleSessionName": block.role_session_name},
    )
    return AioDeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials, method="assume-role")


def pyarrow_s3_options(block: "ObjectStoreBackend") -> dict[str, Any]:
    """Keyword arguments of ``pyarrow.fs.S3FileSystem`` for this block."""
    unsupported = [
        name
        for name, value in (
            ("server_side_encryption", block.server_side_encryption),
            ("sse_kms_key_id", block.sse_kms_key_id),
            ("storage_class", block.storage_class),
            ("requester_pays", block.requester_pays or None),
        )
        if value is not None
    ]
    if unsupported:
        raise ConfigurationError(
            f"io_filesystem 'pyarrow' cannot set {', '.join(unsupported)} (pyarrow's S3FileSystem has no such "
            "option); use io_filesystem: s3fs",
            path="io_filesystem",
        )
    options: dict[str, Any] = {"connect_timeout": block.connect_timeout_seconds}
    if block.endpoint_url:
        scheme, _, host = block.endpoint_url.partition("://")
        options["endpoint_override"] = host.rstrip("/") if host else block.endpoint_url
        options["scheme"] = scheme if host else "https"
        options["force_virtual_addressing"] = not block.path_style
    options["region"] = block.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    if block.anonymous:
        options["anonymous"] = True
    if block.role_arn is not None:
        options["role_arn"] = block.role_arn
        options["session_name"] = block.role_session_name
    if block.key is not None:
        options["access_key"] = block.key.get_secret_value()
    if block.secret is not None:
        options["secret_key"] = block.secret.get_secret_value()
    if block.session_token is not None:
        options["session_token"] = block.session_token.get_secret_value()
    if block.profile is not None and block.key is None:
        # pyarrow has no profile option: take the profile's credentials once, at open.
        import botocore.session

        credentials = botocore.session.Session(profile=block.profile).get_credentials()
        if credentials is None:
            raise ConfigurationError(f"AWS profile {block.profile!r} has no credentials", path="profile")
        frozen = credentials.get_frozen_credentials()
        options.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            options["session_token"] = frozen.token
    return options


@dataclass
class FileSystems:
    """The pair a backend works with (see the module docstring)."""

    location: Location
    fs: fsspec.AbstractFileSystem
    arrow_fs: pafs.FileSystem
    io_class: str


def filesystem_key(block: "ObjectStoreBackend") -> str:
    """Hash of the settings that shape the clients (secrets included, never shown)."""
    location = block.location_info()
    data: dict[str, Any] = {"protocol": location.protocol, "options": block.storage_options}
    if location.protocol == "s3":
        data.update(
            block.model_dump(
                mode="json",
                include={
                    "endpoint_url", "path_style", "region", "profile", "role_arn", "role_session_name",
                    "anonymous", "server_side_encryption", "sse_kms_key_id", "storage_class",
                    "requester_pays", "pool", "transfer", "io_filesystem", "connect_timeout_seconds",
                },
            )
        )
        for name in ("key", "secret", "session_token"):
            value = getattr(block, name)
            data[name] = value.get_secret_value() if value is not None else None
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _make_filesystems(block: "ObjectStoreBackend", location: Location) -> FileSystems:
    if location.protocol == "file":
        fs = fsspec.filesystem("file", **block.storage_options)
        # Local data goes through Arrow's native filesystem: fsspec wraps the
        # same calls in Python and is measurably slower.
        return FileSystems(location, fs, pafs.LocalFileSystem(), "pyarrow.fs.LocalFileSystem")
    fs = _make_s3fs(block)
    if block.io_filesystem == "pyarrow":
        return FileSystems(location, fs, pafs.S3FileSystem(**pyarrow_s3_options(block)), "pyarrow.fs.S3FileSystem")
    return FileSystems(location, fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), "s3fs.S3FileSystem (via FSSpecHandler)")


def _close_filesystems(pair: FileSystems) -> None:
    """Close s3fs's HTTP session (pyarrow's native client is finalized by pyarrow at exit)."""
    fs = pair.fs
    s3 = getattr(fs, "_s3", None)
    if s3 is None:
        return
    try:
        fs.close_session(getattr(fs, "loop", None), s3)
    except Exception:  # closing is best effort; never mask the run's own outcome
        pass
    fs._s3 = None  # noqa: SLF001


def _stats(pair: FileSystems) -> dict[str, Any]:
    return {"protocol": pair.location.protocol, "data_io": pair.io_class, "root": pair.location.display(pair.location.root)}


async def acquire_filesystems(block: "ObjectStoreBackend") -> FileSystems:
    """The block's pooled filesystem pair (one per configuration per process)."""
    location = block.location_info()
    limits: dict[str, Any] = {"protocol": location.protocol}
    if location.protocol == "s3":
        limits.update(
            max_pool_connections=block.pool.max_connections or 10,
            block_size=block.transfer.block_size or S3FS_DEFAULT_BLOCK_SIZE,
            max_concurrency=block.transfer.max_concurrency or 10,
        )
    return await pool_manager.acquire(
        f"objectstore-{location.protocol}",
        filesystem_key(block),
        lambda: _make_filesystems(block, location),
        closer=_close_filesystems,
        stats=_stats,
        limits=limits,
        per_loop=False,
    )


async def release_filesystems(block: "ObjectStoreBackend") -> None:
    """Give the pooled pair back (the last user closes it)."""
    location = block.location_info()
    await pool_manager.release(f"objectstore-{location.protocol}", filesystem_key(block), per_loop=False)


# -- errors -----------------------------------------------------------------------


def translate_error(
    exc: BaseException, what: str, location: Location | None = None, endpoint: str | None = None
) -> FerryError:
    """A Ferry error for a store error met while doing ``what`` (which names the object)."""
    if isinstance(exc, FerryError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if any(marker in lowered for marker in ("nosuchbucket", "bucket does not exist", "the specified bucket does not exist")):
        bucket = location.bucket if location is not None else None
        return PermanentBackendError(
            f"{what}: the bucket {bucket!r} does not exist; create it or fix `url`/`bucket` ({_short(text)})"
        )
    if any(
        marker in lowered
        for marker in (
            "accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden",
            "403", "expiredtoken", "invalidtoken", "permissionerror", "nocredentials", "unable to locate credentials",
        )
    ):
        return PermanentBackendError(
            f"{what}: access denied; check `key`/`secret`, `session_token`, `profile` or `role_arn` "
            f"and the bucket policy ({_short(text)})"
        )
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(
        marker in lowered
        for marker in (
            "could not connect", "connection refused", "cannot connect", "connect timeout", "endpointconnectionerror",
            "timed out", "curl", "couldn't connect", "connection reset", "name or service not known",
        )
    ):
        return TransientBackendError(
            f"{what}: cannot reach the object store at {endpoint or 'the AWS endpoint'}; check `endpoint_url` "
            f"and the network ({_short(text)})"
        )
    if isinstance(exc, FileNotFoundError):
        return PermanentBackendError(f"{what}: not found ({_short(text)})")
    return PermanentBackendError(f"{what}: {_short(text)}")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
