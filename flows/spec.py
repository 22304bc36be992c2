"""The job spec: YAML job files validated by pydantic models.

A job names a source and a target (inline settings, ``${ENV_VAR}``
references, or a saved Prefect block), optional ``where`` and transforms, a
write mode and the stream settings. :func:`load_job` reads a file, resolves
``extends:`` templates, environment references and ``--set`` overrides, and
returns a validated :class:`JobSpec`; every problem becomes one
:class:`~ferry.backends.errors.ConfigurationError` naming the file, the field
path and what is expected. Each endpoint takes defaults from the job's
``databases:`` section (usually from its templates): see
:func:`ferry.flows.settings.endpoint_defaults` and docs/settings.md.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ferry.backends.base import Backend, WriteMode
from ferry.backends.errors import ConfigurationError
from ferry.backends.filters import Filter, parse_filter
from ferry.backends.registry import BACKENDS, backend_class
from ferry.backends.stream import StreamConfig

from .settings import (
    DatabasesSettings,
    EndpointDefaults,
    FerrySettingWarning,
    TemplateSettings,
    canonical_databases,
    endpoint_defaults,
    merge_settings,
)

#: Keys of an endpoint that are not backend settings.
ENDPOINT_KEYS = ("backend", "block", "dataset", "columns", "where")


class EndpointSpec(BaseModel):
    """A source or a target: a backend with inline settings, or a saved block, and a dataset."""

    model_config = ConfigDict(extra="allow")

    backend: str | None = Field(None, description="Backend name: memory, objectstore (alias local).")
    block: str | None = Field(None, description="A saved Prefect block, as `<block-type-slug>/<name>`.")
    dataset: str = Field(..., description="Table, index, folder or in-memory dataset name.")
    columns: list[str] | None = Field(None, description="Columns to read (source only); all when omitted.")
    where: Any = Field(None, description="Row filter (source only), pushed down where the store can.")

    #: The job's ``databases:`` section, set by the JobSpec that holds this endpoint (defaults, not settings).
    _databases: DatabasesSettings | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_origin(self) -> "EndpointSpec":
        if (self.backend is None) == (self.block is None):
            raise ValueError("give exactly one of `backend` (inline settings) or `block` (a saved block)")
        if self.block is not None and "/" not in self.block:
            raise ValueError(f"block {self.block!r} must look like `<block-type-slug>/<name>`")
        if self.block is not None and self.settings:
            raise ValueError(
                f"settings {sorted(self.settings)} cannot be combined with a saved block; put them in the block"
            )
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """Backend settings given inline (everything that is not an endpoint key)."""
        return dict(self.model_extra or {})

    def filter(self) -> Filter | None:
        """The parsed ``where`` filter."""
        return None if self.where is None else parse_filter(self.where)

    def backend_type(self) -> type[Backend] | None:
        """The backend class this endpoint names (by backend name or block type slug); None when unknown."""
        if self.backend is not None:
            try:
                return backend_class(self.backend)
            except ConfigurationError:
                return None
        slug = (self.block or "").split("/", 1)[0]
        return next((cls for cls in BACKENDS.values() if cls.get_block_type_slug() == slug), None)

    def template_defaults(self, given: dict[str, Any] | None = None) -> EndpointDefaults:
        """What the job's ``databases:`` section gives this endpoint (see ``endpoint_defaults``).

        For an inline endpoint ``given`` defaults to its settings; for a saved
        block pass the loaded block's settings (None: only the notes).
        """
        cls = self.backend_type()
        if cls is None or self._databases is None:
            return EndpointDefaults()
        if self.block is None and given is None:
            given = self.settings
        if self.backend in ("local", "file") and not (given or {}).get("url"):
            return EndpointDefaults()  # a folder without a url: the template's bucket must not turn it into S3
        return endpoint_defaults(self._databases, cls, given, block=self.block)

    def resolved_settings(self) -> dict[str, Any]:
        """Inline settings on top of the defaults of the job's ``databases:`` section (the endpoint wins)."""
        return merge_settings(self.template_defaults().settings, self.settings)


