"""Serdes turn record keys and values into bytes and back.

A serde is two plain functions. ``None`` always maps to ``None`` (a null key, or a tombstone
value), so a serde never sees it. Serdes raise on bad input; the engine turns that into a
:class:`~streamcore.core.errors.DeserializationError` carrying the record's position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["BYTES", "INTERNAL_KEY", "INTERNAL_VALUE", "JSON", "KEY", "STR", "Serde"]


@dataclass(frozen=True, slots=True)
class Serde:
    """A named pair of functions: ``serialize(obj) -> bytes`` and ``deserialize(bytes) -> obj``.

    User-defined serdes are plain instances: ``Serde("csv", dumps, loads)``.
    """

    name: str
    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]

    def __repr__(self) -> str:
        return f"Serde({self.name})"


def _identity(b: Any) -> Any:
    return b


def _to_bytes(b: Any) -> bytes:
    if isinstance(b, bytes | bytearray | memoryview):
        return bytes(b)
    raise TypeError(f"the BYTES serde needs bytes, got {type(b).__name__}")


def _str_ser(s: Any) -> bytes:
    return str(s).encode()


def _str_de(b: bytes) -> str:
    return b.decode()


JSON = Serde("json", orjson.dumps, orjson.loads)
STR = Serde("str", _str_ser, _str_de)
BYTES = Serde("bytes", _to_bytes, _identity)


def _bytes_as_text(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "backslashreplace")
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def _key_ser(k: Any) -> bytes:
    if isinstance(k, bytes | bytearray | memoryview):
        return bytes(k)
    if isinstance(k, str):
        return k.encode()
    return orjson.dumps(k, default=_bytes_as_text)


# The default key serde of sources and sinks: keys are usually strings (key_by(lambda v:
# v["user"])), sometimes bytes, ints or tuples. Out: bytes as they are, str as UTF-8,
# anything else as JSON, bytes inside it as UTF-8 text (a window's (key, start, end) over
# a source's raw key); None is no key, as always. In: the bytes as they are.
KEY = Serde("key", _key_ser, _identity)


# The serdes of internal topics (repartition) and of state keys. Bytes travel as themselves
# behind a 0x00 tag (no JSON text starts with it); anything else as JSON. Keys read arrays
# back as tuples, so that a composite key stays hashable after a repartition.
def _internal_ser(obj: Any) -> bytes:
    if type(obj) is bytes:
        return b"\x00" + obj
    return orjson.dumps(obj)


def _tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    return obj


def _internal_key_de(b: bytes) -> Any:
    if b[:1] == b"\x00":
        return bytes(b[1:])
    return _tuples(orjson.loads(b))


def _internal_value_de(b: bytes) -> Any:
    if b[:1] == b"\x00":
        return bytes(b[1:])
    return orjson.loads(b)


INTERNAL_KEY = Serde("internal-key", _internal_ser, _internal_key_de)
INTERNAL_VALUE = Serde("internal-value", _internal_ser, _internal_value_de)
