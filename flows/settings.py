"""The settings templates: the performance guide's `databases:` shape plus a `stream:` section.

``configs/high-performance.yaml`` and ``configs/memory-optimized.yaml`` are
validated by :class:`TemplateSettings`; a job names them with ``extends:``.
Where the guide spells a setting two ways both are accepted (see
``docs/settings.md`` for every key, its aliases and the driver setting it
becomes). A key that has no effect is refused, or accepted with a one-line
warning that says why.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from ferry.backends.stream import StreamConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PostgresPoolSettings(_Strict):
    """asyncpg pool settings (asyncpg.create_pool arguments)."""

    min_connections: int | None = Field(
        None, validation_alias=AliasChoices("min_connections", "min_size"), description="asyncpg `min_size`."
    )
    max_connections: int | None = Field(
        None, validation_alias=AliasChoices("max_connections", "max_size"), description="asyncpg `max_size`."
    )
    connection_timeout: float | None = Field(
        None,
        validation_alias=AliasChoices("connection_timeout", "timeout"),
        description="asyncpg `timeout` (seconds to connect).",
    )
    command_timeout: float | None = Field(None, description="asyncpg `command_timeout` (seconds per statement).")
    max_queries: int | None = Field(None, description="asyncpg `max_queries` before a connection is replaced.")
    max_inactive_connection_lifetime: float | None = Field(
        None, description="asyncpg `max_inactive_connection_lifetime` (seconds)."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "PostgresPoolSettings":
        if self.min_connections is not None and self.min_connections < 0:
            raise ValueError("min_connections (min_size) cannot be negative")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections (max_size) must be at least 1")
        if (
            self.min_connections is not None
            and self.max_connections is not None
            and self.min_connections > self.max_connections
        ):
            raise ValueError(
                f"min_connections ({self.min_connections}) is above max_connections ({self.max_connections})"
            )
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError("max_queries must be at least 1")
        if self.max_inactive_connection_lifetime is not None and self.max_inactive_connection_lifetime < 0:
            raise ValueError("max_inactive_connection_lifetime cannot be negative")
        return self


class PostgresSettings(_Strict):
    """Connection defaults for PostgreSQL endpoints."""

    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None
    pool: PostgresPoolSettings = Field(default_factory=PostgresPoolSettings)


class ElasticsearchPoolSettings(_Strict):
    """Connections per node of the Elasticsearch client."""

    connections: int | None = Field(None, ge=1, description="Client `connections_per_node`.")
    maxsize: int | None = Field(None, ge=1, description="Client `connections_per_node` (must equal `connections`).")


class ElasticsearchIndexSettings(_Strict):
    """Settings of indexes Ferry creates."""

    number_of_shards: int | None = Field(None, ge=1)
    number_of_replicas: int | None = Field(None, ge=0)
    refresh_interval: str | None = None


class ElasticsearchSettings(_Strict):
    """Connection defaults for Elasticsearch / OpenSearch endpoints."""

    hosts: list[str] | None = None
    timeout: float | None = Field(None, description="Client `request_timeout` (seconds).")
    refresh: bool | None = Field(None, description="Refresh after bulk writes (false for bulk loads).")
    pool: ElasticsearchPoolSettings = Field(default_factory=ElasticsearchPoolSettings)
    index: ElasticsearchIndexSettings = Field(default_factory=ElasticsearchIndexSettings)


class S3PoolSettings(_Strict):
    """botocore connection pool."""

    max_connections: int | None = Field(None, ge=1, description="botocore `max_pool_connections`.")


class S3TransferSettings(_Strict):
    """Transfer settings, mapped onto s3fs and pyarrow."""

    multipart_threshold: int | None = Field(None, ge=5 * 1024 * 1024)
    multipart_chunksize: int | None = Field(None, ge=5 * 1024 * 1024, description="s3fs `default_block_size`.")
    max_concurrency: int | None = Field(None, ge=1, description="s3fs `max_concurrency`; files written at once.")
    max_io_queue: int | None = Field(None, ge=1, description="No equivalent in s3fs or pyarrow: accepted, warned.")

    @model_validator(mode="after")
    def _warn_no_effect(self) -> "S3TransferSettings":
        if self.max_io_queue is not None:
            warnings.warn(
                "s3.transfer.max_io_queue has no effect: s3fs and pyarrow have no I/O queue setting "
                "(boto3's transfer manager does); use max_concurrency to bound parallel transfers",
                FerrySettingWarning,
                stacklevel=2,
            )
        return self


class S3Settings(_Strict):
    """Connection defaults for S3 endpoints."""

    bucket: str | None = None
    pool: S3PoolSettings = Field(default_factory=S3PoolSettings)
    transfer: S3TransferSettings = Field(default_factory=S3TransferSettings)


class DatabasesSettings(_Strict):
    """The guide's `databases:` section."""

    postgres: PostgresSettings | None = None
    elasticsearch: ElasticsearchSettings | None = None
    s3: S3Settings | None = None


class TemplateSettings(_Strict):
    """A settings template (`configs/*.yaml`): stream settings and database defaults."""

    stream: StreamConfig = Field(default_factory=StreamConfig)
    databases: DatabasesSettings = Field(default_factory=DatabasesSettings)


class FerrySettingWarning(UserWarning):
    """A setting was accepted but has no effect; the message says why."""


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; values of ``override`` win, nested mappings merge."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged
