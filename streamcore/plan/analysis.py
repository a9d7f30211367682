"""Build-time checks of event time and output modes, as Spark's analyser
(UnsupportedOperationChecker) makes them: a job that cannot give the results it asks for
fails when it is built, with the reason, not when its first window closes."""

from __future__ import annotations

from collections.abc import Iterable

from streamcore.core.errors import JobDefinitionError
from streamcore.plan.graph import Node, OpKind, upstream

__all__ = ["check_event_time", "has_watermark", "is_windowed"]

_WINDOWED = ("window_count", "window_reduce", "window_aggregate", "reduce_by_key_and_window")


def is_windowed(node: Node) -> bool:
    return node.kind == OpKind.AGGREGATE and node.params.get("op") in _WINDOWED


def has_watermark(node: Node) -> bool:
    """A with_watermark step is upstream of node (through any parent)."""
    return any(n.kind == OpKind.WITH_WATERMARK for n in upstream(node))


def check_event_time(nodes: Iterable[Node]) -> None:
    for n in nodes:
        if n.kind == OpKind.EMIT and n.params["mode"] != "late":
            _check_mode(n.params["mode"], n.parents[0])
        elif n.kind == OpKind.AGGREGATE:
            op = n.params.get("op")
            if op == "reduce_by_key_and_window" and not has_watermark(n):
                raise JobDefinitionError(
                    f"reduce_by_key_and_window {n.name!r} emits each window when the watermark "
                    "passes its end: add .with_watermark(delay) before it")
            if n.params.get("timeout") == "event_time" and not has_watermark(n):
                raise JobDefinitionError(
                    f"{op} {n.name!r}: an event-time timeout needs a watermark (as Spark: "
                    "'Watermark must be specified ... for using event-time timeout'); add "
                    ".with_watermark(delay) before it")


def _check_mode(mode: str, table: Node) -> None:
    name, op = table.name, table.params.get("op")
    if mode == "append":
        if not is_windowed(table):
            raise JobDefinitionError(
                f"append output mode is not supported for the aggregation {op} {name!r}: "
                "without an event-time window its rows never become final (Spark: 'Append "
                "output mode not supported when there are streaming aggregations ... "
                "without watermark'); use output_mode='update' or aggregate over .window()")
        if not has_watermark(table):
            raise JobDefinitionError(
                f"append output mode on {op} {name!r} needs a watermark: a window is emitted "
                "once the watermark passes its end, and without .with_watermark(delay) it "
                "never does (Spark: 'Append output mode not supported when there are "
                "streaming aggregations on streaming DataFrames/DataSets without watermark')")
        if op == "reduce_by_key_and_window":
            return
    if mode == "complete" and table.params.get("op") == "reduce_by_key_and_window":
        raise JobDefinitionError(f"complete output mode does not apply to "
                                 f"reduce_by_key_and_window {name!r}: it emits each window "
                                 "once; use append")
