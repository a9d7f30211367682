"""Turn the engine's published snapshots into Prometheus metric families at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from metrics.names import LATENCY_BUCKETS, METRICS

__all__ = ["HistogramData", "Snapshot", "WorkerMetrics"]


@dataclass(frozen=True)
class HistogramData:
    """Cumulative counts per bound of LATENCY_BUCKETS (then +Inf), and the sum in seconds."""

    buckets: Sequence[int]
    total: int
    sum: float


@dataclass(frozen=True)
class Snapshot:
    """What the engine publishes. Counters are cumulative since the worker started.

    ``samples`` maps a metric name of :data:`METRICS` to ``{label values (after job): value}``;
    ``histograms`` maps a histogram name to its data.
    """

    samples: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    histograms: dict[str, HistogramData] = field(default_factory=dict)


class _SnapshotCollector(Collector):
    def __init__(self, job: str) -> None:
        self.job = job
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot  # one read: the engine replaces it atomically
        for name, (kind, labels, doc) in METRICS.items():
            short = name.removesuffix("_total") if kind == "counter" else name
            if kind == "histogram":
                fam = HistogramMetricFamily(name, doc, labels=list(labels))
                h = snap.histograms.get(name)
                if h is not None:
                    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
                    fam.add_metric([self.job], list(zip(bounds, [*h.buckets, h.total],
                                                        strict=True)), h.sum)
                yield fam
                continue
            family: Metric = (CounterMetricFamily(short, doc, labels=list(labels))
                              if kind == "counter"
                              else GaugeMetricFamily(name, doc, labels=list(labels)))
            for label_values, value in snap.samples.get(name, {}).items():
                family.add_metric([self.job, *label_values], value)  # type: ignore[attr-defined]
            yield family


class WorkerMetrics:
    """One registry per worker, so that several workers in one process never collide."""

    def __init__(self, job: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector(job)
        self.registry.register(self._collector)

    def publish(self, snapshot: Snapshot) -> None:
        self._collector.snapshot = snapshot

    def exposition(self) -> bytes:
        """The Prometheus text format of everything published so far."""
        return generate_latest(self.registry)
