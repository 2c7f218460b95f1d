"""The event queue of a Serf RPC client: bounded, never blocking its reader.

Replies to calls share the connection with the event stream, so the reader
must never wait for the consumer. When the queue is full, new events are
dropped (the agent would drop them anyway: it buffers 512 per stream) and a
``StreamGap("overflow")`` marks the hole as soon as there is room, so the
consumer knows to re-read ``members``.
"""

from __future__ import annotations

import asyncio
import logging

from meshd.gossip.messages import SerfEvent, StreamGap

log = logging.getLogger(__name__)


class EventQueue:
    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[SerfEvent] = asyncio.Queue(maxsize=max(2, size))
        self._gap = False
        self.dropped = 0
        """Events dropped because the consumer was behind."""

    def put(self, event: SerfEvent) -> None:
        if self._gap and self._queue.maxsize - self._queue.qsize() >= 2:
            self._queue.put_nowait(StreamGap("overflow"))
            self._gap = False
        if self._queue.full():
            if self.dropped == 0 or not self._gap:
                log.warning("Serf event queue full; dropping events until the reader catches up")
            self.dropped += 1
            self._gap = True
            return
        self._queue.put_nowait(event)

    async def get(self) -> SerfEvent:
        return await self._queue.get()

    def get_nowait(self) -> SerfEvent | None:
        """The next queued event, or None when the queue is empty."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
