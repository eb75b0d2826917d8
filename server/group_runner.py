"""Concurrent callers' items handled in groups: group commit, group validation.

A durable commit (SQLite synchronous=FULL, PostgreSQL's WAL flush) costs about
the same whatever it writes, so one registration per transaction caps the
coordinator at one fsync per registration; a pyshacl run, likewise, costs mostly
the same for one description or a few dozen. The gRPC service serves many agents
at once: each call submits its item and waits. While one group is being handled
in the runner's own thread (not the shared default executor, where a commit would
queue behind validations), new items queue up and go together in the next group.
There is no timer: a lone caller is served at once and waits no longer than
before; N concurrent callers share one run. `run(items)` returns one result or
exception per item, so one refused item never fails the others. When `run` raises
for a whole group, a runner made with `isolate_failures` runs each item of it alone
(one at a time), so whatever one item raises (a parser's RecursionError, a bug)
reaches only its own caller; without it (the SQL commit, where a group fails as a
whole when the database is unreachable) every caller gets the group's exception.
Each runner has its own worker thread: a service can keep a separate lane for
items that take long (FleetService validates large descriptions in one), so they
never hold up a group of quick ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupRunner(Generic[Item, Result]):
    """Batches `submit` calls made on one event loop into `run` calls in one worker thread."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result | Exception]],
        *,
        max_group: int = 256,
        name: str = "group",
        isolate_failures: bool = False,
    ) -> None:
        self._run = run
        self._max_group = max_group
        self._isolate_failures = isolate_failures
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        #: Groups run and the items in them, so far (for tests and benchmarks).
        self.groups = 0
        self.items = 0

    async def submit(self, item: Item) -> Result:
        """Handle `item` with whatever else is waiting; its own result, or its own exception."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            group = self._queue[: self._max_group]
            del self._queue[: self._max_group]
            self.groups += 1
            self.items += len(group)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_group, [item for item, _ in group]
                )
            except asyncio.CancelledError:  # the loop is shutting down: nobody waits for an answer
                for _, future in group + self._queue:
                    future.cancel()
                self._queue.clear()
                raise
            except Exception as exc:  # the whole group failed (e.g. the database is unreachable)
                results = [exc] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():  # its caller went away (cancelled); what was done stays done
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run_group(self, items: list[Item]) -> Sequence[Result | Exception]:
        """`run` over the group in the worker thread; each item alone if the group raises."""
        try:
            return self._checked(items)
        except Exception:
            if not self._isolate_failures or len(items) == 1:
                raise
        results: list[Result | Exception] = []
        for item in items:
            try:
                results.extend(self._checked([item]))
            except Exception as exc:  # this item's own failure, for its caller alone
                results.append(exc)
        return results

    def _checked(self, items: list[Item]) -> Sequence[Result | Exception]:
        results = self._run(items)
        if len(results) != len(items):
            raise RuntimeError(f"run returned {len(results)} results for {len(items)} items")
        return results

    def close(self) -> None:
        """Wait for the group in flight, then stop the worker thread."""
        self._executor.shutdown(wait=True)
