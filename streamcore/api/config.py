"""Worker configuration: one frozen, validated dataclass.

Precedence, lowest first: the defaults here, keyword arguments in code, ``STREAMCORE_*``
environment variables, CLI flags. Every invalid value raises :class:`ConfigError` naming the
field, before anything connects. Kafka client settings pass through unchanged under
``kafka`` (both clients), ``consumer`` and ``producer``; the fields here own the settings that
the engine's guarantees depend on, and a pass-through that would break them is refused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statestore.rocksdb import RocksDBSettings
from streamcore.api.triggers import Trigger, parse_trigger
from streamcore.core.durations import parse_duration
from streamcore.core.errors import ConfigError

__all__ = ["CLIENTS", "OTHER_ENV", "PRESETS", "WorkerConfig", "parse_duration", "unknown_env"]

# The Kafka client libraries a worker can run on (WorkerConfig.client, --client).
CLIENTS = ("confluent-kafka", "aiokafka")

# librdkafka settings that the engine must own: changing them would void at-least-once.
_RESERVED = {
    "enable.auto.commit": "the engine commits offsets itself, only once they are done",
    "enable.auto.offset.store": "the engine commits explicit offsets",
    "group.id": "use the group field (--group)",
    "bootstrap.servers": "use the bootstrap_servers field (--bootstrap)",
    "auto.offset.reset": "use KafkaSource(starting_offsets=...): internal topics must always "
                         "start at their beginning",
}


# Named presets: the fields each one sets (everything else keeps its value).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "low_latency": {"consumer": {"fetch.wait.max.ms": 5}, "producer": {"linger.ms": 0},
                    "poll_timeout": "20ms"},
    # A stateful step writes each key changed since the last commit to its changelog once
    # per commit: a longer interval writes a hot key once where 100 ms writes it ten times.
    # The price is more reprocessing after a crash (up to a second of records) and
    # committed offsets (the group's lag) a second behind. It fetches 250 records at a
    # time as the default does: 2,000 cost more CPU per record in 7 of 8 alternated W1
    # rounds (4.6 against 4.1 us on average) and gave a lower rate in 6.
    "high_throughput": {"producer": {"linger.ms": 20}, "commit_interval": "1s"},
}

# STREAMCORE_* variables that are not WorkerConfig fields but are read all the same.
OTHER_ENV = {
    "STREAMCORE_PRESET": "a named preset (as --preset)",
    "STREAMCORE_BOOTSTRAP": "alias of STREAMCORE_BOOTSTRAP_SERVERS",
    "STREAMCORE_TANSU_BIN": "the local broker's binary",
    "STREAMCORE_TEST_BOOTSTRAP": "the tests' Kafka (instead of a local broker)",
    "STREAMCORE_TEST_BROKER_RESTART": "run the opt-in broker-restart test",
}


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a worker needs besides the job. Durations accept seconds or "100ms"/"10s"."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client: str = "confluent-kafka"  # or "aiokafka" (pure asyncio; see the README)
    # continuous (at-least-once), or epochs in Kafka transactions: "100ms", once,
    # available_now (streamcore.api.triggers). --mode/--trigger, STREAMCORE_TRIGGER.
    trigger: Trigger | str = "continuous"
    max_epoch_records: int = 100_000  # available_now: records per epoch at most
    # Epoch mode's transactional.id; None: "{group}-{worker id}", the worker id kept in the
    # state directory so that a restarted worker fences its previous incarnation.
    transactional_id: str | None = None
    group: str | None = None  # consumer group; defaults to the job name
    commit_interval: float | str = 0.1
    shutdown_timeout: float | str = 30.0  # drain deadline on SIGTERM and on revoke
    progress_interval: float | str = 10.0
    # Records per consume() call. 250 rather than 1,000: in 16 alternated W1 rounds (4 Dec)
    # 250 cost less CPU per record in 13 and the same in one (5.1 against 5.7 us on average).
    poll_batch: int = 250
    poll_timeout: float | str = 0.1
    # Each fetched batch goes through the stateless steps one step at a time (one call per
    # step per batch); False: record at a time (see streamcore.runtime.batches).
    batch_execution: bool = True
    # Event time: how a task combines the watermarks of its inputs ("min", as Spark, or
    # "max"), and after how long without advancing an input stops holding it back (None:
    # never, as Spark).
    watermark_policy: str = "min"
    watermark_idle_timeout: float | str | None = None
    inbox_high: int = 20_000  # records queued for one partition before it is paused
    inbox_low: int = 5_000  # ... and resumed
    log_level: str = "INFO"
    http_host: str = "0.0.0.0"
    http_port: int | None = 9108  # /metrics /healthz /readyz /progress; 0: any free port
    health_timeout: float | str = 10.0  # /healthz fails when the event loop stalls this long
    startup_timeout: float | str = 30.0  # give up if Kafka cannot be reached within this
    state_dir: str = "./state"  # stores live under {state_dir}/{job}/{step}/{partition}/
    state_backend: str = "rocksdb"  # or "memory": nothing on disk, replayed on every assign
    state_cache_entries: int = 100_000  # decoded values cached per store between commits
    rocksdb: RocksDBSettings = field(default_factory=RocksDBSettings)
    kafka: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("commit_interval", "shutdown_timeout", "progress_interval", "poll_timeout",
                     "health_timeout", "startup_timeout"):
            object.__setattr__(self, name, parse_duration(getattr(self, name), name))
        if not self.bootstrap_servers or not isinstance(self.bootstrap_servers, str):
            raise ConfigError("bootstrap_servers", "must be a non-empty host:port list")
        for hp in self.bootstrap_servers.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("bootstrap_servers", f"{hp!r} is not host:port")
        object.__setattr__(self, "trigger", parse_trigger(self.trigger))
        if self.trigger.epochs and self.client != "confluent-kafka":  # type: ignore[union-attr]
            raise ConfigError("client", "epoch mode needs the confluent-kafka client (aiokafka's "
                              "transactional producer cannot start on the local broker)")
        if self.transactional_id is not None and not str(self.transactional_id).strip():
            raise ConfigError("transactional_id", "must not be empty")
        if self.client not in CLIENTS:
            raise ConfigError("client", f"must be one of {', '.join(CLIENTS)}, "
                              f"got {self.client!r}")
        if self.group is not None and not self.group.strip():
            raise ConfigError("group", "must not be empty")
        if self.commit_interval <= 0:  # type: ignore[operator]
            raise ConfigError("commit_interval", "must be positive")
        if not isinstance(self.state_dir, str) or not self.state_dir.strip():
            raise ConfigError("state_dir", "must be a directory path")
        if self.state_backend not in ("rocksdb", "memory"):
            raise ConfigError("state_backend",
                              f"must be 'rocksdb' or 'memory', got {self.state_backend!r}")
        if not isinstance(self.rocksdb, RocksDBSettings):
            raise ConfigError("rocksdb", "must be a RocksDBSettings")
        for name in ("poll_batch", "inbox_high", "inbox_low", "state_cache_entries",
                     "max_epoch_records"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        if not isinstance(self.batch_execution, bool):
            raise ConfigError("batch_execution", f"must be True or False, got "
                              f"{self.batch_execution!r}")
        if self.watermark_policy not in ("min", "max"):
            raise ConfigError("watermark_policy", f"must be 'min' or 'max', got "
                              f"{self.watermark_policy!r}")
        if self.watermark_idle_timeout is not None:
            idle = parse_duration(self.watermark_idle_timeout, "watermark_idle_timeout")
            if idle <= 0:
                raise ConfigError("watermark_idle_timeout", "must be positive (or None: off)")
            object.__setattr__(self, "watermark_idle_timeout", idle)
        if self.inbox_low >= self.inbox_high:
            raise ConfigError("inbox_low", f"must be below inbox_high ({self.inbox_high})")
        if self.http_port is not None and (
                not isinstance(self.http_port, int) or not 0 <= self.http_port <= 65535):
            raise ConfigError("http_port", f"must be a port number 0-65535, got {self.http_port!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level", f"{self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")
        for section in ("kafka", "consumer", "producer"):
            for key in getattr(self, section):
                if key in _RESERVED:
                    raise ConfigError(f"{section}[{key!r}]", _RESERVED[key])

    # Durations are floats after __post_init__; these accessors keep mypy honest.
    @property
    def commit_interval_s(self) -> float:
        return float(self.commit_interval)

    @property
    def shutdown_timeout_s(self) -> float:
        return float(self.shutdown_timeout)

    @property
    def progress_interval_s(self) -> float:
        return float(self.progress_interval)

    @property
    def poll_timeout_s(self) -> float:
        return float(self.poll_timeout)

    @property
    def health_timeout_s(self) -> float:
        return float(self.health_timeout)

    @property
    def startup_timeout_s(self) -> float:
        return float(self.startup_timeout)

    @property
    def trigger_spec(self) -> Trigger:
        """The trigger, typed (a Trigger after __post_init__)."""
        assert isinstance(self.trigger, Trigger)
        return self.trigger

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict for logs and /progress, secrets masked."""
        from streamcore.core.logs import redact

        return dict(redact(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> WorkerConfig:
        return dataclasses.replace(self, **changes)

    # -- named presets -------------------------------------------------------------------
    @classmethod
    def low_latency(cls, **overrides: Any) -> WorkerConfig:
        """Small fetch waits and no producer linger: lowest end-to-end latency."""
        return cls(**{**PRESETS["low_latency"], **overrides})

    @classmethod
    def high_throughput(cls, **overrides: Any) -> WorkerConfig:
        """Producer linger and 1 s commits: best throughput, some latency,
        and up to a second of records processed again after a crash."""
        return cls(**{**PRESETS["high_throughput"], **overrides})

    def with_preset(self, name: str) -> WorkerConfig:
        """This configuration with a named preset's fields laid over it (its Kafka settings
        merged into this one's): how --preset and STREAMCORE_PRESET apply."""
        if name not in PRESETS:
            raise ConfigError("preset", f"{name!r} is not one of {sorted(PRESETS)}")
        changes = dict(PRESETS[name])
        for section in ("kafka", "consumer", "producer"):
            if section in changes:
                changes[section] = {**getattr(self, section), **changes[section]}
        return self.replace(**changes)

    # -- environment ---------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        """Build from keyword arguments overlaid by STREAMCORE_<FIELD> variables.

        Scalar fields only; ``kafka``/``consumer``/``producer``/``rocksdb`` come from code
        or the CLI.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(overrides)
        if "STREAMCORE_BOOTSTRAP" in env and "STREAMCORE_BOOTSTRAP_SERVERS" not in env:
            values["bootstrap_servers"] = env["STREAMCORE_BOOTSTRAP"]
        for f in dataclasses.fields(cls):
            raw = env.get(f"STREAMCORE_{f.name.upper()}")
            if raw is None or f.name in ("kafka", "consumer", "producer", "rocksdb"):
                continue
            if f.name == "http_port" and raw.strip().lower() in ("", "none", "off"):
                values[f.name] = None
            elif f.name == "batch_execution":
                flag = raw.strip().lower()
                if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ConfigError(f.name, f"STREAMCORE_{f.name.upper()}={raw!r} is not "
                                      "true or false")
                values[f.name] = flag in ("true", "1", "yes", "on")
            elif f.name in ("poll_batch", "inbox_high", "inbox_low", "http_port",
                            "state_cache_entries", "max_epoch_records"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f.name, f"STREAMCORE_{f.name.upper()}={raw!r} is not "
                                      "an integer") from None
            else:
                values[f.name] = raw
        return cls(**values)


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """STREAMCORE_* variables that nothing reads (a typo would otherwise pass silently)."""
    env = os.environ if env is None else env
    known = {f"STREAMCORE_{f.name.upper()}" for f in dataclasses.fields(WorkerConfig)}
    known |= set(OTHER_ENV)
    return sorted(k for k in env if k.startswith("STREAMCORE_") and k not in known)
