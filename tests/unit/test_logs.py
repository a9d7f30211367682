"""librdkafka's own log lines go through our logger, rate-limited, never raw to stderr."""

from __future__ import annotations

import logging
import time

import pytest

from connectors.confluent import ConfluentProducer, producer_settings


def test_librdkafka_lines_go_through_the_logger_once_per_burst(
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="streamcore.librdkafka")
    p = ConfluentProducer(producer_settings("127.0.0.1:1", {}, {}))  # nothing listens there
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:  # librdkafka retries the connection many times
            p.poll(0.1)
    finally:
        p.close()
    fails = [r for r in caplog.records
             if r.name == "streamcore.librdkafka" and "Connection refused" in r.getMessage()]
    assert len(fails) == 1, [r.getMessage() for r in fails]
    assert "|FAIL|" not in capfd.readouterr().err, "raw librdkafka lines on stderr"
