"""Session fixtures: one local broker for the whole suite (unless STREAMCORE_TEST_BOOTSTRAP
points at a real Kafka)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamcore.broker import BrokerInfo


@pytest.fixture(scope="session")
def local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerInfo | None]:
    """The suite's local broker process (None when the tests run against a real Kafka)."""
    if os.environ.get("STREAMCORE_TEST_BOOTSTRAP"):
        yield None
        return
    from streamcore import broker

    run_dir: Path = tmp_path_factory.mktemp("broker")
    info = broker.start(run_dir)
    try:
        yield info
    finally:
        broker.stop(run_dir)


@pytest.fixture(scope="session")
def bootstrap(local_broker: BrokerInfo | None) -> str:
    external = os.environ.get("STREAMCORE_TEST_BOOTSTRAP")
    if external:
        return external
    assert local_broker is not None
    return local_broker.bootstrap


@pytest.fixture
def broker_pid(local_broker: BrokerInfo | None) -> int:
    """The local broker's pid, for fault tests that pause it (SIGSTOP/SIGCONT)."""
    if local_broker is None:
        pytest.skip("the fault tests pause the local broker; STREAMCORE_TEST_BOOTSTRAP is set")
    return local_broker.pid
