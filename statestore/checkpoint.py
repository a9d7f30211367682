"""The checkpoint file beside a store: the changelog offset the store reflects.

``{store_dir}.checkpoint`` holds ``{"topic": ..., "partition": ..., "offset": N}``: every
changelog record before offset N is in the store, so a restore starts at N. It is replaced
atomically (write a temporary file, fsync, rename), so a crash leaves the old or the new one,
never half of one. A file that is missing, unreadable or for another changelog reads as
None: the store is then rebuilt from the start of its changelog.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_checkpoint", "remove_checkpoint", "replace_file", "write_checkpoint"]


def _file(store_dir: Path) -> Path:
    return store_dir.with_name(store_dir.name + ".checkpoint")


def read_checkpoint(store_dir: Path, topic: str, partition: int) -> int | None:
    try:
        data = json.loads(_file(store_dir).read_text())
        if data["topic"] != topic or data["partition"] != partition:
            return None
        offset = data["offset"]
        return offset if isinstance(offset, int) and offset >= 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_checkpoint(store_dir: Path, topic: str, partition: int, offset: int) -> None:
    replace_file(_file(store_dir), json.dumps(
        {"topic": topic, "partition": partition, "offset": offset}).encode())


def replace_file(target: Path, data: bytes) -> None:
    """Replace target with data durably and atomically: write a temporary file, fsync,
    rename, fsync the directory. A crash leaves the old contents or the new, never half."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    # The rename is durable only once the directory is synced.
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(store_dir: Path) -> None:
    _file(store_dir).unlink(missing_ok=True)
