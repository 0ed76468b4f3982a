"""The active master's own global stream: create it, rebuild state from it, append to it."""

import logging
from typing import Final, final

from nats.js.errors import NotFoundError
from shoal_shared import streams, subjects
from shoal_shared.apply import apply
from shoal_shared.bus import Bus
from shoal_shared.events import IndexedEvent
from shoal_shared.follower import event_subject, last_snapshot_sequence, snapshot_subject
from shoal_shared.global_log import GLOBAL_LOG_ENTRY, LoggedEvent, LoggedSnapshot
from shoal_shared.ids import NodeId
from shoal_shared.state import State

logger = logging.getLogger(__name__)

# A snapshot every this many events bounds what a starting reader replays.
SNAPSHOT_INTERVAL: Final = 256


@final
class GlobalLogStore:
    def __init__(self, bus: Bus, node_id: NodeId) -> None:
        self._bus = bus
        self._node_id = node_id
        self._js = bus.jetstream(domain=node_id)
        self._last_sequence = 0

    async def open(self) -> State:
        """Create the stream if needed and fold it, from its newest snapshot, into state."""
        await streams.ensure_stream(self._js, streams.global_stream_config(self._node_id))
        info = await self._js.stream_info(subjects.GLOBAL_EVENTS_STREAM)
        self._last_sequence = info.state.last_seq
        state = State()
        first = await last_snapshot_sequence(self._bus, self._node_id)
        for sequence in range(first, self._last_sequence + 1):
            try:
                message = await self._js.get_msg(subjects.GLOBAL_EVENTS_STREAM, sequence)
            except NotFoundError:
                continue
            if message.data is None:
                continue
            entry = GLOBAL_LOG_ENTRY.validate_json(message.data)
            if isinstance(entry, LoggedSnapshot):
                state = entry.state
            elif entry.event.index == state.last_index + 1:
                state = apply(state, entry.event)
        logger.info(
            "global log read: %d entries, state at index %d", info.state.messages, state.last_index
        )
        return state

    async def append(self, indexed: IndexedEvent) -> None:
        # The expected-last-sequence header makes a second writer's append fail instead of
        # interleaving; the message id makes a retried publish a no-op.
        self._last_sequence = await streams.publish_with_retry(
            self._js,
            event_subject(self._node_id),
            LoggedEvent(event=indexed).model_dump_json().encode(),
            {
                "Nats-Msg-Id": f"{indexed.term}.{indexed.index}",
                "Nats-Expected-Last-Sequence": str(self._last_sequence),
            },
        )

    async def snapshot(self, term: int, state: State) -> None:
        self._last_sequence = await streams.publish_with_retry(
            self._js,
            snapshot_subject(self._node_id),
            LoggedSnapshot(term=term, state=state).model_dump_json().encode(),
            {
                "Nats-Msg-Id": f"{term}.{state.last_index}.snapshot",
                "Nats-Expected-Last-Sequence": str(self._last_sequence),
            },
        )
