"""The ``streamcore`` command: run a job, manage the local broker.

    streamcore run examples/clicks.py:job --bootstrap kafka:9092
    streamcore broker start|stop|status
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamcore import broker as local_broker
from streamcore.api.config import CLIENTS, PRESETS, WorkerConfig, unknown_env
from streamcore.core.errors import (
    BrokerUnavailable,
    ConfigError,
    JobDefinitionError,
    StreamcoreError,
)

__all__ = ["load_job", "main"]

log = logging.getLogger("streamcore.cli")

# Our top-level packages have generic names; a user's metrics.py must not replace them.
_OWN_PACKAGES = ("connectors", "streamcore")


def _check_own_packages() -> None:
    home = Path(__file__).resolve().parent.parent
    for name in _OWN_PACKAGES:
        mod = sys.modules.get(name) or importlib.import_module(name)
        where = Path(getattr(mod, "__file__", "") or "").resolve()
        if home not in where.parents:
            raise StreamcoreError(
                f"package {name!r} resolves to {where}, outside the streamcore installation "
                f"({home}); rename your module {name!r} so that it does not shadow ours")


def load_job(ref: str) -> Any:
    """Load ``path/to/file.py:attr`` or ``package.module:attr`` (attr defaults to ``job``)."""
    from streamcore.api.job import Job

    target, _, attr = ref.partition(":")
    attr = attr or "job"
    if target.endswith(".py") or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ConfigError("job", f"no such file: {target}")
        # Appended, never prepended: the job's folder must not shadow installed packages.
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        spec = importlib.util.spec_from_file_location(f"_streamcore_job_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        _import(ref, lambda: spec.loader.exec_module(module))  # type: ignore[union-attr]
    else:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        module = _import(ref, lambda: importlib.import_module(target))
    _check_own_packages()
    if not hasattr(module, attr):
        jobs = sorted(n for n, v in vars(module).items() if isinstance(v, Job))
        raise ConfigError("job", f"{ref}: the module has no attribute {attr!r}"
                          + (f" (its jobs: {', '.join(jobs)})" if jobs else ""))
    job = getattr(module, attr)
    if not isinstance(job, Job):
        raise ConfigError("job", f"{ref}: {attr!r} is a {type(job).__name__}, not a "
                          "streamcore Job")
    return job


def _import(ref: str, load: Callable[[], Any]) -> Any:
    """Run the job module; any error in it is a configuration error in one line (exit 2)."""
    try:
        return load()
    except StreamcoreError:
        raise
    except Exception as exc:
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        raise ConfigError("job", f"cannot import {ref}: {type(exc).__name__}: {exc}{where}"
                          ) from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamcore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job until SIGTERM/SIGINT")
    run.add_argument("job", help="path/to/job.py:job or package.module:job")
    run.add_argument("--bootstrap", help="Kafka bootstrap servers "
                     "(env STREAMCORE_BOOTSTRAP_SERVERS)")
    run.add_argument("--group", help="consumer group (default: the job name)")
    run.add_argument("--mode", choices=("continuous", "epoch"),
                     help="continuous (at-least-once, default) or epoch (exactly-once "
                          "transactions per epoch; env STREAMCORE_TRIGGER)")
    run.add_argument("--trigger", help="epoch mode's trigger: an interval (100ms, the "
                                       "default), once or available_now")
    run.add_argument("--client", choices=CLIENTS,
                     help="Kafka client library (default confluent-kafka; env STREAMCORE_CLIENT)")
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    run.add_argument("--commit-interval", help="e.g. 100ms")
    run.add_argument("--progress-interval", help="e.g. 10s")
    run.add_argument("--startup-timeout",
                     help="give up (exit 3) if Kafka cannot be reached within this (default 30s)")
    run.add_argument("--http-port", type=int,
                     help="port for /metrics /healthz /readyz /progress (default 9108, 0: any)")
    run.add_argument("--http-host", help="address to bind the HTTP endpoints (default 0.0.0.0)")
    run.add_argument("--no-http", action="store_true", help="serve no HTTP endpoints")
    run.add_argument("--state-dir", help="directory of the state stores (default ./state)")
    run.add_argument("--state-backend", help="rocksdb (default) or memory")
    run.add_argument("--preset", choices=sorted(PRESETS),
                     help="a named preset over the job's config (env STREAMCORE_PRESET)")
    run.add_argument("-X", dest="kafka", action="append", default=[], metavar="KEY=VALUE",
                     help="a librdkafka setting for both clients (repeatable)")
    br = sub.add_parser("broker", help="the local development broker (Tansu)")
    br.add_argument("action", choices=("start", "stop", "status"))
    br.add_argument("--port", type=int)
    br.add_argument("--dir", help="run directory for pid, port and log "
                    "(default: $XDG_STATE_HOME/streamcore/broker, per user)")
    return p


def _config(args: argparse.Namespace, job: Any) -> WorkerConfig:
    cli: dict[str, Any] = {}
    if args.bootstrap:
        cli["bootstrap_servers"] = args.bootstrap
    if args.group:
        cli["group"] = args.group
    if args.client:
        cli["client"] = args.client
    if args.mode == "continuous":
        if args.trigger and args.trigger.strip().lower() != "continuous":
            raise ConfigError("trigger", f"--trigger {args.trigger} needs --mode epoch")
        cli["trigger"] = "continuous"
    elif args.mode == "epoch" or args.trigger:
        trigger = args.trigger or "100ms"
        if trigger.strip().lower() == "continuous":
            raise ConfigError("trigger", "--mode epoch needs an epoch trigger: an interval, "
                              "once or available_now")
        cli["trigger"] = trigger
    if args.log_level:
        cli["log_level"] = args.log_level
    if args.commit_interval:
        cli["commit_interval"] = args.commit_interval
    if args.progress_interval:
        cli["progress_interval"] = args.progress_interval
    if args.startup_timeout:
        cli["startup_timeout"] = args.startup_timeout
    if args.http_port is not None:
        cli["http_port"] = args.http_port
    if args.http_host:
        cli["http_host"] = args.http_host
    if args.no_http:
        cli["http_port"] = None
    if args.state_dir:
        cli["state_dir"] = args.state_dir
    if args.state_backend:
        cli["state_backend"] = args.state_backend
    kafka: dict[str, str] = {}
    for kv in args.kafka:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError("-X", f"{kv!r} is not KEY=VALUE")
        kafka[k] = v
    if not args.bootstrap and not _bootstrap_in_env() and (
            job.config is None or job.config.bootstrap_servers == WorkerConfig().bootstrap_servers):
        local = local_broker.status()
        if local is not None:  # nothing named a cluster: the local broker, if one runs
            cli["bootstrap_servers"] = local.bootstrap
            log.info("no --bootstrap given: using the local broker at %s (started by "
                     "`streamcore broker start`)", local.bootstrap)
    # One rule, later wins: the job's config < the preset < the environment < the flags.
    base: WorkerConfig = job.config or WorkerConfig()
    preset = args.preset or os.environ.get("STREAMCORE_PRESET") or "default"
    base = base.with_preset(preset)
    env_cfg = WorkerConfig.from_env(**{
        f: getattr(base, f) for f in base.__dataclass_fields__})
    if kafka:
        cli["kafka"] = {**env_cfg.kafka, **kafka}
    return env_cfg.replace(**cli)


def _bootstrap_in_env() -> bool:
    return bool(os.environ.get("STREAMCORE_BOOTSTRAP_SERVERS")
                or os.environ.get("STREAMCORE_BOOTSTRAP"))


def _tune_gc() -> None:
    """The worker process allocates a dict or two per record, nearly all freed by reference
    counting, never by the cycle collector; at the default threshold (700) the collector
    still runs every few hundred records and rescans what start-up loaded. Freeze the
    start-up heap (the job, its imports, the clients) out of every collection and run the
    youngest one every 10,000 allocations: measured about 3% more W1 throughput, for a
    little more memory between collections. Only `streamcore run` does it: it owns the
    process, an embedding application does not."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def _run_worker(job: Any, config: WorkerConfig) -> None:
    from streamcore.runtime.worker import Worker

    worker = Worker(job, config)
    _tune_gc()
    loop = asyncio.get_running_loop()
    signals = {"n": 0}

    def on_signal(sig: signal.Signals) -> None:
        signals["n"] += 1
        if signals["n"] > 1:
            log.error("second %s: exiting at once", sig.name)
            os._exit(130)
        log.info("%s: stopping gracefully (send again to exit at once)", sig.name)
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await worker.run()


