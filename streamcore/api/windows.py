"""Event-time windows and the windowed side of the DSL.

A window kind is a frozen description; ``Stream.window(kind)`` gives a
:class:`WindowedStream` whose ``count``/``reduce``/``aggregate`` make a windowed table.
Times are epoch milliseconds; durations accept milliseconds as an ``int`` or text such as
``"10s"``. Windows are half-open ``[start, end)`` (Spark's ``window()``), except sliding
windows, which are Kafka Streams' ``[end - max_difference, end]`` with both ends included.

A window closes for good when the watermark passes ``end + grace``: then ``append`` emits
its final row and its state is deleted; a record whose window has closed is late (dropped,
counted, optionally sent to ``late=``). Each output row is keyed ``(key, start, end)`` and
its value is ``{"window": {"start": s, "end": e}, "count": n}`` for a count, or
``{"window": {...}, "value": aggregate}`` for reduce and aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamcore.core.durations import parse_duration
from streamcore.core.errors import ConfigError, JobDefinitionError
from streamcore.core.serde import JSON, Serde

if TYPE_CHECKING:
    from streamcore.api.stream import Stream, Table

__all__ = ["OUTPUT_MODES", "Hopping", "Session", "Sliding", "Tumbling", "Window",
           "WindowedStream", "duration_ms"]

OUTPUT_MODES = ("append", "update", "complete")


def duration_ms(value: Any, what: str, *, positive: bool = True) -> int:
    """Milliseconds from an int (ms), a timedelta or text ("10s", "500ms")."""
    if hasattr(value, "total_seconds"):
        ms = int(value.total_seconds() * 1000)
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = value
    else:
        try:
            ms = round(parse_duration(value, what) * 1000)
        except ConfigError as exc:
            raise JobDefinitionError(f"{what}: {exc}") from None
    if ms < 0 or (positive and ms == 0):
        raise JobDefinitionError(f"{what} must be {'positive' if positive else '>= 0'}, "
                                 f"got {value!r}")
    return ms


class Window:
    """A window kind. ``grace`` keeps a window open that long after its end, for
    out-of-order records (Kafka Streams' grace period, on top of the watermark's delay)."""

    kind = "window"
    grace_ms: int

    def assign(self, ts: int) -> list[tuple[int, int]]:
        """The (start, end) windows an event at ts falls in (tumbling and hopping)."""
        raise NotImplementedError


@dataclass(frozen=True, init=False)
class Tumbling(Window):
    """Fixed, non-overlapping windows of ``size``: [k*size, (k+1)*size)."""

    size_ms: int
    grace_ms: int
    kind = "tumbling"

    def __init__(self, size: Any, *, grace: Any = 0) -> None:
        object.__setattr__(self, "size_ms", duration_ms(size, "Tumbling size"))
        object.__setattr__(self, "grace_ms", duration_ms(grace, "grace", positive=False))

    def assign(self, ts: int) -> list[tuple[int, int]]:
        start = ts - ts % self.size_ms
        return [(start, start + self.size_ms)]


@dataclass(frozen=True, init=False)
class Hopping(Window):
    """Windows of ``size`` starting every ``slide`` (Spark's sliding ``window(size, slide)``,
    Kafka Streams' hopping windows); an event is in size/slide of them."""

    size_ms: int
    slide_ms: int
    grace_ms: int
    kind = "hopping"

    def __init__(self, size: Any, slide: Any, *, grace: Any = 0) -> None:
        size_ms, slide_ms = duration_ms(size, "Hopping size"), duration_ms(slide, "Hopping slide")
        if slide_ms > size_ms:
            raise JobDefinitionError(f"Hopping slide ({slide_ms} ms) must not exceed the size "
                                     f"({size_ms} ms): records between windows would be lost")
        object.__setattr__(self, "size_ms", size_ms)
        object.__setattr__(self, "slide_ms", slide_ms)
        object.__setattr__(self, "grace_ms", duration_ms(grace, "grace", positive=False))

    def assign(self, ts: int) -> list[tuple[int, int]]:
        last = ts - ts % self.slide_ms  # the latest window start at or before ts
        out = []
        start = last
        while start > ts - self.size_ms:
            out.append((start, start + self.size_ms))
            start -= self.slide_ms
        out.reverse()
        return out


@dataclass(frozen=True, init=False)
class Sliding(Window):
    """Kafka Streams' sliding windows: two records are in a common window when their times
    differ by at most ``max_difference``. The windows are the distinct sets of records
    [t - max_difference, t] that the data defines: one ending at each record and one
    starting just after each record (while it holds records), both ends inclusive."""

    max_difference_ms: int
    grace_ms: int
    kind = "sliding"

    def __init__(self, max_difference: Any, *, grace: Any = 0) -> None:
        object.__setattr__(self, "max_difference_ms",
                           duration_ms(max_difference, "Sliding max_difference"))
        object.__setattr__(self, "grace_ms", duration_ms(grace, "grace", positive=False))


@dataclass(frozen=True, init=False)
class Session(Window):
    """Session windows (Spark's ``session_window``): a record at t opens [t, t + gap);
    windows of a key that overlap merge into one, so a session ends ``gap`` after its last
    record. A record that bridges two sessions merges them (update mode emits the merged
    session and a tombstone for each session it replaced)."""

    gap_ms: int
    grace_ms: int
    kind = "session"

    def __init__(self, gap: Any, *, grace: Any = 0) -> None:
        object.__setattr__(self, "gap_ms", duration_ms(gap, "Session gap"))
        object.__setattr__(self, "grace_ms", duration_ms(grace, "grace", positive=False))


class WindowedStream:
    """A keyed stream grouped into windows; aggregate it with count, reduce or aggregate.
    Each aggregation is a stateful step with a stable ``name=`` (its store and changelog).
    ``late=`` (a KafkaSink) receives the records that arrive after their window closed."""

    def __init__(self, stream: Stream, window: Window) -> None:
        if not isinstance(window, Window):
            raise JobDefinitionError(f"window() takes Tumbling, Hopping, Sliding or Session, "
                                     f"got {window!r}")
        self._stream = stream
        self._window = window

    def count(self, *, name: str | None = None, late: Any = None) -> Table:
        """Records per key and window; the value's field is ``count``."""
        return self._stream._windowed("count", self._window, name, JSON, None, late,
                                      None, None)

    def reduce(self, fn: Callable[[Any, Any], Any], *, name: str | None = None,
               value: Serde = JSON, late: Any = None, on_error: str | None = None) -> Table:
        """fn(accumulated, value) per key and window; the first value starts it."""
        return self._stream._windowed("reduce", self._window, name, value, on_error, late,
                                      fn, None)

    def aggregate(self, initializer: Callable[[], Any], adder: Callable[[Any, Any], Any], *,
                  merge: Callable[[Any, Any], Any] | None = None, name: str | None = None,
                  value: Serde = JSON, late: Any = None,
                  on_error: str | None = None) -> Table:
        """adder(aggregate, value) per key and window, from initializer(). Session windows
        also need ``merge(agg1, agg2)``, for two sessions that a record joins into one."""
        return self._stream._windowed("aggregate", self._window, name, value, on_error, late,
                                      adder, initializer, merger=merge)
