"""Benchmarks: streamcore against the raw confluent-kafka loop, in the same run."""
