"""Job events for Server-Sent Events clients: one schema, one bounded queue per client.

Workers publish from their threads; each client reads from an asyncio queue on the event loop. A slow client
loses its oldest events and never holds up a worker.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

EVENT_NAMES = ("progress", "complete", "error", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    name: str  # one of EVENT_NAMES
    data: dict  # job_id, type, project_id, status, progress, status_message, ... (see worker.job_event)


class EventBus:
    def __init__(self, queue_size: int = 100):
        if queue_size < 1:
            raise ValueError(f"sse_queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self._clients: set[asyncio.Queue] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the clients live on (the app's, at startup)."""
        self._loop = loop

    def publish(self, event: JobEvent) -> None:
        """Safe from any thread; without a loop (no server running) events go nowhere."""
        if event.name not in EVENT_NAMES:
            raise ValueError(f"event name must be one of {EVENT_NAMES}, got {event.name!r}")
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            clients = list(self._clients)
        for queue in clients:
            loop.call_soon_threadsafe(_put_dropping_oldest, queue, event)

    async def subscribe(self) -> AsyncIterator[JobEvent]:
        """Every event published while the caller iterates."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.queue_size)
        with self._lock:
            self._clients.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            with self._lock:
                self._clients.discard(queue)

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)


def _put_dropping_oldest(queue: asyncio.Queue, event: JobEvent) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(event)
