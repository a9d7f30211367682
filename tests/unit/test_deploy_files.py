"""No docker engine runs here: the deployment files are checked statically, and every metric
name the dashboard or the docs use must be one the exporter actually exports."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from metrics.exporter import Snapshot, WorkerMetrics
from metrics.names import METRICS
from streamcore.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
_NAME = re.compile(r"\bstreamcore_[a-z_]+")


def _exported_names() -> set[str]:
    m = WorkerMetrics("j")
    m.publish(Snapshot())
    text = m.exposition().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
            return name.removesuffix(suffix)
    return name


def test_every_declared_metric_is_exported() -> None:
    exported = _exported_names()
    for name in METRICS:
        assert name in exported, f"{name} is declared but not exported"


def test_dashboard_uses_only_exported_metric_names() -> None:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "streamcore.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {_base(n) for e in exprs for n in _NAME.findall(e)}
    assert used, "the dashboard queries no streamcore metric"
    assert used <= set(METRICS), f"unknown metrics in the dashboard: {used - set(METRICS)}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "end-to-end latency", "lag", "commit", "rebalance", "restore",
                  "state size", "error", "global table"):
        assert topic in titles, f"no dashboard panel about {topic}"


def test_docs_mention_only_exported_metric_names() -> None:
    for doc in [ROOT / "README.md", *DOCKER.rglob("*.md")]:
        names = {_base(n) for n in _NAME.findall(doc.read_text())}
        assert names <= set(METRICS), f"{doc}: unknown metrics {names - set(METRICS)}"


def test_compose_stack_is_complete_and_consistent() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kafka", "worker", "generator", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "healthz" in " ".join(worker["healthcheck"]["test"])
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    # The worker command is a real invocation of our CLI, and its job module exists.
    args = _parser().parse_args(worker["command"])
    assert args.command == "run" and args.http_port == 9108
    assert (ROOT / args.job.split(":")[0]).is_file()
    gen = services["generator"]["command"]
    assert (ROOT / services["generator"]["entrypoint"][-1]).is_file()
    assert "--bootstrap" in gen
    # Prometheus scrapes the workers' port; Grafana gets the datasource and the dashboard.
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    sd = prom["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == 9108
    mounts = " ".join(services["grafana"]["volumes"])
    assert "provisioning" in mounts and "dashboards" in mounts
    for rel in ("grafana/provisioning/datasources/prometheus.yaml",
                "grafana/provisioning/dashboards/streamcore.yaml"):
        assert yaml.safe_load((DOCKER / rel).read_text())["apiVersion"] == 1


def test_dockerfile_is_multistage_slim_non_root_with_tini_and_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert 'ENTRYPOINT ["tini", "--", "streamcore"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    for path in re.findall(r"^COPY (?!--from)(?:--\S+ )?(\S+) ", text, re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert _parser().parse_args(cmd).command == "run"


def test_dockerfile_builds_every_package_and_gives_the_worker_a_writable_state_dir() -> None:
    """Before: statestore/ was not copied into the build stage (import streamcore failed in
    the image) and /app belonged to root (the worker could not create ./state)."""
    text = (DOCKER / "Dockerfile").read_text()
    build = text.split("\nFROM ")[1]  # the build stage, up to the runtime stage
    copied = set(re.findall(r"^COPY (?:--\S+ )?(\S+) ", build, re.M))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = {pat.rstrip("*") for pat in
               pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert shipped <= copied, f"packages not copied into the build stage: {shipped - copied}"
    runtime = text.split("\nFROM ")[2]
    user = re.search(r"^USER (\S+)", runtime, re.M).group(1)  # type: ignore[union-attr]
    workdir = re.search(r"^WORKDIR (\S+)", runtime, re.M).group(1)  # type: ignore[union-attr]
    assert re.search(rf"chown -R {user}:{user} {workdir}", runtime), "workdir not the user's"
    assert re.search(r'^VOLUME \["?/app/state', runtime, re.M)
    assert f"STREAMCORE_STATE_DIR={workdir}/state" in runtime


def test_k8s_manifests_probe_the_worker_endpoints() -> None:
    docs = [d for f in (DOCKER / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodMonitor"} <= kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _parser().parse_args(c["args"]).command == "run"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    assert shlex.join(c["args"])  # plain strings
