from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamcore import ConfigError, WorkerConfig
from streamcore.api.config import parse_duration, unknown_env


def test_durations_accept_seconds_and_units() -> None:
    assert parse_duration("100ms", "x") == pytest.approx(0.1)
    assert parse_duration("10s", "x") == 10.0
    assert parse_duration("2m", "x") == 120.0
    assert parse_duration(1.5, "x") == 1.5
    cfg = WorkerConfig(commit_interval="250ms")
    assert cfg.commit_interval_s == pytest.approx(0.25)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"commit_interval": "soon"}, "commit_interval"),
    ({"commit_interval": 0}, "commit_interval"),
    ({"shutdown_timeout": "-1s"}, "shutdown_timeout"),
    ({"bootstrap_servers": "nohostport"}, "bootstrap_servers"),
    ({"bootstrap_servers": ""}, "bootstrap_servers"),
    ({"poll_batch": 0}, "poll_batch"),
    ({"inbox_high": 10, "inbox_low": 20}, "inbox_low"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"group": " "}, "group"),
    ({"client": "kafka-python"}, "client"),
    ({"consumer": {"enable.auto.commit": True}}, "consumer['enable.auto.commit']"),
    ({"kafka": {"group.id": "x"}}, "kafka['group.id']"),
])
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = WorkerConfig()
    with pytest.raises(AttributeError):
        cfg.commit_interval = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        WorkerConfig("127.0.0.1:9092")  # type: ignore[call-arg]


def test_environment_overrides_code_and_is_validated() -> None:
    cfg = WorkerConfig.from_env({"STREAMCORE_BOOTSTRAP_SERVERS": "kafka:9092",
                                 "STREAMCORE_POLL_BATCH": "50"}, commit_interval="1s")
    assert cfg.bootstrap_servers == "kafka:9092"
    assert cfg.poll_batch == 50
    assert cfg.commit_interval_s == 1.0
    with pytest.raises(ConfigError, match="poll_batch"):
        WorkerConfig.from_env({"STREAMCORE_POLL_BATCH": "many"})


def test_presets_differ_from_the_default_where_they_say() -> None:
    assert WorkerConfig.low_latency().consumer["fetch.wait.max.ms"] == 5
    assert WorkerConfig.high_throughput().producer["linger.ms"] == 20
    assert WorkerConfig.high_throughput().commit_interval_s == 1.0
    # Larger fetches cost CPU per record (README, performance): the preset keeps the default.
    assert WorkerConfig.high_throughput().poll_batch == WorkerConfig().poll_batch == 250
    assert WorkerConfig().with_preset("high_throughput").commit_interval_s == 1.0
    assert WorkerConfig.low_latency(poll_batch=7).poll_batch == 7


def test_cli_refuses_bad_configuration_naming_the_field(tmp_path: object) -> None:
    job = "examples/clicks.py:job"
    r = subprocess.run([sys.executable, "-m", "streamcore.cli", "run", job,
                        "--commit-interval", "whenever"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2
    assert "commit_interval" in r.stderr
    r = subprocess.run([sys.executable, "-m", "streamcore.cli", "run", job,
                        "--bootstrap", "no-port"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2
    assert "bootstrap_servers" in r.stderr


def test_redacted_config_hides_secrets() -> None:
    cfg = WorkerConfig(kafka={"sasl.password": "hunter2", "security.protocol": "SASL_SSL",
                              "ssl.key.password": "k3y"})
    text = str(cfg.redacted())
    assert "hunter2" not in text and "k3y" not in text
    assert "SASL_SSL" in text


def test_burst_logger_logs_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from streamcore.core.logs import BurstLogger

    burst = BurstLogger(logging.getLogger("t"), window=60)
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(100):
            burst.warning("broker-down", "broker down")
        burst.warning("other", "other thing")
    assert [r.getMessage() for r in caplog.records] == ["broker down", "other thing"]


def _cfg_for(argv: list[str], job_config: WorkerConfig | None,
             monkeypatch: pytest.MonkeyPatch, **env: str) -> WorkerConfig:
    from streamcore import Job
    from streamcore.cli import _config, _parser

    for k in [k for k in os.environ if k.startswith("STREAMCORE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_STATE_HOME", "/nonexistent-state")  # no local broker found
    job = Job("j", config=job_config)
    return _config(_parser().parse_args(["run", "x.py", *argv]), job)


def test_precedence_is_one_rule_job_then_preset_then_env_then_flags(
        monkeypatch: pytest.MonkeyPatch) -> None:
    job_cfg = WorkerConfig(commit_interval="1s", consumer={"fetch.wait.max.ms": 50,
                                                           "client.id": "mine"})
    assert _cfg_for([], job_cfg, monkeypatch).commit_interval == 1.0
    assert _cfg_for([], job_cfg, monkeypatch,
                    STREAMCORE_COMMIT_INTERVAL="2s").commit_interval == 2.0
    assert _cfg_for(["--commit-interval", "3s"], job_cfg, monkeypatch,
                    STREAMCORE_COMMIT_INTERVAL="2s").commit_interval == 3.0
    # A preset applies over the job's config (before: ignored when the job set config=),
    # merging its Kafka settings into the job's.
    for argv, env in ((["--preset", "low_latency"], {}),
                      ([], {"STREAMCORE_PRESET": "low_latency"})):
        cfg = _cfg_for(argv, job_cfg, monkeypatch, **env)
        assert cfg.poll_timeout == 0.02 and cfg.commit_interval == 1.0
        assert cfg.consumer == {"fetch.wait.max.ms": 5, "client.id": "mine"}
    assert _cfg_for([], None, monkeypatch,
                    STREAMCORE_BOOTSTRAP="k:9").bootstrap_servers == "k:9"
    with pytest.raises(ConfigError, match="preset"):
        _cfg_for([], None, monkeypatch, STREAMCORE_PRESET="fastest")


def test_unknown_streamcore_variables_are_reported() -> None:
    assert unknown_env({"STREAMCORE_BOOTSTRAP": "x", "STREAMCORE_COMIT_INTERVAL": "1s",
                        "STREAMCORE_PRESET": "default", "OTHER": "1"}) == \
        ["STREAMCORE_COMIT_INTERVAL"]


def test_aiokafka_settings_translate_librdkafka_names_and_refuse_the_rest() -> None:
    from connectors.aio import aio_settings

    consumer = aio_settings("consumer", {"client.id": "me", "linger.ms": 7},
                            {"fetch.wait.max.ms": 5})
    assert consumer == {"client_id": "me", "fetch_max_wait_ms": 5}  # linger is the producer's
    producer = aio_settings("producer", {"client.id": "me"},
                            {"linger.ms": "7", "enable.idempotence": "true", "acks": "all"})
    assert producer == {"client_id": "me", "linger_ms": 7, "enable_idempotence": True,
                        "acks": "all"}
    with pytest.raises(ConfigError) as info:
        aio_settings("consumer", {}, {"queued.max.messages.kbytes": 1024})
    assert info.value.field == "consumer['queued.max.messages.kbytes']"
    with pytest.raises(ConfigError) as info:
        aio_settings("producer", {}, {"linger.ms": "soon"})
    assert info.value.field == "producer['linger.ms']"
