"""Server-Sent Events for the WoT directory: thing_created, thing_updated, thing_deleted.

The registry announces changes from whatever thread wrote them; the hub hands
each event to every connected client's asyncio queue on that client's loop. A
slow client whose queue is full loses events rather than holding up writers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Final

from starlette.requests import Request
from starlette.responses import StreamingResponse

EVENT_TYPES: Final = ("thing_created", "thing_updated", "thing_deleted")
KEEPALIVE_S: Final = 15.0


class EventHub:
    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[str, str]]]] = set()
        self._lock = threading.Lock()

    def publish(self, event: str, thing_id: str) -> None:
        """Called by the registry after a committed change (any thread)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            loop.call_soon_threadsafe(_offer, queue, (event, thing_id))

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[str, str]]]:
        entry = (asyncio.get_running_loop(), asyncio.Queue[tuple[str, str]](self._queue_size))
        with self._lock:
            self._subscribers.add(entry)
        return entry

    def unsubscribe(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[str, str]]]) -> None:
        with self._lock:
            self._subscribers.discard(entry)

    async def stream(self, request: Request, wanted: frozenset[str]) -> AsyncIterator[bytes]:
        entry = self.subscribe()
        queue = entry[1]
        try:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event, thing_id = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if event in wanted:
                    data = json.dumps({"id": thing_id})
                    yield f"event: {event}\ndata: {data}\n\n".encode()
        finally:
            self.unsubscribe(entry)


def _offer(queue: asyncio.Queue[tuple[str, str]], item: tuple[str, str]) -> None:
    if not queue.full():
        queue.put_nowait(item)


def sse_response(hub: EventHub, request: Request, event_type: str | None = None) -> StreamingResponse:
    wanted = frozenset([event_type] if event_type else EVENT_TYPES)
    return StreamingResponse(
        hub.stream(request, wanted),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
