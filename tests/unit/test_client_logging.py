"""Every Kafka client we create (engine, connectors, bench, examples, tests) sends librdkafka's
own log lines through a Python logger, so that they are JSON and rate-limited instead of raw
`%3|...|FAIL|` lines on stderr when a broker goes away before its clients."""

from __future__ import annotations

import ast
from pathlib import Path

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
