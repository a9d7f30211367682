"""Every metric streamcore exports: the single list that the exporter, the Grafana dashboard
(docker/grafana/dashboards/streamcore.json, checked by a test) and the docs use."""

from __future__ import annotations

__all__ = ["LATENCY_BUCKETS", "METRICS"]

# Seconds; resolves sub-millisecond in-worker latency up to multi-second stalls.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0)

# name -> (type, labels, help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "streamcore_records_consumed_total": (
        "counter", ("job", "topic", "partition"), "Input records taken by the worker."),
    "streamcore_records_produced_total": (
        "counter", ("job", "topic"), "Output records handed to the producer, per sink topic."),
    "streamcore_processing_latency_seconds": (
        "histogram", ("job",), "In-worker latency: record handed over by the consumer to its "
        "outputs handed to the producer."),
    "streamcore_end_to_end_latency_seconds": (
        "histogram", ("job",), "Record timestamp to its output handed to the producer."),
    "streamcore_consumer_lag": (
        "gauge", ("job", "topic", "partition"), "High watermark minus next offset to process "
        "(clamped at 0; the local broker under-reports the watermark)."),
    "streamcore_commit_latency_seconds": (
        "histogram", ("job",), "Duration of synchronous offset commits (revoke, shutdown)."),
    "streamcore_commits_total": ("counter", ("job",), "Offset commits issued."),
    "streamcore_rebalances_total": ("counter", ("job",), "Partition assignments and revokes."),
    "streamcore_assigned_partitions": ("gauge", ("job",), "Input partitions assigned."),
    "streamcore_paused_partitions": ("gauge", ("job",), "Partitions paused by backpressure."),
    "streamcore_partitions": ("gauge", ("job", "state"),
                              "Partition tasks by lifecycle state (RESTORING, RUNNING, ...)."),
    "streamcore_errors_total": ("counter", ("job", "kind", "policy"),
                                "Record errors by kind (deserialization, user_function) and "
                                "the policy applied (fail, skip, dead_letter)."),
    "streamcore_dlq_records_total": ("counter", ("job",),
                                     "Records sent to the dead-letter topic."),
    "streamcore_event_loop_lag_seconds": ("gauge", ("job",),
                                          "Seconds since the worker's event loop last ran."),
    "streamcore_state_restore_records_total": ("counter", ("job", "step"),
                                               "Changelog records replayed into stores."),
    "streamcore_state_restore_duration_seconds": ("gauge", ("job", "step"),
                                                  "Duration of the last store restore."),
    "streamcore_store_keys": ("gauge", ("job", "step"),
                              "Keys in the state stores of this worker (RocksDB estimate)."),
    "streamcore_global_table_failures_total": (
        "counter", ("job", "table"), "Global tables whose follower stopped (the table is stale "
        "and /healthz fails until the worker restarts)."),
    # Reported once event time and epoch mode land; the families exist now so that
    # dashboards and alerts can be written against them.
    "streamcore_watermark_ms": ("gauge", ("job", "topic", "partition"),
                                "Event-time watermark (epoch ms)."),
    "streamcore_late_records_dropped_total": ("counter", ("job", "step"),
                                              "Records older than the watermark, dropped."),
    "streamcore_epoch_duration_seconds": ("histogram", ("job",),
                                          "Epoch (micro-batch) duration in epoch mode."),
}
