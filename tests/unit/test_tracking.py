from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamcore.core.errors import DeliveryFailed
from streamcore.runtime.tracking import OffsetTracker


class _Msg:
    def topic(self) -> str:
        return "out"


def test_done_offset_waits_for_every_acknowledgement() -> None:
    t = OffsetTracker()
    b1 = t.open()
    b1.pending = 2
    b1.seal(9)
    b2 = t.open()
    b2.seal(19)  # filtered everything: nothing pending
    assert t.advance() == -1  # b2 is done but b1 before it is not
    b1.ack(None, _Msg())
    assert t.advance() == -1
    b1.ack(None, _Msg())
    assert t.advance() == 19


def test_unsealed_batch_is_never_done() -> None:
    t = OffsetTracker()
    b = t.open()
    assert t.advance() == -1
    b.seal(4)
    assert t.advance() == 4


def test_failed_delivery_blocks_its_batch_and_everything_after() -> None:
    t = OffsetTracker()
    b1 = t.open()
    b1.pending = 1
    b1.seal(5)
    b2 = t.open()
    b2.seal(9)
    b1.ack("MSG_TIMED_OUT", _Msg())
    assert isinstance(t.failure, DeliveryFailed)
    assert t.failure.topic == "out"
    assert t.advance() == -1


def test_discard_open_drops_only_unsealed_tail() -> None:
    t = OffsetTracker()
    b1 = t.open()
    b1.seal(3)
    t.open()
    t.discard_open()
    assert t.all_done()
    assert t.done_offset == 3


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 5)), min_size=1, max_size=30),
       st.randoms())
def test_done_offset_never_passes_an_unacknowledged_output(
        batches: list[tuple[int, int]], rnd: object) -> None:
    t = OffsetTracker()
    opened = []
    last = -1
    for size, outputs in batches:
        b = t.open()
        b.pending = outputs
        last += size
        b.seal(last)
        opened.append((b, last, outputs))
    acks = [(i, b) for i, (b, _, n) in enumerate(opened) for _ in range(n)]
    rnd.shuffle(acks)  # type: ignore[attr-defined]
    for _, b in acks:
        b.ack(None, _Msg())
        done = t.advance()
        # Every batch at or below the done offset has all its outputs acknowledged.
        for b2, end, _ in opened:
            if end <= done:
                assert b2.pending == 0
    assert t.advance() == last
