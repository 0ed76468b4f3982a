"""The `Cluster` the API serves from on a real node: the bus and the state follower."""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, final

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import TypeAdapter, ValidationError
from shoal_shared import subjects
from shoal_shared.bus import Bus
from shoal_shared.commands import Command, CommandReply
from shoal_shared.download_commands import (
    DownloadCommand,
    DownloadCommandAccepted,
    DownloadCommandRejected,
    DownloadCommandReply,
)
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.follower import StateFollower
from shoal_shared.global_log import GLOBAL_LOG_ENTRY, GlobalLogEntry
from shoal_shared.ids import NodeId, TaskId
from shoal_shared.state import State

from shoal_api.context import (
    ChunkSink,
    LogUnavailableError,
    MasterUnavailableError,
    Unsubscribe,
    WorkerUnavailableError,
)
from shoal_api.event_log import EventPage, read_events

COMMAND_REPLY: Final[TypeAdapter[CommandReply]] = TypeAdapter(CommandReply)
DOWNLOAD_REPLY: Final[TypeAdapter[DownloadCommandAccepted | DownloadCommandRejected]] = TypeAdapter(
    DownloadCommandReply
)


@final
class _StreamReader:
    """Random access to the entries of a master's global stream (a `LogReader`)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def bounds(self) -> tuple[int, int]:
        info = await self._js.stream_info(subjects.GLOBAL_EVENTS_STREAM)
        return info.state.first_seq, info.state.last_seq

    async def entry(self, sequence: int) -> GlobalLogEntry | None:
        try:
            message = await self._js.get_msg(subjects.GLOBAL_EVENTS_STREAM, sequence)
        except NotFoundError:
            return None
        if message.data is None:
            return None
        return GLOBAL_LOG_ENTRY.validate_json(message.data)


# Between two asks while no master is subscribed to commands (one is taking over), or no
# worker to its node's download commands (it is starting).
COMMAND_RETRY_SECONDS: Final = 0.2
# How long a worker may take from its node's start to its subscription; past this, a node
# whose worker nothing listens for is reported (it is down, or another version).
WORKER_START_SECONDS: Final = 10.0


@final
class NatsCluster:
    def __init__(
        self,
        bus: Bus,
        follower: StateFollower,
        node_id: NodeId,
        worker_start_seconds: float = WORKER_START_SECONDS,
    ) -> None:
        self._bus = bus
        self._follower = follower
        self._node_id = node_id
        self._worker_start_seconds = worker_start_seconds

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    @property
    def state(self) -> State:
        return self._follower.state

    @property
    def election(self) -> ElectionOutcome | None:
        return self._follower.outcome

    async def send_command(self, command: Command, timeout: float) -> CommandReply:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        while True:
            try:
                return await self._send_once(command, max(give_up_at - loop.time(), 0.1))
            except MasterUnavailableError as error:
                # Nobody subscribed: a master is taking over (it subscribes within a second
                # or two of its election). Commands carry an idempotency id, so asking again
                # is safe; other failures may have been delivered and are not retried.
                if error.maybe_delivered or loop.time() + COMMAND_RETRY_SECONDS > give_up_at:
                    raise
                await asyncio.sleep(COMMAND_RETRY_SECONDS)

    async def _send_once(self, command: Command, timeout: float) -> CommandReply:
        try:
            return await self._bus.request(subjects.COMMANDS, command, COMMAND_REPLY, timeout)
        except NoRespondersError:
            raise MasterUnavailableError(
                "no master is subscribed to commands", maybe_delivered=False
            ) from None
        except TimeoutError:
            # nats-py's TimeoutError is a TimeoutError too.
            raise MasterUnavailableError(
                f"no master answered within {timeout:g} s", maybe_delivered=True
            ) from None
        except ValidationError as error:
            raise MasterUnavailableError(
                f"the master's reply is malformed: {error}", maybe_delivered=True
            ) from None
        except NatsError as error:
            raise MasterUnavailableError(f"the bus failed: {error}", maybe_delivered=True) from None

    async def request_download(
        self, node_id: NodeId, command: DownloadCommand, timeout: float
    ) -> DownloadCommandAccepted | DownloadCommandRejected:
        subject = subjects.downloads(node_id)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        # A node's API answers before its worker has subscribed (a pull right after
        # `shoal run`). Nothing is delivered to a subject without subscribers, so asking again
        # is safe even though download commands carry no idempotency id.
        unsubscribed_until = loop.time() + min(timeout, self._worker_start_seconds)
        while True:
            try:
                return await self._bus.request(
                    subject, command, DOWNLOAD_REPLY, max(give_up_at - loop.time(), 0.1)
                )
            except NoRespondersError:
                if loop.time() + COMMAND_RETRY_SECONDS > unsubscribed_until:
                    raise WorkerUnavailableError(
                        f"the worker of node {node_id} did not answer: nothing listens on {subject}"
                    ) from None
                await asyncio.sleep(COMMAND_RETRY_SECONDS)
            except TimeoutError:
                raise WorkerUnavailableError(
                    f"the worker of node {node_id} did not answer within {timeout:g} s"
                ) from None
            except ValidationError as error:
                raise WorkerUnavailableError(
                    f"the worker of node {node_id} answered with a malformed reply: {error}"
                ) from None
            except NatsError as error:
                raise WorkerUnavailableError(
                    f"the worker of node {node_id} did not answer: the bus failed: {error}"
                ) from None

    async def subscribe_chunks(self, task_id: TaskId, sink: ChunkSink) -> Unsubscribe:
        async def on_message(message: Msg) -> None:
            sink(message.data)

        try:
            subscription = await self._bus.subscribe(subjects.chunks(task_id), on_message)
        except NatsError as error:
            raise MasterUnavailableError(
                f"cannot subscribe on the bus: {error}", maybe_delivered=False
            ) from None

        async def unsubscribe() -> None:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()

        try:
            # One round trip to our server: the subscription is registered there before the
            # command that makes a worker publish to it is sent.
            await self._bus.flush()
        except (TimeoutError, NatsError) as error:
            await unsubscribe()
            raise MasterUnavailableError(
                f"this node's NATS server is unreachable: {error}", maybe_delivered=False
            ) from None
        return unsubscribe

    async def read_events(self, since: int, limit: int) -> EventPage:
        election = self._follower.outcome
        if election is None:
            raise LogUnavailableError("no master is known yet")
        reader = _StreamReader(self._bus.jetstream(domain=election.master_node_id))
        try:
            return await read_events(reader, since, limit)
        except NotFoundError:
            raise LogUnavailableError(
                f"master {election.master_node_id} has no global stream yet"
            ) from None
        except (TimeoutError, NatsError) as error:
            raise LogUnavailableError(str(error) or type(error).__name__) from None

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout: float) -> bool:
        try:
            await self._follower.wait_for(predicate, timeout)
        except TimeoutError:
            return False
        return True
