"""Latency histograms and progress reports (Spark's StreamingQueryProgress shape)."""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

from metrics.exporter import HistogramData
from metrics.names import LATENCY_BUCKETS

__all__ = ["LatencyHistogram"]

# Log-spaced buckets, 8 per power of two, from 1 microsecond: about 9% relative error.
_PER_OCTAVE = 8
_MIN = 1e-6
_N = _PER_OCTAVE * 32  # up to about 4000 s


class LatencyHistogram:
    """A fixed-size log histogram of durations in seconds; cheap to record, merge and query."""

    __slots__ = ("counts", "prom", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * _N
        self.prom = [0] * (len(LATENCY_BUCKETS) + 1)  # exact counts per Prometheus bucket
        self.total = 0
        self.sum = 0.0

    def record(self, seconds: float, count: int = 1) -> None:
        i = 0 if seconds <= _MIN else min(_N - 1, int(math.log2(seconds / _MIN) * _PER_OCTAVE))
        self.counts[i] += count
        self.prom[bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.total += count
        self.sum += seconds * count

    def export(self) -> HistogramData:
        """Cumulative counts per Prometheus bound (le), for the metrics exporter."""
        cumulative, running = [], 0
        for c in self.prom[:-1]:
            running += c
            cumulative.append(running)
        return HistogramData(cumulative, self.total, self.sum)

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding quantile q (0 if empty)."""
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return float(_MIN * 2 ** ((i + 1) / _PER_OCTAVE))
        return float(_MIN * 2 ** (_N / _PER_OCTAVE))

    def summary_ms(self) -> dict[str, Any]:
        return {
            "count": self.total,
            "avg": round(1000 * self.sum / self.total, 4) if self.total else 0.0,
            "p50": round(1000 * self.quantile(0.50), 4),
            "p99": round(1000 * self.quantile(0.99), 4),
            "max": round(1000 * self.quantile(1.0), 4),
        }
