"""What the engine needs to know of a job's inputs and outputs, whatever the connector.

A :class:`Source` is partitioned, offset-addressed input: the engine reads its partitions
through the client backend's :class:`~connectors.base.GroupMember` (assignment, offsets,
fetch, seek to the committed offset, commit) and decodes each record with the source's serdes.
A :class:`Sink` is output written through a :class:`~connectors.base.ProducerBackend`, each
record acknowledged by a delivery report (continuous mode counts them per batch; epoch mode
commits them with the epoch's transaction). Kafka is one connector (connectors.kafka); another
implements these descriptions and a backend for its transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from streamcore.core.serde import Serde

__all__ = ["Sink", "Source"]


class Source(ABC):
    """An input: names of its partitioned logs, its serdes, its event time."""

    topics: tuple[str, ...]  # the logs by name (empty when pattern is given)
    pattern: str | None  # a regex over log names, matched as logs appear
    key: Serde
    value: Serde
    # Event time (epoch ms) from the decoded value; None: the record's own timestamp.
    timestamp: Callable[[Any], int] | None
    # Where a partition without a committed offset starts: "earliest" or "latest".
    starting_offsets: str

    @property
    @abstractmethod
    def subscription(self) -> list[str]:
        """The names the group member subscribes to (a regex starts with ``^``)."""

    @abstractmethod
    def describe(self) -> str: ...


class Sink(ABC):
    """An output: one destination log, its serdes, whether input headers pass through."""

    topic: str
    key: Serde
    value: Serde
    headers: bool

    @abstractmethod
    def describe(self) -> str: ...
