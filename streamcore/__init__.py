"""streamcore: an asyncio stream processor for Apache Kafka.

Everything a job needs is importable from here::

    from streamcore import Job, KafkaSource, KafkaSink, JSON, STR
"""

from connectors.kafka import KafkaSink, KafkaSource
from statestore.rocksdb import RocksDBSettings
from streamcore.config import WorkerConfig
from streamcore.errors import (
    BrokerUnavailable,
    ConfigError,
    DeliveryFailed,
    DeserializationError,
    FatalError,
    JobDefinitionError,
    RebalanceError,
    RetriableError,
    SerializationError,
    StateError,
    StreamcoreError,
    UserFunctionError,
)
from streamcore.job import Job, Stream
from streamcore.query import StreamingQuery
from streamcore.serde import BYTES, JSON, KEY, STR, Serde
from streamcore.table import Table

__version__ = "0.1.0"

__all__ = [
    "BYTES",
    "JSON",
    "KEY",
    "STR",
    "BrokerUnavailable",
    "ConfigError",
    "DeliveryFailed",
    "DeserializationError",
    "FatalError",
    "Job",
    "JobDefinitionError",
    "KafkaSink",
    "KafkaSource",
    "RebalanceError",
    "RetriableError",
    "RocksDBSettings",
    "SerializationError",
    "Serde",
    "StateError",
    "Stream",
    "StreamcoreError",
    "StreamingQuery",
    "Table",
    "UserFunctionError",
    "WorkerConfig",
    "__version__",
]
