"""Prometheus metrics and the worker's HTTP endpoints.

The engine *reports into* this package; nothing here reads engine internals. Per-record work
never touches prometheus-client: the engine keeps plain counters and latency histograms and
publishes a :class:`~metrics.exporter.Snapshot` on every commit tick, which the exporter turns
into metric families at scrape time.
"""
