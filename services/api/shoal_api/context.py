"""What the routes need from the node: a view of the cluster, the model cards, timeouts.

`Cluster` is a small interface so that the routes never touch NATS directly; `NatsCluster`
(nats_cluster.py) implements it over the bus and the state follower.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Protocol, final

from pydantic import Field
from shoal_shared.commands import Command, CommandReply
from shoal_shared.download_commands import (
    DownloadCommand,
    DownloadCommandAccepted,
    DownloadCommandRejected,
)
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, NodeId, TaskId
from shoal_shared.model_card import ModelCard
from shoal_shared.state import State

from shoal_api.event_log import EventPage

logger = logging.getLogger(__name__)

ChunkSink = Callable[[bytes], None]
Unsubscribe = Callable[[], Awaitable[None]]


class MasterUnavailableError(ConnectionError):
    """No active master answered a command (no responders, or no reply in time)."""

    def __init__(self, message: str, maybe_delivered: bool) -> None:
        super().__init__(message)
        # False when no master can have seen the command (nobody was subscribed); True when
        # one may have acted on it and only its reply is missing (a timeout).
        self.maybe_delivered = maybe_delivered


class LogUnavailableError(ConnectionError):
    """The master's global stream could not be read."""


class WorkerUnavailableError(ConnectionError):
    """A node's worker did not answer a download command (none listening, or no reply)."""


class Cluster(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    @property
    def state(self) -> State:
        """This node's replica of the cluster state (may lag the master by a few ms)."""
        ...

    @property
    def election(self) -> ElectionOutcome | None:
        """The current master and term as this node's election knows them; None before."""
        ...

    async def send_command(self, command: Command, timeout: float) -> CommandReply:
        """Raises MasterUnavailableError when no master answers within `timeout`."""
        ...

    async def request_download(
        self, node_id: NodeId, command: DownloadCommand, timeout: float
    ) -> DownloadCommandAccepted | DownloadCommandRejected:
        """Ask that node's worker directly (not the master: the files are on that node).
        Raises WorkerUnavailableError when it does not answer within `timeout`."""
        ...

    async def subscribe_chunks(self, task_id: TaskId, sink: ChunkSink) -> Unsubscribe:
        """Deliver every chunk payload of the task to `sink`, in arrival order."""
        ...

    async def read_events(self, since: int, limit: int) -> EventPage:
        """Indexed events from the master's global log; raises LogUnavailableError."""
        ...

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout: float) -> bool:
        """Wait until the replica satisfies `predicate`; False on timeout."""
        ...


def replica_is_live(cluster: Cluster) -> bool:
    """True once the node knows its master and has read that master's log (a snapshot or an
    event of a term); before that, state is empty and answers built on it would mislead."""
    return cluster.election is not None and cluster.state.term >= 1


class ApiTimeouts(FrozenModel):
    command_seconds: float = Field(default=5.0, gt=0)
    # A chunk stream that stays silent this long is failed rather than left hanging.
    chunk_seconds: float = Field(default=120.0, gt=0)
    # After a placement is accepted, how long to wait for it to show in this node's replica
    # so that a client's next GET /state sees it.
    replica_catch_up_seconds: float = Field(default=2.0, ge=0)
    # A worker answers download commands at once (the download itself runs on after).
    worker_seconds: float = Field(default=10.0, gt=0)
    # Adding a hub model reads its listing and config.json, with retries on 429/5xx.
    add_model_seconds: float = Field(default=60.0, gt=0)
    # After a model is added, how long to wait for its card to reach this node's replica,
    # so that the client's next request (a download, a placement) knows the model.
    model_added_seconds: float = Field(default=5.0, ge=0)


@final
class BackgroundWork:
    """Fire-and-forget I/O (cancelling a task, unsubscribing) that must not be cut short by
    the cancellation of the request that caused it; `drain` lets shutdown finish it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.warning("background work %s failed: %s", task.get_name(), error)

    async def drain(self, timeout: float) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


class AbortableSession(Protocol):
    def abort(self, message: str) -> None: ...


@final
class ApiContext:
    def __init__(
        self,
        cluster: Cluster,
        cards: Mapping[ModelId, ModelCard],
        timeouts: ApiTimeouts | None = None,
    ) -> None:
        self.cluster = cluster
        self._builtin_cards = cards
        self.timeouts = timeouts or ApiTimeouts()
        self.background = BackgroundWork()
        # Chat sessions whose task may still be running (see inference.ChatSession).
        self.open_sessions: set[AbortableSession] = set()

    def abort_sessions(self, message: str) -> None:
        """End every open chat session with an error: at shutdown, streams then end at once
        (with an error event and a cancelled task) instead of being cut off mid-chunk."""
        for session in list(self.open_sessions):
            session.abort(message)

    @property
    def cards(self) -> Mapping[ModelId, ModelCard]:
        """The catalogue plus the models added at run time (from the cluster's state)."""
        added = self.cluster.state.added_models
        return {**self._builtin_cards, **added} if added else self._builtin_cards

    @property
    def node_id(self) -> NodeId:
        return self.cluster.node_id
