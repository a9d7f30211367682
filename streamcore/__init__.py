"""streamcore: an asyncio stream processor for Apache Kafka.

Everything a job needs is importable from here::

    from streamcore import Job, KafkaSource, KafkaSink, JSON, STR
"""

from connectors.kafka import KafkaSink, KafkaSource
from statestore.rocksdb import RocksDBSettings
from streamcore.api.config import WorkerConfig
from streamcore.api.groupstate import GroupState
from streamcore.api.job import Job, Stream
from streamcore.api.query import StreamingQuery
from streamcore.api.stream import Table
from streamcore.api.triggers import Trigger, available_now, continuous, once, processing_time
from streamcore.api.windows import Hopping, Session, Sliding, Tumbling, Window, WindowedStream
from streamcore.core.errors import (
    BrokerUnavailable,
    ConfigError,
    DeliveryFailed,
    DeserializationError,
    FatalError,
    JobDefinitionError,
    ProducerFenced,
    RebalanceError,
    RetriableError,
    SerializationError,
    StateError,
    StreamcoreError,
    TransactionAborted,
    UserFunctionError,
)
from streamcore.core.serde import BYTES, JSON, KEY, STR, Serde

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
    "GroupState",
    "Hopping",
    "Job",
    "JobDefinitionError",
    "KafkaSink",
    "KafkaSource",
    "ProducerFenced",
    "RebalanceError",
    "RetriableError",
    "RocksDBSettings",
    "SerializationError",
    "Serde",
    "Session",
    "Sliding",
    "StateError",
    "Stream",
    "StreamcoreError",
    "StreamingQuery",
    "Table",
    "TransactionAborted",
    "Trigger",
    "Tumbling",
    "UserFunctionError",
    "Window",
    "WindowedStream",
    "WorkerConfig",
    "__version__",
    "available_now",
    "continuous",
    "once",
    "processing_time",
]
