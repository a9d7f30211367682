"""The exceptions streamcore raises. All derive from one root::

    StreamcoreError
     ├── ConfigError               bad configuration; start-up stops, the message names the field
     ├── JobDefinitionError        the job graph is invalid (caught when the job is built)
     ├── RetriableError            transient; the engine retries with backoff, then escalates
     │    ├── BrokerUnavailable    the broker cannot be reached right now
     │    └── TransactionAborted   an epoch's transaction was aborted; the epoch is retried
     └── FatalError                the worker stops without committing the failing offset
          ├── DeliveryFailed       the broker rejected an output or changelog record
          ├── DeserializationError an input record could not be decoded
          ├── SerializationError   a sink's serde refused an output (a configuration mistake)
          ├── UserFunctionError    a user function raised
          ├── StateError           a state store could not be opened, restored or written
          ├── RebalanceError       a partition could not be handed over cleanly
          └── ProducerFenced       another worker took over the transactional id (epoch mode)

Retriable and fatal errors are kept apart so that a caller never has to inspect a message to
decide whether to retry. Every fatal error that concerns one input record carries its source
position (topic, partition, offset), so that the operator can find it.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DeliveryFailed",
    "DeserializationError",
    "FatalError",
    "JobDefinitionError",
    "ProducerFenced",
    "RebalanceError",
    "RetriableError",
    "SerializationError",
    "StateError",
    "StreamcoreError",
    "TransactionAborted",
    "UserFunctionError",
]


class StreamcoreError(Exception):
    """Root of every error streamcore raises on purpose."""


class ConfigError(StreamcoreError, ValueError):
    """A configuration value is invalid. ``field`` names it (e.g. ``commit_interval``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid configuration: {field}: {problem}")
        self.field = field
        self.problem = problem


class JobDefinitionError(StreamcoreError, ValueError):
    """The job graph is invalid: a missing step name, an unsupported combination, a cycle."""


class RetriableError(StreamcoreError):
    """A transient failure: retrying the same operation later may succeed."""


class BrokerUnavailable(RetriableError):
    """The Kafka cluster could not be reached."""


class FatalError(StreamcoreError):
    """The worker cannot continue; it stops without committing the failing offset."""


class _RecordError(FatalError):
    """A fatal error tied to one input record."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int) -> None:
        super().__init__(f"{message} (at {topic}[{partition}]@{offset})")
        self.topic = topic
        self.partition = partition
        self.offset = offset


class DeliveryFailed(FatalError):
    """The broker (or the client, before sending) rejected a record for ``topic``."""

    def __init__(self, topic: str, cause: str) -> None:
        super().__init__(f"delivery to topic {topic!r} failed: {cause}")
        self.topic = topic
        self.cause = cause


class DeserializationError(_RecordError):
    """An input key or value could not be decoded by its serde."""


class SerializationError(_RecordError):
    """A sink's key or value serde refused an output. Fatal under every error policy: a serde
    that does not fit the records is a configuration mistake that would otherwise drop every
    record while the job looks healthy."""


class UserFunctionError(_RecordError):
    """A user-supplied function raised while processing a record."""


class StateError(FatalError):
    """A state store could not be opened, restored or written."""


class RebalanceError(FatalError):
    """Partitions could not be revoked or assigned cleanly."""


class TransactionAborted(RetriableError):
    """An epoch's transaction could not be committed and was aborted: its outputs, state
    changes and offsets are discarded, and the epoch runs again from the committed offsets."""


class ProducerFenced(FatalError):
    """Another producer registered this worker's transactional id, or the group moved on
    (epoch mode): this worker is a zombie and must write nothing more."""
