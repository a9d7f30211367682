"""The dashboard against a real Prometheus: Prometheus from Debian's packages scrapes a running
worker with the scrape configuration of docker/prometheus/, and every PromQL expression of
the Grafana dashboard (and its variable's query) runs through Prometheus's HTTP API: each
parses, and each whose metric the job exports returns data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource
from tests.helpers import (
    ROOT,
    free_port,
    http_get,
    make_topics,
    produce,
    read_topic,
    unique,
    wait_until,
    worker_config,
)

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "streamcore.json"
SCRAPE_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"


def _prometheus() -> str:
    """The prometheus binary, installed from Debian's packages if it is missing."""
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("prometheus is not installed and there is no apt-get to install it")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"prometheus cannot be installed here: {done.stderr.decode()[-300:]}")
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        pytest.skip("apt-get installed prometheus but the binary is not on PATH")
    return found



def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # a bad query answers 400 with the error in JSON
        return json.loads(e.read())


def _scrape_config(target: str) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with the worker found at target instead of by compose's
    DNS, and scraped every second so that rates have samples within the test."""
    conf = yaml.safe_load(SCRAPE_CONFIG.read_text())
    conf["global"]["scrape_interval"] = "1s"
    (job,) = conf["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [target]}]
    return dict(conf)


def _exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def _increment(v: dict[str, Any]) -> dict[str, Any]:
    if v["i"] % 100 == 99:
        raise ValueError("one in a hundred fails")  # errors and dead letters have data
    return v


def test_dashboard_queries_run_on_a_real_prometheus(bootstrap: str, tmp_path: Path) -> None:
    binary = _prometheus()
    src, out, name = unique("prom-in"), unique("prom-out"), unique("prom")
    make_topics(bootstrap, src, out)
    job = Job(name)
    (job.stream(KafkaSource(src, value=JSON))
        .map(_increment, name="increment", on_error="dead_letter")
        .key_by(lambda v: f"k{v['i'] % 10}")
        .count(name="per_key")
        .to(KafkaSink(out, key=STR, value=JSON)))
    q = job.start(worker_config(bootstrap, state_dir=str(tmp_path / "state")))
    prom: subprocess.Popen[bytes] | None = None
    try:
        w = q.worker
        assert w is not None
        wait_until(lambda: w.http_port is not None and w.rebalances > 0, 60, "assigned")
        produce(bootstrap, src, ((None, {"i": i}, i % 4) for i in range(1000)))
        read_topic(bootstrap, out, expect=990, timeout=60)
        assert w.http_port is not None
        exported = http_get(w.http_port, "/metrics")[1].decode()

        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(_scrape_config(f"127.0.0.1:{w.http_port}")))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

        def scraped() -> bool:
            try:
                targets = _api(port, "targets")["data"]["activeTargets"]
            except (OSError, ValueError):  # not up, or "Service Unavailable" while it starts
                return False
            return bool(targets) and all(t["health"] == "up" for t in targets)

        wait_until(scraped, 60, "Prometheus to scrape the worker")
        # Rates need two samples in their window; more records make them non-zero.
        produce(bootstrap, src, ((None, {"i": i}, i % 4) for i in range(1000, 2000)))
        read_topic(bootstrap, out, expect=1980, timeout=60)

        def scrapes() -> int:
            result = _api(port, "query", query="count_over_time(streamcore_commits_total[1m])")
            return int(result["data"]["result"][0]["value"][1]) if result["data"]["result"] else 0

        wait_until(lambda: scrapes() >= 3, 30, "three scrapes")

        # The dashboard's variable lists this job (the worker's job label, not the scrape
        # job's name).
        values = _api(port, "label/job/values", **{"match[]": "streamcore_records_consumed_total"})
        assert name in values["data"], values

        failures, not_exported = [], set()
        for title, expr in _exprs():
            query = expr.replace("$job", name)  # what Grafana sends with this job selected
            answer = _api(port, "query", query=query)
            if answer["status"] != "success":
                failures.append(f"{title}: {expr} does not parse: {answer.get('error')}")
                continue
            metric = re.search(r"streamcore_[a-z_]+?(?=_bucket\b|\{|\)|\[|$)", expr)
            assert metric, expr
            family = metric.group(0)
            produced = re.search(rf"^{family}(_bucket)?\{{", exported, re.M) is not None
            if not produced:
                not_exported.add(family)
            elif not answer["data"]["result"]:
                failures.append(f"{title}: {expr} returns no data although the worker "
                                f"exports {family}")
        assert not failures, "\n".join(failures)
        # This job has no global table and no event time (no watermark to export); every
        # other panel was checked for data.
        assert not_exported == {"streamcore_global_table_failures_total",
                                "streamcore_watermark_seconds"}, not_exported
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        q.stop(30)
    assert q.exception() is None
