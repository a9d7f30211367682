"""GroupState: what ``map_groups_with_state`` gives the user's function for one key.

As Spark's ``GroupState``: ``get``/``exists``/``update``/``remove`` the key's state, ask for
a timeout with ``set_timeout_duration`` (processing time) or ``set_timeout_timestamp``
(event time), and learn with ``has_timed_out`` that the call is a timeout (values is then
empty). A timeout holds for one call: every call (new data or a timeout) clears it, so a
function that wants one again sets it again, as in Spark.
"""

from __future__ import annotations

from typing import Any

from streamcore.core.errors import JobDefinitionError

__all__ = ["GROUP_TIMEOUTS", "GroupState"]

GROUP_TIMEOUTS = ("none", "processing_time", "event_time")
_UNSET = object()


class GroupState:
    """One key's state during one call of the function."""

    __slots__ = ("_exists", "_now_ms", "_removed", "_timed_out", "_timeout", "_timeout_at",
                 "_updated", "_value", "_watermark")

    def __init__(self, value: Any, *, timeout: str, timed_out: bool, now_ms: int,
                 watermark_ms: int | None) -> None:
        self._value = value
        self._exists = value is not None
        self._timeout = timeout
        self._timed_out = timed_out
        self._now_ms = now_ms
        self._watermark = watermark_ms
        self._timeout_at: int | None = None
        self._updated = False
        self._removed = False

    def get(self) -> Any:
        """The state (None if there is none: see exists)."""
        return self._value if self._exists else None

    @property
    def exists(self) -> bool:
        return self._exists

    def update(self, value: Any) -> None:
        if value is None:
            raise JobDefinitionError("GroupState.update(None): use remove() to delete state")
        self._value, self._exists, self._updated, self._removed = value, True, True, False

    def remove(self) -> None:
        self._value, self._exists, self._removed, self._updated = None, False, True, False

    @property
    def has_timed_out(self) -> bool:
        return self._timed_out

    def set_timeout_duration(self, duration_ms: int) -> None:
        """Call again after duration_ms of processing time without data for the key."""
        if self._timeout != "processing_time":
            raise JobDefinitionError("set_timeout_duration needs timeout='processing_time'")
        if not isinstance(duration_ms, int) or duration_ms <= 0:
            raise JobDefinitionError(f"timeout duration must be a positive int (ms), got "
                                     f"{duration_ms!r}")
        self._timeout_at = self._now_ms + duration_ms

    def set_timeout_timestamp(self, timestamp_ms: int) -> None:
        """Call again once the watermark passes timestamp_ms (without data for the key)."""
        if self._timeout != "event_time":
            raise JobDefinitionError("set_timeout_timestamp needs timeout='event_time'")
        if self._watermark is not None and timestamp_ms <= self._watermark:
            raise JobDefinitionError(f"timeout timestamp {timestamp_ms} is not after the "
                                     f"current watermark {self._watermark} (as Spark refuses)")
        self._timeout_at = int(timestamp_ms)

    def current_watermark_ms(self) -> int:
        """The watermark (0 before there is one, as Spark)."""
        return self._watermark if self._watermark is not None else 0

    def current_processing_time_ms(self) -> int:
        return self._now_ms

    def __repr__(self) -> str:
        return f"GroupState({self.get()!r}, timed_out={self._timed_out})"
