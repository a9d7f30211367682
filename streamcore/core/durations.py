"""Durations in configuration: seconds, or a number with a unit ("100ms", "10s", "1m")."""

from __future__ import annotations

import re

from streamcore.core.errors import ConfigError

__all__ = ["parse_duration"]

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: float | int | str, field_name: str) -> float:
    """Seconds from 1.5, "100ms", "10s", "1m" or "2h"; ConfigError naming field_name if not."""
    if isinstance(value, bool):
        raise ConfigError(field_name, f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(field_name, f"{value!r} is not a duration like 100ms, 10s or 1m")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds < 0:
        raise ConfigError(field_name, f"must not be negative, got {value!r}")
    return seconds
