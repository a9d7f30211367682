"""What the test jobs share: the consumer settings they take from the environment."""

import os


def consumer(fixed: dict[str, object] | None = None) -> dict[str, object]:
    """fixed, plus session.timeout.ms from SESSION_TIMEOUT_MS when it is set (the tests'
    WorkerProcess sets 2000, tests/helpers.py; unset, streamcore's default, 6000, applies)."""
    out = dict(fixed or {})
    session = os.environ.get("SESSION_TIMEOUT_MS")
    if session:
        out["session.timeout.ms"] = int(session)
    return out
