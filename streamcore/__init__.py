"""streamcore: an asyncio stream processor for Apache Kafka.

Everything a job needs is importable from here::

    from streamcore import Job, KafkaSource, KafkaSink, JSON, STR
"""

from connectors.kafka import KafkaSink, KafkaSource
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
    StreamcoreError,
    UserFunctionError,
)
from streamcore.job import Job, Stream
from streamcore.query import StreamingQuery
from streamcore.serde import BYTES, JSON, STR, Serde

__version__ = "0.1.0"

__all__ = [
    "BYTES",
    "JSON",
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
    "Serde",
    "Stream",
    "StreamcoreError",
    "StreamingQuery",
    "UserFunctionError",
    "WorkerConfig",
    "__version__",
]