class JobSpec(BaseModel):
    """A migration job: what to read, how to transform it, where and how to write it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Job name (in run names and files).")
    description: str = Field("", description="What the job is for.")
    source: EndpointSpec = Field(..., description="Where data is read from.")
    target: EndpointSpec = Field(..., description="Where data is written to.")
    transforms: list[dict[str, Any]] = Field(default_factory=list, description="Transform steps, in order.")
    mode: WriteMode = Field(WriteMode.APPEND, description="append, replace or upsert.")
    key: list[str] = Field(default_factory=list, description="Key columns (upsert, ids, row keys in rejects).")
    schema_policy: Literal["strict", "evolve", "ignore_extra"] = Field(
        "strict", description="What to do when the target exists with other columns or types."
    )
    on_error: Literal["fail", "collect"] = Field(
        "fail", description="fail: stop at the first bad record; collect: write bad rows to the rejects file."
    )
    max_rejected_rows: int = Field(10_000, ge=0, description="With on_error: collect, stop past this many rejects.")
    rejects_dir: str = Field(".ferry/rejects", description="Folder of the rejects files (one per run and partition).")
    retries: int = Field(2, ge=0, description="Retries of a partition after a transient error.")
    retry_delay_seconds: float = Field(1.0, ge=0, description="Wait before a partition is retried.")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Batch size, buffers and parallelism.")
    runner: Literal["async", "threads"] = Field(
        "async",
        description="async: partitions share the flow's event loop and pools; threads: one loop per partition.",
    )
    verify: bool = Field(True, description="Read the target back and compare row count and checksum.")
    databases: DatabasesSettings = Field(
        default_factory=DatabasesSettings, description="Connection defaults, usually from `extends:` templates."
    )

    @field_validator("transforms")
    @classmethod
    def _check_transforms(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from ferry.tasks.transforms import parse_steps

        parse_steps(value)
        return value

    @model_validator(mode="after")
    def _check_job(self) -> "JobSpec":
        if self.target.where is not None:
            raise ValueError("`where` belongs to the source, not the target")
        if self.target.columns is not None:
            raise ValueError("`columns` belongs to the source; use a `select` transform for the target")
        if self.mode is WriteMode.UPSERT and not self.key:
            raise ValueError("mode `upsert` needs `key: [column, ...]`")
        return self

    @model_validator(mode="after")
    def _give_endpoints_their_defaults(self) -> "JobSpec":
        for side in ("source", "target"):
            # A copy: an EndpointSpec instance given to two jobs must not share one job's defaults.
            endpoint = getattr(self, side).model_copy()
            endpoint._databases = self.databases
            setattr(self, side, endpoint)
            for note in endpoint.template_defaults().notes:
                warnings.warn(f"{side}: {note}", FerrySettingWarning, stacklevel=2)
        return self

    def source_filter(self) -> Filter | None:
        """The parsed ``source.where``."""
        return self.source.filter()


_ENV_ONLY = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def literal_secrets(job: JobSpec) -> list[str]:
    """Field paths of inline secret settings given as values rather than ``${ENV}`` references.

    Flow-run parameters are stored in plain text by Prefect, so a job given as
    parameters may name a saved block or reference an environment variable
    for a secret, never carry the secret itself.
    """
    found = []
    for side in ("source", "target"):
        endpoint: EndpointSpec = getattr(job, side)
        if endpoint.backend is None:
            continue
        secrets = _secret_fields(backend_class(endpoint.backend, path=f"{side}.backend"))
        for name, value in endpoint.settings.items():
            if name not in secrets or value is None:
                continue
            if isinstance(value, str) and _ENV_ONLY.match(value):
                continue
            found.append(f"{side}.{name}")
    return found


def _secret_fields(cls: type[Backend]) -> set[str]:
    from pydantic import SecretStr

    return {name for name, field in cls.model_fields.items() if _is_secret(field.annotation, SecretStr)}


def _secret_paths(raw: dict[str, Any]) -> frozenset[str]:
    """``side.field`` paths of secret settings in a raw job mapping."""
    paths = set()
    for side in ("source", "target"):
        endpoint = raw.get(side)
        if not isinstance(endpoint, dict) or not isinstance(endpoint.get("backend"), str):
            continue
        try:
            cls = backend_class(endpoint["backend"])
        except ConfigurationError:
            continue  # reported by validation with its field path
        paths.update(f"{side}.{name}" for name in _secret_fields(cls) if name in endpoint)
    return frozenset(paths)


def _is_secret(annotation: Any, secret_type: type) -> bool:
    if annotation is secret_type:
        return True
    return any(_is_secret(arg, secret_type) for arg in getattr(annotation, "__args__", ()) or ())


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read, resolve and validate a job file (see the module docstring)."""
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"job file not found: {label}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read job file: {exc.strerror}", source=label) from None
    raw = _parse_yaml(text, label)
    raw.setdefault("name", _default_name(path))
    return job_from_dict(raw, source=label, base_dir=path.parent, overrides=overrides)


