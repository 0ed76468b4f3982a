"""Appends this node's local events in order, off the hot path of token forwarding."""

import asyncio
import contextlib
import logging
from typing import final

from shoal_shared import streams
from shoal_shared.bus import Bus
from shoal_shared.events import Event
from shoal_shared.ids import NodeId

logger = logging.getLogger(__name__)


@final
class LocalEventSink:
    def __init__(self, bus: Bus, node_id: NodeId) -> None:
        self._bus = bus
        self._node_id = node_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain())

    def emit(self, event: Event) -> None:
        self._queue.put_nowait(event)

    async def flush(self) -> None:
        await self._queue.join()

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=5)
        if self._task is not None:
            self._task.cancel()

    async def _drain(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await streams.append_local_event(self._bus, self._node_id, event)
            except ConnectionError:
                logger.exception("a local event was not stored: %s", event.kind)
            finally:
                self._queue.task_done()
