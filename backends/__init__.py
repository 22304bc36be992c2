"""Ferry's backends: Prefect blocks that stream Arrow record batches in and out of stores.

Importing this package registers every backend block with Prefect
(``prefect block register -m ferry.backends``).
"""

from .base import Backend, Capabilities, Partition, WriteContext, WriteMode, WriteResult
from .errors import (
    ConfigurationError,
    DataError,
    FerryError,
    PermanentBackendError,
    RejectLimitExceeded,
    RunInterrupted,
    TransientBackendError,
)
from .elasticsearch import ElasticsearchBackend, OpenSearchBackend
from .memory import MemoryBackend, memory_store
from .objectstore import ObjectStoreBackend
from .postgres import PostgresBackend
from .pools import get_pool_count, get_pool_info, pool_manager
from .registry import BACKENDS, backend_class
from .stream import StreamConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "ConfigurationError",
    "DataError",
    "ElasticsearchBackend",
    "FerryError",
    "MemoryBackend",
    "ObjectStoreBackend",
    "OpenSearchBackend",
    "Partition",
    "PermanentBackendError",
    "PostgresBackend",
    "RejectLimitExceeded",
    "RunInterrupted",
    "StreamConfig",
    "TransientBackendError",
    "WriteContext",
    "WriteMode",
    "WriteResult",
    "backend_class",
    "get_pool_count",
    "get_pool_info",
    "memory_store",
    "pool_manager",
]
