"""What a job reads from and writes to: Kafka source and sink descriptions (the Kafka
connector's :class:`~connectors.spec.Source` and :class:`~connectors.spec.Sink`).

These are plain frozen descriptions; the engine turns them into client calls. They are
re-exported by :mod:`streamcore`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from connectors.spec import Sink, Source
from streamcore.core.errors import JobDefinitionError
from streamcore.core.serde import BYTES, KEY, Serde

__all__ = ["KafkaSink", "KafkaSource"]

_STARTING = ("earliest", "latest")


@dataclass(frozen=True, kw_only=True, init=False)
class KafkaSource(Source):
    """Records from one or more topics, or from topics matching a regex (``pattern=``).

    ``timestamp`` extracts the event time (epoch milliseconds) from the decoded value; the
    Kafka record timestamp is used without it. ``starting_offsets`` applies only where the
    group has no committed offset yet, as in Spark.
    """

    topics: tuple[str, ...]
    pattern: str | None
    key: Serde
    value: Serde
    timestamp: Callable[[Any], int] | None
    starting_offsets: str

    def __init__(
        self,
        topics: str | Sequence[str] = (),
        *,
        pattern: str | None = None,
        key: Serde = KEY,
        value: Serde = BYTES,
        timestamp: Callable[[Any], int] | None = None,
        starting_offsets: str = "earliest",
    ) -> None:
        names = (topics,) if isinstance(topics, str) else tuple(topics)
        if bool(names) == bool(pattern):
            raise JobDefinitionError("KafkaSource needs either topics or pattern=, not both")
        if starting_offsets not in _STARTING:
            raise JobDefinitionError(
                f"KafkaSource starting_offsets must be one of {_STARTING}, got "
                f"{starting_offsets!r}")
        for s, what in ((key, "key"), (value, "value")):
            if not isinstance(s, Serde):
                raise JobDefinitionError(f"KafkaSource {what}= must be a Serde, got {s!r}")
        object.__setattr__(self, "topics", names)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "timestamp", timestamp)
        object.__setattr__(self, "starting_offsets", starting_offsets)

    @property
    def subscription(self) -> list[str]:
        """Names as the consumer takes them (a regex starts with ``^``)."""
        if self.pattern is not None:
            return [self.pattern if self.pattern.startswith("^") else "^" + self.pattern]
        return list(self.topics)

    def describe(self) -> str:
        return f"KafkaSource[{self.pattern or ','.join(self.topics)}]"


@dataclass(frozen=True, kw_only=True, init=False)
class KafkaSink(Sink):
    """Records to one topic. The record's key (from the source or ``key_by``) is the Kafka key,
    so one key always lands on one partition, in order. The default key serde (``KEY``)
    writes bytes as they are, a str as UTF-8 and anything else as JSON. Input headers pass
    through unless ``headers=False``; the input timestamp is kept, as Kafka Streams does."""

    topic: str
    key: Serde
    value: Serde
    headers: bool

    def __init__(self, topic: str, *, key: Serde = KEY, value: Serde = BYTES,
                 headers: bool = True) -> None:
        if not topic or not isinstance(topic, str):
            raise JobDefinitionError(f"KafkaSink needs a topic name, got {topic!r}")
        object.__setattr__(self, "topic", topic)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "headers", headers)

    def describe(self) -> str:
        return f"KafkaSink[{self.topic}]"
