"""The public job API: a :class:`Job` holds streams; a :class:`Stream` is a chain of steps.

A 10-line job::

    job = Job("clean-clicks")
    (job.stream(KafkaSource("clicks", value=JSON))
        .filter(lambda c: c["kind"] == "click")
        .map(lambda c: {**c, "seen": True})
        .key_by(lambda c: c["user"])
        .to(KafkaSink("clean-clicks", key=STR, value=JSON)))

Functions receive the record's value; ``key_by`` sets the key that the sink writes. Nothing
runs until :meth:`Job.start` (a thread-backed :class:`~streamcore.query.StreamingQuery`),
``await job.run()`` (inside your own event loop) or ``streamcore run module:job``.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from connectors.kafka import KafkaSink, KafkaSource
from streamcore.config import WorkerConfig
from streamcore.errors import JobDefinitionError
from streamcore.graph import Node, OpKind

if TYPE_CHECKING:
    from streamcore.query import StreamingQuery

__all__ = ["Job", "Stream"]

_JOB_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
ON_ERROR = ("fail", "skip", "dead_letter")


def _check_policy(policy: str | None) -> None:
    if policy is not None and policy not in ON_ERROR:
        raise JobDefinitionError(f"on_error must be one of {ON_ERROR}, got {policy!r}")


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
        _check_policy(on_error)
        self.name = name
        self.config = config
        self.on_error = on_error
        self._sources: list[Node] = []
        self._nodes: list[Node] = []

    def stream(self, source: KafkaSource) -> Stream:
        """A stream of the records of source."""
        if not isinstance(source, KafkaSource):
            raise JobDefinitionError(f"job.stream() takes a KafkaSource, got {source!r}")
        node = Node(OpKind.SOURCE, source=source)
        self._sources.append(node)
        self._nodes.append(node)
        return Stream(self, node)

    # -- introspection used by the engine ------------------------------------------------
    @property
    def sources(self) -> list[Node]:
        return list(self._sources)

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def _add(self, node: Node) -> Node:
        self._nodes.append(node)
        return node

    def validate(self) -> None:
        """Fail at build time, as Spark does, on a graph that cannot run."""
        if not self._sources:
            raise JobDefinitionError(f"job {self.name!r} has no source: call job.stream(...)")
        if not any(n.terminal for n in self._nodes):
            raise JobDefinitionError(
                f"job {self.name!r} has no output: end a stream with .to(...) or .foreach(...)")
        seen: dict[str, Node] = {}
        for src in self._sources:
            assert src.source is not None
            for name in src.source.subscription:
                if name in seen:
                    raise JobDefinitionError(
                        f"topic {name!r} is read by two sources; read it once and branch")
                seen[name] = src

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}-dlq"

    @property
    def uses_dead_letter(self) -> bool:
        return self.on_error == "dead_letter" or any(
            n.params.get("on_error") == "dead_letter" for n in self._nodes)

    def explain(self) -> str:
        from streamcore.plan import explain

        return explain(self)

    # -- running -------------------------------------------------------------------------
    def start(self, config: WorkerConfig | None = None) -> StreamingQuery:
        """Start a worker on a background thread and return its query handle."""
        from streamcore.query import StreamingQuery

        return StreamingQuery.start(self, config or self.config or WorkerConfig.from_env())

    async def run(self, config: WorkerConfig | None = None) -> None:
        """Run a worker in the current event loop until it is cancelled or fails."""
        from streamcore.engine.worker import Worker

        await Worker(self, config or self.config or WorkerConfig.from_env()).run()


def _check_fn(fn: Any, op: str) -> None:
    if not callable(fn):
        raise JobDefinitionError(f"{op}() needs a function, got {fn!r}")


class Stream:
    """An unbounded sequence of (key, value, timestamp) records. Every method returns a new
    stream; the original stays usable, so one stream can feed several outputs."""

    def __init__(self, job: Job, node: Node) -> None:
        self._job = job
        self._node = node

    def _then(self, kind: str, fn: Callable[..., Any] | None = None, **params: Any) -> Stream:
        if fn is not None:
            _check_fn(fn, kind)
        _check_policy(params.get("on_error"))
        return Stream(self._job, self._job._add(Node(kind, (self._node,), fn, params)))

    # Every step that calls a user function takes on_error= (None: the job's policy).
    def map(self, fn: Callable[[Any], Any], *, on_error: str | None = None) -> Stream:
        """Replace each value by fn(value)."""
        return self._then(OpKind.MAP, fn, on_error=on_error)

    def map_async(self, fn: Callable[[Any], Awaitable[Any]], *, concurrency: int = 16,
                  on_error: str | None = None) -> Stream:
        """Replace each value by ``await fn(value)``, running up to concurrency calls at once
        per partition; results are emitted in input order. A raising call fails the job
        (on_error other than "fail" is not supported here yet)."""
        if not inspect.iscoroutinefunction(fn) and not callable(fn):
            raise JobDefinitionError(f"map_async() needs an async function, got {fn!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise JobDefinitionError(f"map_async concurrency must be >= 1, got {concurrency!r}")
        if on_error not in (None, "fail"):
            raise JobDefinitionError("map_async supports only on_error='fail' for now")
        return self._then(OpKind.MAP_ASYNC, fn, concurrency=concurrency)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], *,
                 on_error: str | None = None) -> Stream:
        """Replace each value by zero or more values."""
        return self._then(OpKind.FLAT_MAP, fn, on_error=on_error)

    def filter(self, fn: Callable[[Any], bool], *, on_error: str | None = None) -> Stream:
        """Keep the records whose value satisfies fn."""
        return self._then(OpKind.FILTER, fn, on_error=on_error)

    def peek(self, fn: Callable[[Any], None], *, on_error: str | None = None) -> Stream:
        """Call fn(value) for its side effect and pass the record on unchanged."""
        return self._then(OpKind.PEEK, fn, on_error=on_error)

    def key_by(self, fn: Callable[[Any], Any], *, on_error: str | None = None) -> Stream:
        """Set each record's key to fn(value)."""
        return self._then(OpKind.KEY_BY, fn, on_error=on_error)

    def with_timestamps(self, fn: Callable[[Any], int], *,
                        on_error: str | None = None) -> Stream:
        """Set each record's event time (epoch milliseconds) to fn(value)."""
        return self._then(OpKind.WITH_TIMESTAMPS, fn, on_error=on_error)

    def union(self, *others: Stream) -> Stream:
        """The records of this stream and of others, interleaved as they arrive."""
        for o in others:
            if not isinstance(o, Stream) or o._job is not self._job:
                raise JobDefinitionError("union() takes streams of the same job")
        parents = (self._node, *(o._node for o in others))
        return Stream(self._job, self._job._add(Node(OpKind.UNION, parents)))

    def branch(self, *predicates: Callable[[Any], bool]) -> tuple[Stream, ...]:
        """One stream per predicate; each record goes to the first whose predicate holds and
        is dropped if none does (Kafka Streams' semantics). Use ``lambda v: True`` last for a
        default branch."""
        if not predicates:
            raise JobDefinitionError("branch() needs at least one predicate")
        for p in predicates:
            _check_fn(p, "branch")
        hub = self._job._add(Node(OpKind.BRANCH, (self._node,), None,
                                  {"preds": tuple(predicates)}))
        return tuple(
            Stream(self._job, self._job._add(Node(OpKind.BRANCH, (hub,), None, {"index": i})))
            for i in range(len(predicates)))

    def to(self, sink: KafkaSink) -> None:
        """Write every record to sink."""
        if not isinstance(sink, KafkaSink):
            raise JobDefinitionError(f"to() takes a KafkaSink, got {sink!r}")
        self._job._add(Node(OpKind.TO, (self._node,), sink=sink))

    def foreach(self, fn: Callable[[Any], None], *, on_error: str | None = None) -> None:
        """Call fn(value) for every record (at least once). An async fn is awaited in order."""
        _check_fn(fn, "foreach")
        if asyncio.iscoroutinefunction(fn):
            self.map_async(fn, concurrency=1, on_error=on_error)._then(OpKind.FOREACH, _discard)
        else:
            self._then(OpKind.FOREACH, fn, on_error=on_error)


def _discard(_value: Any) -> None:
    return None
