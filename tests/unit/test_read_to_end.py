"""read_to_end (connectors.reading): when a partition is at its end. Pure logic on a scripted
reader; the broker behaviour it handles is proven against the local broker in
tests/integration/test_state.py."""

from __future__ import annotations

from connectors.base import Message, PartitionReader, TopicPartition
from connectors.memory import MemoryMessage
from connectors.reading import read_to_end

TP = ("changelog", 0)


class _Reader(PartitionReader):
    """A partition holding `true_end` records whose broker reports `reported_end`; fetches
    return whole batches of `batch` records."""

    def __init__(self, true_end: int, reported_end: int, batch: int) -> None:
        self.true_end, self.reported_end, self.batch = true_end, reported_end, batch
        self.pos = 0
        self.waits: list[float] = []  # the timeout of every read that found nothing

    def assign(self, starts: dict[TopicPartition, int]) -> None:
        self.pos = starts[TP]

    def read(self, max_records: int, timeout: float) -> list[Message]:
        n = min(self.batch, self.true_end - self.pos)
        if n <= 0:
            self.waits.append(timeout)
            return []
        msgs = [MemoryMessage(TP[0], 0, o, None, b"", 0, None)
                for o in range(self.pos, self.pos + n)]
        self.pos += n
        return list(msgs)

    def end_offset(self, tp: TopicPartition) -> int:
        return self.reported_end

    def close(self) -> None:
        pass


def test_an_exact_watermark_ends_the_read_without_a_quiet_fetch() -> None:
    reader = _Reader(true_end=50, reported_end=50, batch=10)
    assert read_to_end(reader, {TP: 0}, lambda msgs: None) == {TP: 50}
    assert reader.waits == []  # Kafka: no 0.3 s wait per store at every assignment
    empty = _Reader(true_end=0, reported_end=0, batch=10)
    assert read_to_end(empty, {TP: 0}, lambda msgs: None) == {TP: 0}
    assert empty.waits == []


def test_an_under_reported_watermark_is_read_past_until_a_quiet_fetch() -> None:
    """The local broker reports the base offset of the last batch + 1: 41 for a last batch
    of offsets 40-49. Reading stops only at the true end, after one quiet fetch."""
    reader = _Reader(true_end=50, reported_end=41, batch=10)
    seen: list[int | None] = []
    ends = read_to_end(reader, {TP: 0}, lambda msgs: seen.extend(m.offset() for m in msgs))
    assert ends == {TP: 50} and seen == list(range(50))
    assert reader.waits == [0.3]


class _TransactionalReader(_Reader):
    """A transactional changelog: its last offset is a commit marker, which takes an offset
    that no read returns; the client's position moves past it."""

    def __init__(self, records: int) -> None:
        super().__init__(true_end=records, reported_end=records + 1, batch=10)

    def position(self, tp: TopicPartition) -> int | None:
        return self.pos + 1 if self.pos >= self.true_end else self.pos


def test_a_commit_marker_after_the_last_record_is_the_end() -> None:
    """Epoch mode writes changelogs in transactions. Before: the end (51) was never reached
    by offsets of records (last one 49), so restoring such a changelog never finished."""
    reader = _TransactionalReader(records=50)
    ends = read_to_end(reader, {TP: 0}, lambda msgs: None)
    assert ends == {TP: 51}
    assert reader.waits == [0.3]
