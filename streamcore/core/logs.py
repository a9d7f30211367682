"""Logging set-up: JSON lines when stderr is not a terminal, readable lines when it is."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["BurstFilter", "BurstLogger", "configure", "librdkafka_logger", "redact"]

_SECRET_WORDS = ("password", "secret", "token", "sasl.jaas", "key.pem", "keystore",
                 "private", "credential")


def redact(settings: Any) -> Any:
    """A copy of a (nested) settings mapping with secret-looking values masked, for logs."""
    if isinstance(settings, dict):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v))
                for k, v in settings.items()}
    return settings


class BurstLogger:
    """Logs the first occurrence of each kind of event, then at most one line per window
    with the count of what was suppressed: a broker outage gives a few lines, not thousands."""

    def __init__(self, logger: logging.Logger, window: float = 30.0) -> None:
        self._log = logger
        self._window = window
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        since, suppressed = self._seen.get(kind, (0.0, 0))
        if now - since < self._window:
            self._seen[kind] = (since, suppressed + 1)
            return
        if suppressed:
            msg += f" ({suppressed} more like it in the last {self._window:.0f}s)"
        self._seen[kind] = (now, 0)
        self._log.warning(msg, *args)


class BurstFilter(logging.Filter):
    """BurstLogger's rule for records logged by others (librdkafka): per kind (its facility,
    e.g. FAIL), the first record, then at most one per window carrying the count suppressed."""

    def __init__(self, window: float = 30.0) -> None:
        super().__init__()
        self._window = window
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        kind = f"{record.levelno}:{args[0] if args else str(record.msg)[:40]}"
        now = time.monotonic()
        since, suppressed = self._seen.get(kind, (0.0, 0))
        if now - since < self._window:
            self._seen[kind] = (since, suppressed + 1)
            return False
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like it in the last " \
                         f"{self._window:.0f}s)"
        self._seen[kind] = (now, 0)
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger every Kafka client of ours gets as its ``logger`` setting: librdkafka's own
    lines go through our handlers (JSON in production), rate-limited, instead of raw
    ``%3|...|FAIL|`` lines on stderr."""
    lg = logging.getLogger("streamcore.librdkafka")
    if not any(isinstance(f, BurstFilter) for f in lg.filters):
        lg.addFilter(BurstFilter())
    return lg


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if hasattr(record, "progress"):
            out["progress"] = record.progress
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    """Configure the root logger once for a worker process (the CLI calls this)."""
    handler = logging.StreamHandler(sys.stderr)
    if json is None:
        json = not sys.stderr.isatty()
    handler.setFormatter(_JsonFormatter() if json else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
