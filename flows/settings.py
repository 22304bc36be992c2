"""The settings templates: the performance guide's `databases:` shape plus a `stream:` section.

``configs/high-performance.yaml`` and ``configs/memory-optimized.yaml`` are
validated by :class:`TemplateSettings`; a job names them with ``extends:``.
Where the guide spells a setting two ways both are accepted (see
``docs/settings.md`` for every key, its aliases and the driver setting it
becomes). A key that has no effect is refused, or accepted with a one-line
warning that says why.

A job endpoint takes defaults from the ``databases.<store>`` section of its
backend (:func:`endpoint_defaults`): tuning keys (pools, timeouts, index and
transfer settings) fill what the endpoint does not set; connection keys
(``host``/``port``/``database``/``user``, ``hosts``, ``bucket``) apply only to an
endpoint that names no server of its own, never to a saved block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    maxsize: int | None = Field(
        None, ge=1, description="Client `connections_per_node`; wins over `connections` when both differ."
    )

    @model_validator(mode="after")
    def _warn_two_sizes(self) -> "ElasticsearchPoolSettings":
        if self.connections is not None and self.maxsize is not None and self.connections != self.maxsize:
            warnings.warn(
                f"elasticsearch.pool.connections ({self.connections}) has no effect: the client has one "
                f"pool size per node (connections_per_node), and maxsize ({self.maxsize}) sets it",
                FerrySettingWarning,
                stacklevel=2,
            )
        return self

    @property
    def per_node(self) -> int | None:
        """The client's ``connections_per_node`` these settings give (None: the backend's default)."""
        return self.maxsize if self.maxsize is not None else self.connections


class ElasticsearchIndexSettings(_Strict):
    """Settings of indexes Ferry creates."""

    number_of_shards: int | None = Field(None, ge=1)
    number_of_replicas: int | None = Field(None, ge=0)
    refresh_interval: str | None = None


class ElasticsearchSettings(_Strict):
    """Connection defaults for Elasticsearch / OpenSearch endpoints."""

    hosts: list[str] | None = None
    timeout: float | None = Field(None, gt=0, description="Client `request_timeout` (seconds).")
    refresh: bool | None = Field(
        None, description="Refresh after each bulk request: false is what Ferry does (one refresh at publish)."
    )
    pool: ElasticsearchPoolSettings = Field(default_factory=ElasticsearchPoolSettings)
    index: ElasticsearchIndexSettings = Field(default_factory=ElasticsearchIndexSettings)

    @model_validator(mode="after")
    def _warn_refresh(self) -> "ElasticsearchSettings":
        if self.refresh:
            warnings.warn(
                "elasticsearch.refresh: true has no effect: Ferry's bulk requests never refresh; the index "
                "is refreshed once when the load is published, and index.refresh_interval applies after it",
                FerrySettingWarning,
                stacklevel=2,
            )
        return self


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


def canonical_databases(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the aliases of its ``databases:`` keys renamed to the field names.

    Layers (templates, the job, ``--set``) are merged as raw mappings, so one
    setting spelled two ways (``min_size`` in a template, ``min_connections``
    in the job) must become one key before merging, or the later layer would
    not win. A layer's alias replaces the field name's value: call this after
    adding each layer.
    """
    databases = raw.get("databases")
    if not isinstance(databases, dict):
        return raw
    return {**raw, "databases": _canonical(DatabasesSettings, databases)}


