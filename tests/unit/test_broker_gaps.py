"""A broker that passes over records a fetch should have returned (the local broker does,
when two producers write one partition at once: README, "The local broker"). A repartition
topic in continuous mode is written by non-transactional producers and never compacted, so
its offsets have no gaps on Kafka: a gap there means records passed over, which the task
reads again rather than lose."""

from __future__ import annotations

from connectors.memory import ABORTED
from streamcore.runtime.gaps import GAP_READS
from streamcore.testing import TestDriver
from tests.unit.test_driver import _totals_job as totals_job


def _three_more_read_again(d: TestDriver) -> None:
    """After a 1 for "a" and a gap to come: three more records, all of them taken."""
    d.send_many("in", [{"user": "a", "amount": n} for n in (10, 100, 1000)])
    d.advance_time("1s")
    assert [r.value for r in d.read("out")] == [1, 11, 111, 1111]
    assert d.store("per-user")["a"] == 1111
    assert d.committed("gaps-per-user-repartition") == {0: 4}
    assert d.worker.gaps.reads_again == 1


def test_records_a_fetch_passed_over_in_a_repartition_topic_are_read_again() -> None:
    with TestDriver(totals_job("gaps")) as d:
        d.send("in", {"user": "a", "amount": 1}, key="a")
        # The next two records written to the repartition topic are passed over by the
        # first fetch that returns a record after them.
        d.cluster.serve_gap("gaps-per-user-repartition", 0, 2)
        _three_more_read_again(d)


def test_records_the_first_fetch_after_a_restart_passed_over_are_read_again() -> None:
    """A task's first fetch has no batch before it to compare with: it must begin at the
    group's committed offset, where the reader started."""
    with TestDriver(totals_job("gaps")) as d:
        d.send("in", {"user": "a", "amount": 1}, key="a")
        d.commit()
        assert d.committed("gaps-per-user-repartition") == {0: 1}
        d.crash()
        # The restarted worker's first fetch of the repartition partition passes over the
        # first two records written after the restart.
        d.cluster.serve_gap("gaps-per-user-repartition", 0, 2)
        _three_more_read_again(d)


def test_records_passed_over_within_a_fetch_are_read_again() -> None:
    """The fetch returns records on both sides of those it passed over."""
    with TestDriver(totals_job("gaps")) as d:
        # Of the four records written to the repartition topic, the middle two are passed
        # over by the fetch that returns the first and the last.
        d.cluster.serve_gap("gaps-per-user-repartition", 0, 2, after=1)
        d.send_many("in", [{"user": "a", "amount": n} for n in (1, 10, 100, 1000)])
        d.advance_time("1s")
        assert [r.value for r in d.read("out")] == [1, 11, 111, 1111]
        assert d.committed("gaps-per-user-repartition") == {0: 4}
        assert d.worker.gaps.reads_again == 1


def test_a_gap_that_stays_is_taken_after_the_reads_again() -> None:
    """Offsets an earlier epoch-mode run left to transaction markers stay missing however
    often they are read again: the task then takes the batch (bounded reads, no stall)."""
    with TestDriver(totals_job("gaps")) as d:
        d.send("in", {"user": "a", "amount": 1}, key="a")
        # An aborted record: never readable, so its offset is missing from every read.
        d.cluster.append("gaps-per-user-repartition", 0, b"x", b"x", 0, None, txn=ABORTED)
        d.send("in", {"user": "a", "amount": 100}, key="a")
        d.advance_time("1s")
        assert [r.value for r in d.read("out")] == [1, 101]
        assert d.committed("gaps-per-user-repartition") == {0: 3}
        assert d.worker.gaps.reads_again == GAP_READS  # read again, found the same: taken
