"""The stateful steps' update functions.

A Table (streamcore.api.stream) is a changelog stream with a store behind it: the latest value
per key. An aggregation of a stream (``count``, ``reduce``, ``aggregate``, ``count_by_value``,
``update_state_by_key``) is one ``AGGREGATE`` node whose ``update(old_state, value)`` returns
the new state (None deletes the key); the helpers below turn the user's functions into that
shape. Its store is one per partition, restored from the step's changelog topic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["aggregate_update", "count_update", "reduce_update", "update_state_update"]

Update = Callable[[Any, Any], Any]


def reduce_update(fn: Callable[[Any, Any], Any]) -> Update:
    def update(old: Any, value: Any) -> Any:
        return value if old is None else fn(old, value)
    update.__name__ = getattr(fn, "__name__", "reduce")
    return update


def aggregate_update(initializer: Callable[[], Any], adder: Callable[[Any, Any], Any]) -> Update:
    def update(old: Any, value: Any) -> Any:
        return adder(initializer() if old is None else old, value)
    update.__name__ = getattr(adder, "__name__", "aggregate")
    return update


def count_update(old: Any, value: Any) -> int:
    return 1 if old is None else int(old) + 1


def update_state_update(fn: Callable[[list[Any], Any], Any]) -> Update:
    # Spark's updateStateByKey(new_values, old_state). In continuous mode each record is its
    # own micro-batch, so new_values holds one value.
    def update(old: Any, value: Any) -> Any:
        return fn([value], old)
    update.__name__ = getattr(fn, "__name__", "update_state_by_key")
    return update
