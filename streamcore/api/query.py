"""The query handle returned by :meth:`Job.start`, shaped after Spark's StreamingQuery."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from streamcore.api.config import WorkerConfig

if TYPE_CHECKING:
    from streamcore.api.job import Job
    from streamcore.runtime.worker import Worker

__all__ = ["StreamingQuery"]


class StreamingQuery:
    """A running job on a background thread with its own event loop.

    ``id`` is the job name (stable across restarts, since the consumer group's offsets are
    the checkpoint); ``run_id`` is new for every start.
    """

    def __init__(self, job: Job, config: WorkerConfig) -> None:
        self._job = job
        self._config = config
        self.run_id = str(uuid.uuid4())
        self._recent: deque[dict[str, Any]] = deque(maxlen=100)
        self._error: BaseException | None = None
        self._worker: Worker | None = None
        self._stop_requested = False
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"streamcore-{job.name}",
                                        daemon=True)

    @classmethod
    def start(cls, job: Job, config: WorkerConfig) -> StreamingQuery:
        q = cls(job, config)
        q._thread.start()
        q._ready.wait()
        if q._error is not None:
            raise q._error
        return q

    def _main(self) -> None:
        from streamcore.runtime.worker import Worker

        async def body() -> None:
            try:
                self._worker = Worker(self._job, self._config, run_id=self.run_id,
                                      on_progress=self._recent.append)
                if self._stop_requested:  # stop() came before the worker existed
                    self._worker.stop()
            finally:
                self._ready.set()
            await self._worker.run()

        try:
            asyncio.run(body())
        except BaseException as exc:  # kept for exception() / await_termination()
            self._error = exc
        finally:
            self._ready.set()
            self._done.set()

    @property
    def id(self) -> str:
        return self._job.name

    @property
    def name(self) -> str:
        return self._job.name

    @property
    def is_active(self) -> bool:
        return not self._done.is_set()

    @property
    def status(self) -> dict[str, Any]:
        w = self._worker
        states = {f"{t}[{p}]": s.value for (t, p), s in (w.assigned.items() if w else [])}
        err = self._error
        out: dict[str, Any] = {
            "isActive": self.is_active,
            "partitions": states,
            "message": (f"Failed: {type(err).__name__}: {err}" if err is not None else
                        "Stopped" if not self.is_active else
                        "Waiting for assignment" if not states else "Processing"),
        }
        if err is not None:
            out["exception"] = f"{type(err).__name__}: {err}"
        return out

    @property
    def last_progress(self) -> dict[str, Any] | None:
        return self._recent[-1] if self._recent else None

    @property
    def recent_progress(self) -> list[dict[str, Any]]:
        return list(self._recent)

    @property
    def worker(self) -> Worker | None:
        return self._worker

    def explain(self) -> str:
        """The physical plan this query runs (laid out for its consumer group)."""
        w = self._worker
        return w.plan.explain() if w is not None else self._job.explain()

    def exception(self) -> BaseException | None:
        return self._error

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: finish the records in flight, commit, leave the group. Waits
        for the end (at most timeout seconds; None: until it has stopped)."""
        self._stop_requested = True
        if self._worker is not None:
            self._worker.stop()
        self._done.wait(timeout)

    def await_termination(self, timeout: float | None = None) -> bool:
        """Block until the query ends (True) or timeout passes (False); re-raise its error."""
        finished = self._done.wait(timeout)
        if finished and self._error is not None:
            raise self._error
        return finished