def _canonical(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    result = dict(data)
    for name, info in model.model_fields.items():
        for alias in getattr(info.validation_alias, "choices", ()) or ():
            if isinstance(alias, str) and alias != name and alias in result:
                result[name] = result.pop(alias)
        nested = _submodel(info.annotation)
        if nested is not None and isinstance(result.get(name), dict):
            result[name] = _canonical(nested, result[name])
    return result


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _submodel(arg)
        if found is not None:
            return found
    return None


# -- what a template gives an endpoint -----------------------------------------------------

#: Backend kind -> the ``databases:`` section that holds its defaults.
SECTION_OF_KIND = {
    "postgres": "postgres",
    "elasticsearch": "elasticsearch",
    "opensearch": "elasticsearch",
    "objectstore": "s3",
}


@dataclass(frozen=True)
class _Key:
    """One template key: its path in the section, the backend setting it becomes, and its kind."""

    template: tuple[str, ...]
    setting: tuple[str, ...]
    connection: bool = False
    #: Other endpoint settings that set the same thing (the endpoint giving one overrides the key).
    same: tuple[str, ...] = ()


_KEYS: dict[str, tuple[_Key, ...]] = {
    "postgres": (
        _Key(("host",), ("host",), connection=True),
        _Key(("port",), ("port",), connection=True),
        _Key(("database",), ("database",), connection=True),
        _Key(("user",), ("user",), connection=True),
        *(
            _Key(("pool", name), (name,))
            for name in (
                "min_connections", "max_connections", "connection_timeout", "command_timeout",
                "max_queries", "max_inactive_connection_lifetime",
            )
        ),
    ),
    "elasticsearch": (
        _Key(("hosts",), ("hosts",), connection=True),
        _Key(("timeout",), ("request_timeout_seconds",)),
        # `connections` and `maxsize` are one client setting: see ElasticsearchPoolSettings.per_node.
        _Key(("pool", "per_node"), ("connections",), same=("maxsize",)),
        _Key(("index", "number_of_shards"), ("number_of_shards",)),
        _Key(("index", "number_of_replicas"), ("number_of_replicas",)),
        _Key(("index", "refresh_interval"), ("refresh_interval",)),
    ),
    "s3": (
        _Key(("bucket",), ("bucket",), connection=True),
        _Key(("pool", "max_connections"), ("pool", "max_connections")),
        *(
            _Key(("transfer", name), ("transfer", name))
            for name in ("multipart_threshold", "multipart_chunksize", "max_concurrency")
        ),
        # transfer.max_io_queue: warned about when the template is validated, never passed on.
    ),
}

#: Endpoint settings that name a server (or location): with one of them, no template connection key applies.
_SERVER_SETTINGS = {"postgres": ("host", "dsn"), "elasticsearch": ("hosts", "cloud_id"), "s3": ("url", "bucket")}

#: (min, max) settings that must stay ordered when an endpoint and a template each give one.
_BOUNDS = {"postgres": ("min_connections", "max_connections")}


@dataclass
class EndpointDefaults:
    """What the ``databases:`` section of a job gives one endpoint.

    ``settings`` are backend settings (field names, nested for ``pool`` and
    ``transfer``); ``notes`` say, one line each, which template keys do not
    apply to the endpoint and why.
    """

    section: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def endpoint_defaults(
    databases: DatabasesSettings | None,
    backend: Any,
    given: Mapping[str, Any] | None,
    *,
    block: str | None = None,
) -> EndpointDefaults:
    """The defaults ``databases.<section>`` gives an endpoint of ``backend`` (a backend block class).

    * Inline endpoint (``block`` None, ``given`` its settings): every template
      key the endpoint does not set itself. Connection keys only when the
      endpoint names no server (``host``/``dsn``, ``hosts``/``cloud_id``,
      ``url``/``bucket``): a default host never redirects an endpoint that
      says where it connects; those keys are then noted.
    * Saved block, while validating the job (``given`` None): nothing yet;
      notes for the connection keys, which never apply to a block.
    * Saved block, once loaded (``given`` its settings): the tuning keys,
      which win over the block's values (the job chose the template).

    The ``s3`` section applies to object stores on S3 only. A template
    minimum above the endpoint's maximum (or the reverse) is not applied.
    """
    result = EndpointDefaults(section=SECTION_OF_KIND.get(getattr(backend, "kind", "")))
    section = getattr(databases, result.section, None) if databases is not None and result.section else None
    if section is None:
        return result
    label = f"databases.{result.section}"
    names = _setting_names(backend)
    have = dict(given or {})
    own_server = block is not None or any(_gives(have, (name,), names) for name in _SERVER_SETTINGS[result.section])
    template_values = {key: _value(section, key.template) for key in _KEYS[result.section]}
    if result.section == "s3" and given is not None and not _on_s3(have, template_values, own_server):
        return result  # a local folder: the S3 section says nothing about it
    for key, value in template_values.items():
        if value is None:
            continue
        path = f"{label}.{'.'.join(key.template)}"
        if key.connection:
            if block is not None:
                if given is None:
                    result.notes.append(
                        f"{path} ({value!r}) is not applied: the endpoint names saved block {block!r}, "
                        "which holds its own connection"
                    )
            elif _gives(have, key.setting, names):
                pass  # the endpoint's own value wins
            elif own_server:
                server = next(n for n in _SERVER_SETTINGS[result.section] if _gives(have, (n,), names))
                result.notes.append(
                    f"{path} ({value!r}) is not applied: the endpoint names its own server (`{server}`)"
                )
            else:
                _put(result.settings, key.setting, value)
            continue
        if given is None:
            continue  # a saved block's tuning is applied once the block is loaded
        if block is None and (
            _gives(have, key.setting, names) or any(_gives(have, (other,), names) for other in key.same)
        ):
            continue  # the endpoint's own value wins
        _put(result.settings, key.setting, value)
    _keep_bounds(result, have, backend, label, block)
    return result


def _setting_names(backend: Any) -> dict[str, set[str]]:
    """Field name -> every name a setting may be given under (the name and its aliases)."""
    names: dict[str, set[str]] = {}
    for name, info in getattr(backend, "model_fields", {}).items():
        choices = getattr(info.validation_alias, "choices", ()) or ()
        names[name] = {name, *(c for c in choices if isinstance(c, str))}
    return names


def _gives(settings: Mapping[str, Any], path: tuple[str, ...], names: dict[str, set[str]]) -> bool:
    """Whether ``settings`` set the setting at ``path`` (under any of its names)."""
    head, *rest = path
    for name in names.get(head, {head}):
        if name in settings and settings[name] is not None:
            if not rest:
                return True
            nested = settings[name]
            if isinstance(nested, BaseModel):
                nested = nested.model_dump(exclude_none=True)
            return isinstance(nested, Mapping) and nested.get(rest[0]) is not None
    return False


def _value(section: BaseModel, path: tuple[str, ...]) -> Any:
    node: Any = section
    for part in path:
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _put(settings: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = settings
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _on_s3(settings: Mapping[str, Any], template_values: dict[_Key, Any], own_server: bool) -> bool:
    """Whether an object-store endpoint (with the template's bucket, when it applies) is on S3."""
    if settings.get("bucket"):
        return True
    url = settings.get("url")
    if url:
        return str(url).split("://", 1)[0].lower() in ("s3", "s3a")
    return not own_server and any(k.connection and v for k, v in template_values.items())


def _keep_bounds(
    result: EndpointDefaults, given: Mapping[str, Any], backend: Any, label: str, block: str | None
) -> None:
    """Drop a template minimum above the endpoint's maximum (or a maximum below its minimum), with a note."""
    bounds = _BOUNDS.get(result.section or "")
    if bounds is None or not result.settings:
        return
    low_name, high_name = bounds
    names = _setting_names(backend)
    fields = getattr(backend, "model_fields", {})

    def endpoint_value(name: str) -> tuple[Any, str]:
        for spelling in names.get(name, {name}):
            if given.get(spelling) is not None:
                return given[spelling], "the saved block's" if block else "the endpoint's"
        return (fields[name].default if name in fields else None), "the default"

    low, high = result.settings.get(low_name), result.settings.get(high_name)
    if (low is None) == (high is None):
        return  # both from the template (checked with it) or neither
    name, value, other_name = (low_name, low, high_name) if low is not None else (high_name, high, low_name)
    other, whose = endpoint_value(other_name)
    try:
        crossed = float(value) > float(other) if name == low_name else float(value) < float(other)
    except (TypeError, ValueError):
        return  # the backend's validation reports a value that is not a number
    if crossed:
        del result.settings[name]
        relation = "above" if name == low_name else "below"
        result.notes.append(
            f"{label}.pool.{name} ({value}) is not applied: it is {relation} {whose} {other_name} ({other})"
        )
