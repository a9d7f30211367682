"""Triggers, as in Spark Structured Streaming: when a query processes and commits.

* :func:`continuous` (the default): every record as it arrives; offsets committed every
  ``commit_interval`` once everything derived from them is acknowledged (at-least-once).
* :func:`processing_time` (``"100ms"`` by default): epochs. The records of an epoch, their
  outputs, their state changes and their input offsets are committed in one Kafka
  transaction when the interval has passed (exactly-once for Kafka-to-Kafka jobs).
* :func:`once`: one epoch over the records available at start, then stop. A job with a
  repartition needs more: what an epoch writes to a repartition topic is read by the next,
  so epochs follow until one finds nothing to commit.
* :func:`available_now`: every record available at start, in epochs of at most
  ``WorkerConfig.max_epoch_records`` records, then stop (the same way).

"Available at start" is what the worker can read until a fetch brings nothing new for
``Trigger.quiet`` (1 s): the local broker under-reports end offsets (DESIGN.md section 9),
so a quiet read is the end that works on every broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamcore.core.durations import parse_duration
from streamcore.core.errors import ConfigError

__all__ = ["Trigger", "available_now", "continuous", "once", "parse_trigger",
           "processing_time"]

_KINDS = ("continuous", "processing_time", "once", "available_now")


@dataclass(frozen=True, kw_only=True)
class Trigger:
    kind: str
    interval_s: float = 0.1  # processing_time's epoch interval
    quiet: float = 1.0  # once / available_now: no new record for this long is the end

    @property
    def epochs(self) -> bool:
        """Epoch mode (transactions), as opposed to continuous mode."""
        return self.kind != "continuous"

    @property
    def stops(self) -> bool:
        """The query stops by itself once what was available is processed."""
        return self.kind in ("once", "available_now")

    def describe(self) -> str:
        if self.kind == "processing_time":
            return f"processing_time({self.interval_s * 1000:g}ms)"
        return self.kind


def continuous() -> Trigger:
    return Trigger(kind="continuous")


def processing_time(interval: float | str = "100ms") -> Trigger:
    seconds = parse_duration(interval, "trigger")
    if seconds <= 0:
        raise ConfigError("trigger", f"the epoch interval must be positive, got {interval!r}")
    return Trigger(kind="processing_time", interval_s=seconds)


def once() -> Trigger:
    return Trigger(kind="once")


def available_now() -> Trigger:
    return Trigger(kind="available_now")


def parse_trigger(value: Trigger | str) -> Trigger:
    """A Trigger from itself or from "continuous", "once", "available_now", "epoch" (100 ms)
    or an interval ("100ms", "1s": processing time)."""
    if isinstance(value, Trigger):
        if value.kind not in _KINDS:
            raise ConfigError("trigger", f"unknown trigger kind {value.kind!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError("trigger", f"expected a Trigger or a string, got {value!r}")
    text = value.strip().lower().replace("-", "_")
    if text == "continuous":
        return continuous()
    if text == "once":
        return once()
    if text == "available_now":
        return available_now()
    if text in ("epoch", "processing_time"):
        return processing_time()
    try:
        return processing_time(text)
    except ConfigError:
        raise ConfigError("trigger", f"{value!r} is not continuous, once, available_now or "
                          "an epoch interval like 100ms") from None
