"""`streamcore run` start-up errors, as a user meets them: one clear line and a documented
exit code (0 stopped, 1 job failed, 2 bad configuration, 3 cannot reach Kafka)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from connectors.admin import topic_names
from tests.helpers import ROOT, make_topics, unique


def _run(args: list[str], env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "streamcore.cli", "run", *args, "--no-http"],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT)


def _job_env(bootstrap: str) -> dict[str, str]:
    src, out = unique("cli-in"), unique("cli-out")
    make_topics(bootstrap, src, out)
    return {"IN": src, "OUT": out, "JOB": unique("cli")}


PASSTHROUGH = str(ROOT / "tests" / "jobs" / "passthrough.py")


def test_unreachable_kafka_exits_3_within_the_startup_timeout() -> None:
    r = _run([PASSTHROUGH, "--bootstrap", "127.0.0.1:1", "--startup-timeout", "2s"],
             {"IN": "a", "OUT": "b", "JOB": "j"})
    assert r.returncode == 3, r.stderr
    assert "cannot reach Kafka at 127.0.0.1:1 within 2s" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_misspelled_input_topic_exits_2_and_is_not_created(bootstrap: str) -> None:
    env = {**_job_env(bootstrap), "IN": unique("no-such-topic")}
    r = _run([PASSTHROUGH, "--bootstrap", bootstrap], env)
    assert r.returncode == 2, r.stderr
    assert env["IN"] in r.stderr and "do not exist" in r.stderr
    names = topic_names(bootstrap, timeout=10)
    assert names is not None and env["IN"] not in names, "the missing topic was created"


def test_a_state_dir_that_cannot_be_written_exits_2_naming_it(bootstrap: str,
                                                              tmp_path: Path) -> None:
    """Before: the worker started, looked healthy, and every partition failed to open its
    store (found by running the image without its chown)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    r = _run([str(ROOT / "tests" / "jobs" / "stateful.py"), "--bootstrap", bootstrap,
              "--state-dir", str(blocked / "state")], _job_env(bootstrap))
    assert r.returncode == 2, r.stderr
    assert "state_dir" in r.stderr and "not writable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_kafka_setting_exits_2_naming_it(bootstrap: str) -> None:
    r = _run([PASSTHROUGH, "--bootstrap", bootstrap, "-X", "no.such.setting=1"],
             _job_env(bootstrap))
    assert r.returncode == 2, r.stderr
    assert "no.such.setting" in r.stderr and "Traceback" not in r.stderr


def test_a_setting_the_aiokafka_client_cannot_honour_exits_2_naming_it(bootstrap: str) -> None:
    r = _run([PASSTHROUGH, "--bootstrap", bootstrap, "--client", "aiokafka",
              "-X", "queued.max.messages.kbytes=1024"], _job_env(bootstrap))
    assert r.returncode == 2, r.stderr
    assert "kafka['queued.max.messages.kbytes']" in r.stderr and "aiokafka" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_client_exits_2_naming_the_field(bootstrap: str) -> None:
    r = _run([PASSTHROUGH, "--bootstrap", bootstrap], {**_job_env(bootstrap),
                                                       "STREAMCORE_CLIENT": "kafka-python"})
    assert r.returncode == 2, r.stderr
    assert "client" in r.stderr and "aiokafka" in r.stderr and "Traceback" not in r.stderr


def test_mode_and_trigger_that_contradict_each_other_exit_2_naming_the_trigger() -> None:
    env = {"IN": "a", "OUT": "b", "JOB": "j"}
    for args, says in ((["--mode", "continuous", "--trigger", "100ms"], "needs --mode epoch"),
                       (["--mode", "epoch", "--trigger", "continuous"], "epoch trigger"),
                       (["--mode", "epoch", "--trigger", "soon"], "not continuous, once"),
                       (["--mode", "epoch", "--client", "aiokafka"], "confluent-kafka")):
        r = _run([PASSTHROUGH, "--bootstrap", "127.0.0.1:1", *args], env)
        assert r.returncode == 2, (args, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_job_module_that_fails_to_import_exits_2_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken_job.py"
    bad.write_text("import no_such_module_here\n")
    r = _run([f"{bad}:job"])
    assert r.returncode == 2, r.stderr
    assert "cannot import" in r.stderr and "no_such_module_here" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_crash_in_native_code_leaves_the_python_stack_on_stderr(tmp_path: Path) -> None:
    """A segfault (here: the job module reads address 0 through ctypes) kills the process
    with no Python traceback; the worker prints every thread's stack first (faulthandler),
    the only trace such a crash leaves (a CLI run once died of SIGSEGV on exit, unexplained)."""
    bad = tmp_path / "crashing_job.py"
    bad.write_text("import ctypes\nctypes.string_at(0)\n")
    r = _run([f"{bad}:job"])
    assert r.returncode == -11, r.stderr
    assert "Fatal Python error: Segmentation fault" in r.stderr
    assert "crashing_job.py" in r.stderr


def test_a_missing_job_attribute_names_the_jobs_the_module_has(tmp_path: Path) -> None:
    r = _run([f"{PASSTHROUGH}:nosuch"], {"IN": "a", "OUT": "b", "JOB": "j"})
    assert r.returncode == 2, r.stderr
    assert "no attribute 'nosuch'" in r.stderr and "its jobs: job" in r.stderr


def test_a_negative_duration_is_a_configuration_error_not_an_option() -> None:
    r = _run([PASSTHROUGH, "--commit-interval", "-5s"], {"IN": "a", "OUT": "b", "JOB": "j"})
    assert r.returncode == 2, r.stderr
    assert "commit_interval: must not be negative" in r.stderr


def test_run_without_bootstrap_uses_the_local_broker_from_any_directory(
        tmp_path: Path) -> None:
    """Before: `broker start` picked a free port while `run` defaulted to 127.0.0.1:9092, and
    `broker status` only worked in the directory the broker was started from."""
    import os
    import signal
    import time

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("STREAMCORE_BOOTSTRAP_SERVERS", None)
    cli = [sys.executable, "-m", "streamcore.cli"]
    started = subprocess.run([*cli, "broker", "start"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        status = subprocess.run([*cli, "broker", "status"], env=env, capture_output=True,
                                text=True, timeout=30, cwd=elsewhere)
        assert status.returncode == 0 and bootstrap in status.stdout, status.stdout
        job_env = {**env, **_job_env(bootstrap), "STREAMCORE_HTTP_PORT": "0"}
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            w = subprocess.Popen([*cli, "run", PASSTHROUGH], env=job_env, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=elsewhere)
            try:
                deadline = time.monotonic() + 60
                while "assigned" not in log.read_text() and time.monotonic() < deadline:
                    assert w.poll() is None, log.read_text()
                    time.sleep(0.2)
                w.send_signal(signal.SIGTERM)
                assert w.wait(60) == 0, log.read_text()
            finally:
                if w.poll() is None:
                    w.kill()
        text = log.read_text()
        first = text.splitlines()[0]
        assert f"using the local broker at {bootstrap}" in first, first
        assert "assigned" in text
    finally:
        subprocess.run([*cli, "broker", "stop"], env=env, timeout=60, cwd=tmp_path)
