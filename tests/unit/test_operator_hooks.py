"""Operator hooks (streamcore.runtime.context.OperatorHooks), driven by the real worker on the
test driver: timers follow the manual clock, commit hooks run before each commit takes its
offsets, batch-end hooks after every fetched batch, and what a hook emits holds back the
offsets it derives from until it is acknowledged."""

from __future__ import annotations

from typing import Any

from streamcore import JSON, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.runtime.partition import PartitionTask
from streamcore.testing import TestDriver

T0 = 1_700_000_000_000


def _job() -> Job:
    job = Job("hooks", config=WorkerConfig(commit_interval="1s"))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    return job


def _task(d: TestDriver) -> PartitionTask:
    (task,) = d.worker.tasks.values()
    return task


def test_timer_hooks_follow_the_manual_clock() -> None:
    with TestDriver(_job(), start_ms=T0) as d:
        d.send("in", {"i": 0})
        fired: list[int] = []
        _task(d).ctx.hooks.timer.append(fired.append)
        assert fired == []  # no time has passed
        d.advance_time("350ms")
        assert fired and fired[-1] <= T0 + 350 and len(fired) >= 3
        assert fired == sorted(fired)


def test_commit_and_batch_end_hooks_run_at_their_times() -> None:
    with TestDriver(_job(), start_ms=T0) as d:
        d.send("in", {"i": 0})
        task = _task(d)
        calls: list[str] = []
        sink = task._chain  # the chain's entry: a hook emits through the operator's closure

        def at_commit() -> None:
            calls.append("commit")
            sink(None, {"flushed": len(calls)}, T0)  # emitted at commit time

        task.ctx.hooks.commit.append(at_commit)
        task.ctx.hooks.batch_end.append(lambda: calls.append("batch"))
        d.send_many("in", [{"i": 1}, {"i": 2}])
        assert calls == ["batch"]  # one fetched batch, no commit yet
        d.advance_time("1s")
        assert calls == ["batch", "commit"]
        d.advance_time("2s")
        assert d.committed("in") == {0: 3}
        values: list[Any] = [r.value for r in d.read("out")]
        assert values[:3] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert {"flushed": 2} in values  # the hook's output was written


def test_a_hook_output_that_fails_stops_the_worker_like_any_output() -> None:
    with TestDriver(_job(), start_ms=T0) as d:
        d.send("in", {"i": 0})
        d.advance_time("2s")
        assert d.committed("in") == {0: 1}
        task = _task(d)
        task.ctx.hooks.commit.append(lambda: task._chain(None, {"late": True}, T0))
        d.fail_acks()
        d.advance_time("3s")
        assert type(d.exception()).__name__ == "DeliveryFailed"
        assert d.committed("in") == {0: 1}
