"""Job change notifications from the job thread to asyncio watchers (WatchJob streams).

The runner calls `publish(job_id)` from its thread after every state change;
each subscriber is an asyncio.Queue on the coordinator's loop that receives the
job id (or None when the coordinator stops), so watchers wake exactly when
something changed instead of polling the database.
"""

from __future__ import annotations

import asyncio
import contextlib


class JobEvents:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: set[asyncio.Queue[int | None]] = set()

    def subscribe(self) -> asyncio.Queue[int | None]:
        """Call on the loop; the queue gets every changed job id until unsubscribed."""
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[int | None]) -> None:
        self._queues.discard(queue)

    def publish(self, job_id: int | None) -> None:
        """Safe from any thread; None tells watchers the coordinator is stopping."""
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is watching any more
            self._loop.call_soon_threadsafe(self._fan_out, job_id)

    def _fan_out(self, job_id: int | None) -> None:
        for queue in list(self._queues):
            queue.put_nowait(job_id)
