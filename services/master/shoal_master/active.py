"""The active master: the only writer of the global log for its term.

All inputs (local events of every node, commands) go through one queue and are handled one at a
time, so each decision sees the state that every earlier event produced.
"""

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Final, final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from pydantic import TypeAdapter, ValidationError
from shoal_shared import subjects
from shoal_shared.apply import StaleTermError, apply
from shoal_shared.bus import Bus
from shoal_shared.commands import (
    Command,
    CommandRejected,
    CommandReply,
    DeleteInstance,
    PlaceInstance,
)
from shoal_shared.events import (
    Event,
    IndexedEvent,
    LocalEnvelope,
    LocalOrigin,
    NodeDiscovered,
    NodeLost,
    RunnerStatusChanged,
)
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import (
    CommandId,
    ModelId,
    NodeId,
    new_command_id,
    new_instance_id,
    new_runner_id,
)
from shoal_shared.instances import Instance
from shoal_shared.model_card import ModelCard
from shoal_shared.runner_status import RunnerFailed
from shoal_shared.state import State

from shoal_master.decisions import FreshIds, decide, instances_touching, membership_changes
from shoal_master.log_store import SNAPSHOT_INTERVAL, GlobalLogStore

logger = logging.getLogger(__name__)

COMMAND: Final[TypeAdapter[Command]] = TypeAdapter(Command)
REMEMBERED_REPLIES: Final = 4096
CONSUMER_REFRESH_SECONDS: Final = 1.0


class LocalArrival(FrozenModel):
    node_id: NodeId
    sequence: int
    envelope: LocalEnvelope


@final
class CommandArrival:
    def __init__(self, message: Msg, command: Command) -> None:
        self.message = message
        self.command = command


