"""The benchmark's CPU-per-record breakdown by thread (bench/profile.py)."""

from __future__ import annotations

from bench.profile import per_record


def test_broker_threads_are_summed_with_each_busy_ones_share_and_idle_threads_left_out() -> None:
    first = {1: ("python", 1.0), 2: ("rdk:broker111", 0.5), 3: ("rdk:broker111", 0.2),
             4: ("rdk:broker-1", 0.0), 5: ("rdk:main", 0.1)}
    last = {1: ("python", 2.0), 2: ("rdk:broker111", 0.66), 3: ("rdk:broker111", 0.29),
            4: ("rdk:broker-1", 0.000001), 5: ("rdk:main", 0.1),
            6: ("python", 0.05)}  # a thread started between the samples: all its time counts
    assert per_record(first, last, 500_000) == (
        "python 2.10 us, rdk:broker 0.50 us (0.32 + 0.18)")


def test_one_busy_broker_thread_has_no_breakdown() -> None:
    first = {2: ("rdk:broker1", 0.0)}
    last = {1: ("python", 1.0), 2: ("rdk:broker1", 0.25)}
    assert per_record(first, last, 1_000_000) == "python 1.00 us, rdk:broker 0.25 us"
