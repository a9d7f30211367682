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
        "histogram", ("job",), "Offset commits, request to answer: periodic (asynchronous) "
        "ones and the synchronous ones of revokes and shutdown."),
    "streamcore_commits_total": ("counter", ("job",), "Offset commits issued."),
    "streamcore_rebalances_total": ("counter", ("job",), "Partition assignments and revokes."),
    "streamcore_fetch_gaps_total": (
        "counter", ("job",), "Reads again of a repartition partition (continuous mode) whose "
        "fetch passed records over (a local-broker defect, never seen on Kafka)."),
    "streamcore_assigned_partitions": ("gauge", ("job",), "Input partitions assigned."),
    "streamcore_paused_partitions": ("gauge", ("job",), "Partitions paused by backpressure."),
    "streamcore_partitions": ("gauge", ("job", "state"),
                              "Partition tasks by lifecycle state (RESTORING, RUNNING, ...)."),
    "streamcore_errors_total": ("counter", ("job", "kind", "policy", "step"),
                                "Record errors by kind (deserialization, user_function), "
                                "the policy applied (fail, skip, dead_letter) and the step "
                                "that raised (its name= if given)."),
    "streamcore_committed_offset": ("gauge", ("job", "topic", "partition"),
                                    "Next offset to read, as last committed by this worker."),
    "streamcore_oldest_uncommitted_age_seconds": (
        "gauge", ("job", "topic", "partition"), "How long the oldest record not yet "
        "committable has been in the worker (0: everything taken is committable)."),
    "streamcore_broker_connected": ("gauge", ("job",),
        "1 while the worker's group member holds a connection to a broker, 0 when it has "
        "none (from the client's statistics, every 5 s)."),
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
    "streamcore_watermark_seconds": (
        "gauge", ("job", "topic", "partition"), "Event-time watermark of each partition task "
        "(epoch seconds; absent until its first with_watermark input has reported)."),
    "streamcore_late_records_dropped_total": (
        "counter", ("job",), "Records dropped by windows and drop_duplicates because they "
        "arrived after the watermark had closed them (also sent to late= if set)."),
    "streamcore_global_table_failures_total": (
        "counter", ("job", "table"), "Global tables whose follower stopped (the table is stale "
        "and /healthz fails until the worker restarts)."),
}