# Exit codes of `streamcore run` (documented in the README).
EXIT_STOPPED, EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3

# Options that take a value which may start with "-" (a negative duration must reach the
# validation, which names the field, rather than be taken for an option).
_VALUE_OPTIONS = ("--commit-interval", "--progress-interval", "--startup-timeout")


def _join_negative_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1][:1] == "-":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_join_negative_values(
        sys.argv[1:] if argv is None else list(argv)))
    if args.command == "broker":
        return _broker(args)
    from streamcore.core import logs

    # A crash inside a C extension (librdkafka, RocksDB) prints every thread's Python stack
    # to stderr before the process dies: the only trace such a crash leaves.
    faulthandler.enable()
    logs.configure(os.environ.get("STREAMCORE_LOG_LEVEL", "INFO"))
    try:
        job = load_job(args.job)
        config = _config(args, job)
        logs.configure(config.log_level)
        for name in unknown_env():
            log.warning("ignored environment variable %s: no such setting", name)
        asyncio.run(_run_worker(job, config))
    except (ConfigError, JobDefinitionError) as exc:
        print(f"streamcore: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnavailable as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"streamcore: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except StreamcoreError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"streamcore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_STOPPED


def _broker(args: argparse.Namespace) -> int:
    run_dir = Path(args.dir) if args.dir else local_broker.default_run_dir()
    try:
        if args.action == "start":
            info = local_broker.start(run_dir, port=args.port)
            print(info.bootstrap)
        elif args.action == "stop":
            print("stopped" if local_broker.stop(run_dir) else "not running")
        else:
            cur = local_broker.status(run_dir)
            print(f"running on {cur.bootstrap} (pid {cur.pid})" if cur else "not running")
            return 0 if cur else 3
    except StreamcoreError as exc:
        print(f"streamcore broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
