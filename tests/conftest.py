"""Session fixtures: one local broker for the whole suite (unless STREAMCORE_TEST_BOOTSTRAP
points at a real Kafka)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("STREAMCORE_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from streamcore import broker

    run_dir: Path = tmp_path_factory.mktemp("broker")
    info = broker.start(run_dir)
    try:
        yield info.bootstrap
    finally:
        broker.stop(run_dir)