@final
class ActiveMaster:
    def __init__(
        self,
        bus: Bus,
        node_id: NodeId,
        term: int,
        state: State,
        cards: Mapping[ModelId, ModelCard],
        default_model_id: ModelId | None,
        live_peers: Callable[[], Sequence[NodeId] | None],
    ) -> None:
        self._bus = bus
        self._node_id = node_id
        self.term = term
        self._state = state
        self._cards = cards
        self._default_model_id = default_model_id
        # What this node's election hears now (None: no current outcome for this term).
        self._live_peers = live_peers
        self._store = GlobalLogStore(bus, node_id)
        self._inbox: asyncio.Queue[LocalArrival | CommandArrival] = asyncio.Queue()
        self._replies: OrderedDict[CommandId, CommandReply] = OrderedDict()
        self._local_subscriptions: dict[NodeId, Subscription] = {}
        self._command_subscription: Subscription | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self._state

    async def start(self) -> None:
        logged = await self._store.open()
        if (logged.term, logged.last_index) > (self._state.term, self._state.last_index):
            self._state = logged
        if self._state.term > self.term:
            # A deposed master that restarted with its old term: the log already belongs to
            # a newer one, so it must not append (followers would reject it anyway).
            raise StaleTermError(
                f"term {self.term} is older than the log's term {self._state.term}; not appending"
            )
        # A snapshot opens every term: readers start there instead of replaying history.
        await self._store.snapshot(self.term, self._state.model_copy(update={"term": self.term}))
        self._state = self._state.model_copy(update={"term": self.term})
        self._command_subscription = await self._bus.subscribe(
            subjects.COMMANDS, self._on_command, queue="shoal-masters"
        )
        self._worker = asyncio.create_task(self._work())
        logger.info("active master of term %d from index %d", self.term, self._state.last_index)

    async def stop(self) -> None:
        subscriptions = [self._command_subscription, *self._local_subscriptions.values()]
        for subscription in subscriptions:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        self._local_subscriptions.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _consume_local_events(self, node_id: NodeId) -> None:
        if node_id in self._local_subscriptions:
            return
        start = self._state.local_sequences.get(node_id, 0) + 1

        async def on_message(message: Msg) -> None:
            try:
                envelope = LocalEnvelope.model_validate_json(message.data)
            except ValidationError as error:
                logger.warning("dropping a malformed local event from %s: %s", node_id, error)
                return
            sequence = message.metadata.sequence.stream
            self._inbox.put_nowait(
                LocalArrival(node_id=node_id, sequence=sequence, envelope=envelope)
            )

        js = self._bus.jetstream(domain=node_id, timeout=1)
        try:
            self._local_subscriptions[node_id] = await js.subscribe(
                subjects.local_events(node_id),
                stream=subjects.LOCAL_EVENTS_STREAM,
                ordered_consumer=True,
                cb=on_message,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                ),
            )
        except (NatsTimeoutError, NoRespondersError, NotFoundError, ServiceUnavailableError):
            # Not reachable yet (its leaf link is still coming up): the next refresh retries.
            logger.debug("local stream of %s not reachable yet", node_id)

    async def _on_command(self, message: Msg) -> None:
        try:
            command = COMMAND.validate_json(message.data)
        except ValidationError as error:
            rejection = CommandRejected(
                command_id=CommandId("unknown"), code="invalid", reason=f"malformed: {error}"
            )
            await self._bus.reply(message, rejection)
            return
        self._inbox.put_nowait(CommandArrival(message, command))

    async def _work(self) -> None:
        # Membership first: a node that died with the old master must not cost a consumer
        # timeout on its unreachable domain before the first command is answered.
        await self._follow_membership()
        await self._refresh_local_consumers(rejoined=None)
        await self._place_default_model()
        while True:
            await self._follow_membership()
            try:
                arrival = await asyncio.wait_for(self._inbox.get(), CONSUMER_REFRESH_SECONDS)
            except TimeoutError:
                await self._refresh_local_consumers(rejoined=None)
                continue
            if isinstance(arrival, LocalArrival):
                await self._index_local(arrival)
            else:
                reply = await self.handle_command(arrival.command)
                await self._bus.reply(arrival.message, reply)
            await self._place_default_model()

    async def _index_local(self, arrival: LocalArrival) -> None:
        if arrival.sequence <= self._state.local_sequences.get(arrival.node_id, 0):
            return  # indexed already, by this master or an earlier one
        origin = LocalOrigin(node_id=arrival.node_id, sequence=arrival.sequence)
        await self._append_and_react(arrival.envelope.event, origin)

    async def _append_and_react(self, event: Event, origin: LocalOrigin | None) -> None:
        before = self._state
        await self._append(event, origin)
        match event:
            case NodeLost():
                await self._place_again(instances_touching(before, event.node_id))
                await self._refresh_local_consumers(rejoined=None)
            case NodeDiscovered():
                await self._refresh_local_consumers(rejoined=event.node_id)
            case RunnerStatusChanged(status=RunnerFailed()):
                # A ring group cannot heal one rank alone: its other ranks are stuck in (or
                # failed) a collective. The whole instance starts over, on the nodes alive.
                instance = before.instances.get(event.instance_id)
                if instance is not None and len(instance.shards) > 1:
                    await self._place_again((instance,))
            case _:
                await self._refresh_local_consumers(rejoined=None)

    async def _follow_membership(self) -> None:
        live_peers = self._live_peers()
        if live_peers is None:
            return
        for event in membership_changes(self._state, self._node_id, live_peers):
            logger.info("membership: %s %s", event.kind, getattr(event, "node_id", ""))
            await self._append_and_react(event, None)

    async def _refresh_local_consumers(self, rejoined: NodeId | None) -> None:
        """Index the local stream of every live node; a node that comes back gets a fresh
        consumer, since one left on an unreachable domain may be dead."""
        live_peers = self._live_peers()
        known = {*self._state.members, *self._state.nodes} if live_peers is None else live_peers
        wanted = {self._node_id, *known}
        for node_id in [*self._local_subscriptions]:
            if node_id not in wanted or node_id == rejoined:
                subscription = self._local_subscriptions.pop(node_id)
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        for node_id in wanted:
            await self._consume_local_events(node_id)

    async def _place_again(self, instances: tuple[Instance, ...]) -> None:
        for instance in instances:
            await self.handle_command(
                DeleteInstance(command_id=new_command_id(), instance_id=instance.instance_id)
            )
            reply = await self.handle_command(
                PlaceInstance(
                    command_id=new_command_id(),
                    model_id=instance.model_id,
                    sharding=instance.sharding,
                )
            )
            logger.info("placed %s again after a node loss: %s", instance.model_id, reply)

    async def handle_command(self, command: Command) -> CommandReply:
        remembered = self._replies.get(command.command_id)
        if remembered is not None:
            return remembered
        # Only a placement hands out ids, at most one runner per node of the cluster; a chat
        # request (the hot path) draws none.
        runner_count = len(self._state.nodes) if isinstance(command, PlaceInstance) else 0
        fresh = FreshIds(
            instance_id=new_instance_id(),
            runner_ids=tuple(new_runner_id() for _ in range(runner_count)),
        )
        decision = decide(self._state, command, self._cards, fresh)
        for event in decision.events:
            await self._append(event, None)
        self._replies[command.command_id] = decision.reply
        while len(self._replies) > REMEMBERED_REPLIES:
            self._replies.popitem(last=False)
        return decision.reply

    async def _append(self, event: Event, origin: LocalOrigin | None) -> None:
        indexed = IndexedEvent(
            index=self._state.last_index + 1, term=self.term, event=event, origin=origin
        )
        next_state = apply(self._state, indexed)
        await self._store.append(indexed)
        self._state = next_state
        if indexed.index % SNAPSHOT_INTERVAL == SNAPSHOT_INTERVAL - 1:
            await self._store.snapshot(self.term, self._state)

    async def _place_default_model(self) -> None:
        """`shoal run` serves the bundled model out of the box, once this node is known."""
        model_id = self._default_model_id
        if model_id is None or self._node_id not in self._state.nodes:
            return
        self._default_model_id = None
        if any(instance.model_id == model_id for instance in self._state.instances.values()):
            return
        reply = await self.handle_command(
            PlaceInstance(command_id=new_command_id(), model_id=model_id, node_ids=(self._node_id,))
        )
        logger.info("default model %s: %s", model_id, reply.outcome)
