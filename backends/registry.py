"""Backend kinds by the names job files use."""

from __future__ import annotations

from .base import Backend
from .elasticsearch import ElasticsearchBackend, OpenSearchBackend
from .errors import ConfigurationError
from .memory import MemoryBackend
from .objectstore import ObjectStoreBackend
from .postgres import PostgresBackend

#: Job-file name -> backend block class. Aliases name the same class.
BACKENDS: dict[str, type[Backend]] = {
    "memory": MemoryBackend,
    "objectstore": ObjectStoreBackend,
    "local": ObjectStoreBackend,
    "file": ObjectStoreBackend,
    "s3": ObjectStoreBackend,
    "postgres": PostgresBackend,
    "elasticsearch": ElasticsearchBackend,
    "opensearch": OpenSearchBackend,
}


def backend_class(name: str, *, path: str = "backend") -> type[Backend]:
    """The block class for a backend name, or a ConfigurationError listing the known names."""
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigurationError(f"unknown backend {name!r}; expected one of: {known}", path=path) from None


def backend_fields(cls: type[Backend]) -> dict[str, str]:
    """Setting name -> description for a backend class (what a job may set)."""
    return {name: (field.description or "") for name, field in cls.model_fields.items()}
