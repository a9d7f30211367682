"""Every Kafka client we create (engine, connectors, bench, examples, tests) sends librdkafka's
own log lines through a Python logger, so that they are JSON and rate-limited instead of raw
`%3|...|FAIL|` lines on stderr when a broker goes away before its clients."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
CLIENTS = {"Producer", "Consumer", "AdminClient"}


def test_every_client_created_from_a_literal_configuration_has_a_logger() -> None:
    missing = []
    for package in ("streamcore", "connectors", "statestore", "metrics", "bench", "examples",
                    "tests"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in CLIENTS and node.args
                        and isinstance(node.args[0], ast.Dict)):
                    continue
                keys = {k.value for k in node.args[0].keys if isinstance(k, ast.Constant)}
                if "logger" not in keys:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, f"clients without a logger: {missing}"


class _Err:
    def __init__(self, code: str, fatal: bool) -> None:
        self._code, self._fatal = code, fatal

    def code(self) -> str:
        return self._code

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return f"error {self._code}"


def test_a_consumer_error_is_fatal_or_logged_once_per_burst(caplog: Any) -> None:
    """The fetch loop and the membership thread report a consumer's errors alike: a fatal
    one stops the worker, the others are logged once per burst and code."""
    import logging

    import pytest

    from connectors.base import report_consumer_error
    from streamcore.core.errors import FatalError
    from streamcore.core.logs import BurstLogger

    burst = BurstLogger(logging.getLogger("t.consumer"), window=60)
    with pytest.raises(FatalError, match="consumer failed: error FENCED"):
        report_consumer_error(_Err("FENCED", fatal=True), burst)
    with caplog.at_level(logging.WARNING, logger="t.consumer"):
        for _ in range(3):
            report_consumer_error(_Err("TRANSPORT", fatal=False), burst)
        report_consumer_error(_Err("TIMED_OUT", fatal=False), burst)
        report_consumer_error("a plain code", burst)  # no code() or fatal(): a warning
    assert [r.getMessage() for r in caplog.records] == [
        "consumer: error TRANSPORT", "consumer: error TIMED_OUT", "consumer: a plain code"]
