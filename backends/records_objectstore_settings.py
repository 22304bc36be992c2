"""Settings of the object-store record store: where the records live and how they are kept.

The configuration of ``AsyncDatabase.create("s3" | "local", config)`` is an
:class:`~ferry.backends.objectstore.ObjectStoreBackend`'s settings (the
location, credentials, pool and transfer settings, ``compression``) plus the
record settings of :class:`ObjectStoreRecordSettings`; :func:`split_config`
separates them and refuses what records cannot use.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigurationError
from .objectstore import ObjectStoreBackend

__all__ = ["ObjectStoreRecordSettings", "split_config"]


class ObjectStoreRecordSettings(BaseModel):
    """Record-store settings besides the location (which is an ObjectStoreBackend's)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("records", description="Folder (key prefix) under `url` holding the record files.")
    max_typed_fields: int = Field(
        64, ge=0, description="Top-level field names per file given typed columns for filter pushdown."
    )
    compact_file_rows: int = Field(1_000_000, ge=1, description="Largest number of rows in one file written by compact().")
    tombstone_retention_seconds: float = Field(
        3600.0,
        ge=0,
        description="compact() keeps a delete's tombstone this long, so that a slower writer's older version cannot bring the record back.",
    )
    listing_max_age_seconds: float = Field(
        0.0,
        ge=0,
        description=(
            "How long a listing of the folder is reused before the next operation lists again; 0: every operation "
            "lists. Above 0, other writers' records show up to this late (this store's own at once) and a create "
            "checks ids against that older listing; single-record calls then skip the LIST."
        ),
    )
    file_cache_bytes: int = Field(
        128 * 1024 * 1024,
        ge=0,
        description="Bytes of record files kept in memory (files never change, so a kept file is never stale); 0: none.",
    )


_RECORD_KEYS = set(ObjectStoreRecordSettings.model_fields)


def split_config(config: Any) -> tuple[ObjectStoreBackend, ObjectStoreRecordSettings]:
    """The location block and the record settings of a dict, a block or a settings-file section."""
    if isinstance(config, ObjectStoreBackend):
        block, settings = config.fresh(), ObjectStoreRecordSettings()
    else:
        if isinstance(config, BaseModel):
            config = config.model_dump(exclude_none=True)
        if not isinstance(config, Mapping):
            raise ConfigurationError(
                "object-store record settings are a mapping such as {'url': 's3://bucket/prefix'} or "
                f"{{'url': '/data/records'}}, a saved ObjectStoreBackend block, or a databases.s3 section; "
                f"got {type(config).__name__}",
                path="config",
            )
        allowed = _RECORD_KEYS | set(ObjectStoreBackend.model_fields)
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ConfigurationError(
                f"invalid object-store record settings: unknown key(s) {', '.join(map(str, unknown))}; "
                f"accepted: {', '.join(sorted(allowed))}",
                path="config",
            )
        try:
            settings = ObjectStoreRecordSettings.model_validate({k: v for k, v in config.items() if k in _RECORD_KEYS})
            block = ObjectStoreBackend.model_validate({k: v for k, v in config.items() if k not in _RECORD_KEYS})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"invalid object-store record settings: {problems}", path="config") from None
    if block.format != "parquet":
        raise ConfigurationError(
            f"records are stored as Parquet files; format {block.format!r} is not supported here (leave it out)",
            path="config.format",
        )
    if block.partition_by:
        raise ConfigurationError("record files are not partitioned; leave partition_by out", path="config.partition_by")
    block.dataset_path(settings.dataset)  # refuses an empty or '..' dataset name
    return block, settings
