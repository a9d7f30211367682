"""The public job API: a :class:`Job` holds streams; a :class:`Stream` is a chain of steps.

A 10-line job::

    job = Job("clean-clicks")
    (job.stream(KafkaSource("clicks", value=JSON))
        .filter(lambda c: c["kind"] == "click")
        .map(lambda c: {**c, "seen": True})
        .key_by(lambda c: c["user"])
        .to(KafkaSink("clean-clicks", key=STR, value=JSON)))

Functions receive the record's value; ``key_by`` sets the key that the sink writes. Nothing
runs until :meth:`Job.start` (a thread-backed :class:`~streamcore.api.query.StreamingQuery`),
``await job.run()`` (inside your own event loop) or ``streamcore run module:job``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from connectors.kafka import KafkaSource
from streamcore.api.config import WorkerConfig
from streamcore.api.stream import STEP_NAME, Stream, Table, check_policy
from streamcore.core.errors import JobDefinitionError
from streamcore.core.serde import JSON, STR, Serde
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.logical import LogicalPlan, dlq_topic
from streamcore.plan.physical import internal_topic, plan

if TYPE_CHECKING:
    from streamcore.api.query import StreamingQuery

__all__ = ["Job", "Stream"]

_JOB_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class Job:
    """A named stream-processing job. The name is the default consumer group and prefixes
    every internal topic, so keep it stable across deployments."""

    def __init__(self, name: str, *, config: WorkerConfig | None = None,
                 on_error: str = "fail") -> None:
        """``on_error`` is what happens to a record that cannot be decoded or whose function
        raises: ``fail`` (stop without committing it), ``skip`` (count, log, go on) or
        ``dead_letter`` (write its original bytes to ``{name}-dlq`` with the reason in
        headers, go on). Steps can override it with their own ``on_error=``."""
        if not isinstance(name, str) or not _JOB_NAME.match(name):
            raise JobDefinitionError(
                f"job name {name!r} must be 1-200 characters of letters, digits, '.', '_', '-'"
                " (it names the consumer group and internal topics)")
        check_policy(on_error)
        self.name = name
        self.config = config
        self.on_error = on_error
        self._sources: list[Node] = []
        self._nodes: list[Node] = []
        self._names: dict[str, Node] = {}  # stable names of stateful and internal steps

    def stream(self, source: KafkaSource) -> Stream:
        """A stream of the records of source."""
        if not isinstance(source, KafkaSource):
            raise JobDefinitionError(f"job.stream() takes a KafkaSource, got {source!r}")
        node = Node(OpKind.SOURCE, source=source)
        self._sources.append(node)
        self._nodes.append(node)
        return Stream(self, node)

    def table(self, topic: str, *, key: Serde = STR, value: Serde = JSON,
              name: str | None = None) -> Table:
        """The table held by a compacted topic: the latest value per key (a null value
        deletes the key). Every worker keeps the whole table in a local store, restored from
        the topic itself and kept up to date while the job runs, so streams of any
        partitioning can join it. ``name`` (default: the topic) names its store."""
        if not isinstance(topic, str) or not topic:
            raise JobDefinitionError(f"job.table() needs a topic name, got {topic!r}")
        node = Node(OpKind.TABLE, params={"name": name or topic, "topic": topic, "key": key,
                                          "value": value})
        self._register(node)
        self._nodes.append(node)
        return Table(self, node)

    def _register(self, node: Node) -> None:
        self._check_name(node.params.get("op", node.kind), node.name)
        assert node.name is not None
        self._names[node.name] = node

    def _check_name(self, op: str, name: str | None) -> None:
        if name is None:
            raise JobDefinitionError(
                f"{op} needs a stable name=: it names the step's store and internal "
                "topics, which must survive redeployments")
        if not STEP_NAME.match(name):
            raise JobDefinitionError(
                f"step name {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
        if name in self._names:
            raise JobDefinitionError(f"step name {name!r} is used twice in job {self.name!r}")

    def internal_topic(self, name: str, suffix: str, app_id: str | None = None) -> str:
        """``{app_id}-{name}-{suffix}``. The application id is the consumer group (default:
        the job name), as in Kafka Streams: two groups running one job must never share a
        repartition or changelog topic, or each would read the other's records."""
        return internal_topic(app_id or self.name, name, suffix)

    def _add(self, node: Node) -> Node:
        self._nodes.append(node)
        return node

    def build(self) -> LogicalPlan:
        """The job as declared, validated and frozen: what every later layer reads. Fails,
        as Spark does, on a graph that cannot run."""
        return LogicalPlan(self.name, tuple(self._nodes), tuple(self._sources), self.on_error,
                           self.config)

    def validate(self) -> None:
        """Fail at build time on a graph that cannot run (see build)."""
        self.build()

    @property
    def dlq_topic(self) -> str:
        """Where records that failed under on_error="dead_letter" go."""
        return dlq_topic(self.name)

    def explain(self) -> str:
        """The physical plan as text: sub-topologies, steps, stores, internal topics."""
        return plan(self.build()).explain()

    # -- running -------------------------------------------------------------------------
    def start(self, config: WorkerConfig | None = None) -> StreamingQuery:
        """Start a worker on a background thread and return its query handle."""
        from streamcore.api.query import StreamingQuery

        return StreamingQuery.start(self, config or self.config or WorkerConfig.from_env())

    async def run(self, config: WorkerConfig | None = None) -> None:
        """Run a worker in the current event loop until it is cancelled or fails."""
        from streamcore.runtime.worker import Worker

        await Worker(self, config or self.config or WorkerConfig.from_env()).run()