def job_from_dict(
    raw: dict[str, Any],
    *,
    source: str = "parameters",
    base_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> JobSpec:
    """Validate a job given as a mapping (a parsed file, or flow parameters)."""
    if not isinstance(raw, dict):
        raise ConfigurationError("a job must be a mapping of keys to values", source=source)
    raw = dict(raw)
    raw = _apply_extends(raw, source, base_dir or Path.cwd())
    for item in overrides or []:
        raw = canonical_databases(_apply_override(raw, item, source))
    raw = _substitute_env(raw, source, "", keep=_secret_paths(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            job = JobSpec.model_validate(raw)
        except ValidationError as exc:
            raise ConfigurationError(format_validation_error(exc, JobSpec), source=source) from None
        except ConfigurationError as exc:
            raise ConfigurationError(exc.message, source=source, path=exc.path) from None
    for warning in caught:
        warnings.warn(f"{source}: {warning.message}", warning.category, stacklevel=2)
    for side in ("source", "target"):
        endpoint: EndpointSpec = getattr(job, side)
        _check_endpoint(endpoint, side, source)
    return job


def _check_endpoint(endpoint: EndpointSpec, side: str, source: str) -> None:
    if endpoint.backend is not None:
        try:
            cls = backend_class(endpoint.backend, path=f"{side}.backend")
        except ConfigurationError as exc:
            raise ConfigurationError(exc.message, source=source, path=exc.path) from None
        # Settings may use a field's validation aliases (e.g. postgres `min_size` for min_connections).
        known = set(cls.model_fields) | {
            alias
            for info in cls.model_fields.values()
            for alias in getattr(info.validation_alias, "choices", ())
            if isinstance(alias, str)
        }
        unknown = sorted(set(endpoint.settings) - known)
        if unknown:
            allowed = ", ".join(list(ENDPOINT_KEYS) + sorted(cls.model_fields))
            raise ConfigurationError(
                f"unknown key {unknown[0]!r} for backend {endpoint.backend!r}; expected one of: {allowed}",
                source=source,
                path=f"{side}.{unknown[0]}",
            )
        try:
            cls.model_validate(endpoint.resolved_settings())
        except ValidationError as exc:
            raise ConfigurationError(format_validation_error(exc, cls, prefix=side), source=source) from None
    if endpoint.where is not None:
        try:
            parse_filter(endpoint.where, source=source, path=f"{side}.where")
        except ConfigurationError as exc:
            raise ConfigurationError(exc.message, source=source, path=exc.path) from None


async def build_backend(endpoint: EndpointSpec) -> Backend:
    """Instantiate the block an endpoint names (loading a saved block needs a Prefect API)."""
    if endpoint.block is not None:
        from prefect.blocks.core import Block

        try:
            block = await Block.aload(endpoint.block)
        except ValueError as exc:
            raise ConfigurationError(f"cannot load saved block {endpoint.block!r}: {exc}") from None
        if not isinstance(block, Backend):
            raise ConfigurationError(f"block {endpoint.block!r} is not a Ferry backend block")
        return _tuned_block(block, endpoint)
    cls = backend_class(endpoint.backend or "")
    settings = endpoint.resolved_settings()
    for name in _secret_fields(cls) & set(settings):
        # Secret references are resolved here, inside the run, and nowhere else.
        settings[name] = _substitute_env(settings[name], "job", name)
    return cls.model_validate(settings)


def _tuned_block(block: Backend, endpoint: EndpointSpec) -> Backend:
    """A saved block with the tuning keys of the job's templates applied (its connection untouched)."""
    data = block.model_dump()
    defaults = endpoint.template_defaults(data)
    for note in defaults.notes:
        warnings.warn(f"{endpoint.block}: {note}", FerrySettingWarning, stacklevel=3)
    if not defaults.settings:
        return block
    try:
        tuned = type(block).model_validate(merge_settings(data, defaults.settings))
    except ValidationError as exc:
        raise ConfigurationError(
            f"saved block {endpoint.block!r} with the job's databases.{defaults.section} settings: "
            + format_validation_error(exc, type(block))
        ) from None
    for name, value in (block.__pydantic_private__ or {}).items():
        if name != "_live":  # keep the block's identity (its name names the concurrency tag)
            setattr(tuned, name, value)
    return tuned


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One readable line per pydantic error: field path, what was wrong, what is expected."""
    lines = []
    for error in exc.errors():
        loc = _format_loc(error.get("loc", ()), prefix)
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            expected = _allowed_keys(model, error.get("loc", ()))
            message = "unknown key" + (f"; expected one of: {expected}" if expected else "")
        elif kind == "missing":
            message = "required field is missing"
        else:
            message = error.get("msg", "invalid value")
            message = message.removeprefix("Value error, ")
            if "input" in error and kind not in ("value_error",):
                message += f" (got {_short(error['input'])!r})"
        lines.append(f"{loc}: {message}" if loc else message)
    return "; ".join(lines)


def _format_loc(loc: tuple, prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> str:
    current: Any = model
    for item in loc[:-1]:
        if isinstance(item, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(item)
        if field is None:
            return ""
        annotation = field.annotation
        current = _model_in(annotation)
    if current is None or not hasattr(current, "model_fields"):
        return ""
    return ", ".join(sorted(current.model_fields))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_yaml(text: str, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{where}malformed YAML: {problem}", source=label) from None
    if data is None:
        raise ConfigurationError("the job file is empty; it needs at least `source` and `target`", source=label)
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"the job file must be a mapping of keys to values, not a {type(data).__name__}", source=label
        )
    return data


def _default_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.")
    return name or "job"


def template_path(name: str, base_dir: Path) -> Path | None:
    """Find a template by path (relative to the job file) or by bundled name."""
    candidates = [base_dir / name, base_dir / f"{name}.yaml", Path(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    bundled = importlib.resources.files("ferry.configs")
    for candidate_name in (name, f"{name}.yaml"):
        resource = bundled / candidate_name
        if resource.is_file():
            return Path(str(resource))
    return None


def load_template(name: str, base_dir: Path, source: str) -> dict[str, Any]:
    """Load and validate a settings template; returns its raw mapping."""
    path = template_path(name, base_dir)
    if path is None:
        raise ConfigurationError(
            f"template {name!r} not found next to the job file or among the bundled templates "
            "(high-performance, memory-optimized)",
            source=source,
            path="extends",
        )
    data = _parse_yaml(path.read_text(), str(path))
    try:
        TemplateSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, TemplateSettings), source=str(path)) from None
    return data


def _apply_extends(raw: dict[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    extends = raw.pop("extends", None)
    if extends is None:
        return raw
    names = [extends] if isinstance(extends, str) else extends
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigurationError("expected a template name or a list of names", source=source, path="extends")
    merged: dict[str, Any] = {}
    for name in names:
        with warnings.catch_warnings():
            # The job's validation reports the template's warnings, naming the job.
            warnings.simplefilter("ignore", FerrySettingWarning)
            template = load_template(name, base_dir, source)
        merged = merge_settings(merged, canonical_databases(template))
    return merge_settings(merged, canonical_databases(raw))


def _apply_override(raw: dict[str, Any], item: str, source: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigurationError(f"--set {item!r}: expected key=value, e.g. stream.parallel=4", source=source)
    dotted, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigurationError(f"--set {item!r}: empty key", source=source)
    result = dict(raw)
    node = result
    for key in keys[:-1]:
        child = node.get(key)
        child = dict(child) if isinstance(child, dict) else {}
        node[key] = child
        node = child
    node[keys[-1]] = value
    return result


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute_env(value: Any, source: str, path: str, keep: frozenset[str] = frozenset()) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the job.

    Paths in ``keep`` (secret settings) are left as references: they are
    resolved only when the backend is built inside the run, so a secret never
    sits in a job object or a flow-run parameter. Their variables must exist.
    """
    if isinstance(value, dict):
        return {
            k: _substitute_env(v, source, f"{path}.{k}" if path else str(k), keep) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute_env(v, source, f"{path}[{i}]", keep) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if path in keep:
        _substitute_env(value, source, path)  # fail now, naming the field, if a variable is unset
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigurationError(
            f"environment variable {name} is not set; export it or write ${{{name}:-default}}",
            source=source,
            path=path,
        )

    return _ENV_PATTERN.sub(replace, value)
