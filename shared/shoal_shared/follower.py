"""A live replica of cluster state, folded from the active master's global stream.

Every process that needs state (a standby master, the worker, the API) runs one. It learns
who the master is from its node's election process and reads that master's stream from the
newest snapshot on, so a change of master or a restart never replays the whole history.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final, final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from pydantic import ValidationError

from shoal_shared import subjects
from shoal_shared.apply import EventOutOfOrderError, StaleTermError, apply
from shoal_shared.bus import Bus
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.events import IndexedEvent
from shoal_shared.global_log import GLOBAL_LOG_ENTRY, LoggedEvent, LoggedSnapshot
from shoal_shared.ids import NodeId
from shoal_shared.state import State

logger = logging.getLogger(__name__)

EVENT_SUFFIX: Final = "event"
SNAPSHOT_SUFFIX: Final = "snapshot"
ELECTION_QUERY_INTERVAL_SECONDS: Final = 0.5

StateListener = Callable[[State, IndexedEvent | None], None]


def event_subject(master_node_id: NodeId) -> str:
    return f"{subjects.global_events(master_node_id)}.{EVENT_SUFFIX}"


def snapshot_subject(master_node_id: NodeId) -> str:
    return f"{subjects.global_events(master_node_id)}.{SNAPSHOT_SUFFIX}"


async def last_snapshot_sequence(bus: Bus, master_node_id: NodeId) -> int:
    """Sequence of the newest snapshot in the master's stream, or 1 (its start) if none."""
    # Short: right after an election the leaf link to a new master may still be coming up,
    # and the caller retries.
    js = bus.jetstream(domain=master_node_id, timeout=1)
    try:
        message = await js.get_last_msg(
            subjects.GLOBAL_EVENTS_STREAM, snapshot_subject(master_node_id)
        )
    except NotFoundError:
        return 1
    return message.seq or 1


@final
class StateFollower:
    def __init__(self, bus: Bus, node_id: NodeId) -> None:
        self._bus = bus
        self._node_id = node_id
        self._state = State()
        self._outcome: ElectionOutcome | None = None
        self._stream_subscription: Subscription | None = None
        self._outcome_subscription: Subscription | None = None
        self._listeners: list[StateListener] = []
        self._changed = asyncio.Condition()
        self._follow_task: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def outcome(self) -> ElectionOutcome | None:
        return self._outcome

    def add_listener(self, listener: StateListener) -> None:
        """Called synchronously after every change, in log order."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self._outcome_subscription = await self._bus.subscribe(
            subjects.election_outcome(self._node_id), self._on_outcome_message
        )
        # The election announces periodically; asking as well saves waiting for the next one.
        while self._outcome is None:
            try:
                reply = await self._bus.client.request(
                    subjects.election_query(self._node_id), b"", timeout=1
                )
            except (NatsTimeoutError, NoRespondersError):
                await asyncio.sleep(ELECTION_QUERY_INTERVAL_SECONDS)
                continue
            await self._switch_to(ElectionOutcome.model_validate_json(reply.data))

    async def stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
        for subscription in (self._outcome_subscription, self._stream_subscription):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def wait_for(self, predicate: Callable[[State], bool], timeout: float) -> State:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self._state))
            return self._state

    async def _on_outcome_message(self, message: Msg) -> None:
        try:
            outcome = ElectionOutcome.model_validate_json(message.data)
        except ValidationError:
            logger.warning("ignoring a malformed election outcome")
            return
        await self._switch_to(outcome)

    async def _switch_to(self, outcome: ElectionOutcome) -> None:
        current = self._outcome
        if current is not None and outcome.term < current.term:
            return
        self._outcome = outcome
        if current is not None and current.master_node_id == outcome.master_node_id:
            return
        if self._follow_task is not None:
            self._follow_task.cancel()
        # In the background: the new master may not have created its stream yet.
        self._follow_task = asyncio.create_task(self._follow(outcome.master_node_id))
        logger.info(
            "following the global log of %s (term %d)", outcome.master_node_id, outcome.term
        )

    async def _follow(self, master_node_id: NodeId) -> None:
        if self._stream_subscription is not None:
            with contextlib.suppress(Exception):
                await self._stream_subscription.unsubscribe()
            self._stream_subscription = None
        while True:
            try:
                start = await last_snapshot_sequence(self._bus, master_node_id)
                js = self._bus.jetstream(domain=master_node_id, timeout=1)
                self._stream_subscription = await js.subscribe(
                    f"{subjects.global_events(master_node_id)}.>",
                    stream=subjects.GLOBAL_EVENTS_STREAM,
                    ordered_consumer=True,
                    cb=self._on_log_message,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                    ),
                )
                return
            except (
                NatsTimeoutError,
                NoRespondersError,
                NotFoundError,
                ServiceUnavailableError,
            ) as error:
                logger.debug("global stream of %s not ready: %s", master_node_id, error)
                await asyncio.sleep(0.2)

    async def _on_log_message(self, message: Msg) -> None:
        entry = GLOBAL_LOG_ENTRY.validate_json(message.data)
        match entry:
            case LoggedSnapshot():
                if entry.state.last_index > self._state.last_index or (
                    entry.state.term > self._state.term
                ):
                    self._state = entry.state
                    await self._notify(None)
            case LoggedEvent():
                indexed = entry.event
                if indexed.index <= self._state.last_index:
                    return
                try:
                    self._state = apply(self._state, indexed)
                except (EventOutOfOrderError, StaleTermError) as error:
                    logger.warning("global log entry not applied: %s", error)
                    return
                await self._notify(indexed)

    async def _notify(self, indexed: IndexedEvent | None) -> None:
        for listener in self._listeners:
            listener(self._state, indexed)
        async with self._changed:
            self._changed.notify_all()
