"""Test support: a real nats-server with a fake master and election around the API.

The API's tests (and those of the API flavours added later) run the real HTTP stack over a
real nats-server; `FakeMaster` stands in for the election (answers the node's query), the
active master (writes the global log, answers commands) and the worker (publishes a task's
chunks); `emit` takes a worker's local events (from a real `DownloadManager`, say) into the
log. The real ones are tested in their own services. Nothing here runs in production.
"""

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, final

from fastapi import FastAPI
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from pydantic import TypeAdapter
from shoal_shared import streams, subjects
from shoal_shared.apply import apply
from shoal_shared.bus import Bus
from shoal_shared.chunks import Chunk, FinishChunk, TokenChunk, Usage
from shoal_shared.commands import (
    CancelTask,
    Command,
    CommandAccepted,
    CommandRejected,
    CommandReply,
    DeleteInstance,
    PlaceInstance,
    RejectionCode,
    SubmitTask,
)
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeTelemetryUpdated,
    RunnerStatusChanged,
)
from shoal_shared.follower import event_subject
from shoal_shared.global_log import LoggedEvent
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.model_card import ModelCard, builtin_cards
from shoal_shared.runner_status import RunnerReady
from shoal_shared.settings import NodeSettings
from shoal_shared.state import State
from shoal_shared.tasks import ChatTask
from shoal_shared.telemetry import NodeTelemetry

from shoal_api.service import bind_socket, serve

COMMAND: Final[TypeAdapter[Command]] = TypeAdapter(Command)
TEST_NODE_ID: Final = NodeId("node-apitest")
# How long the API under test waits for a worker to subscribe (a node's is 10 s): short, so
# that a test of a worker that is gone does not wait as long.
WORKER_START_SECONDS_IN_TESTS: Final = 2.0
TEST_INSTANCE_ID: Final = InstanceId("inst-ready")
TEST_RUNNER_ID: Final = RunnerId("runner-ready")
BUNDLED_MODEL_ID: Final = ModelId("smollm2-135m")
# A model with a card but, in the test cluster, no instance.
UNPLACED_MODEL_ID: Final = ModelId("unplaced-model")
ANSWER: Final = ("The", " capital", " is", " Paris", ".")
ANSWER_PROMPT_TOKENS: Final = 11

# What the fake worker publishes for a task: chunks, or raw bytes to test malformed ones.
ChunkScript = Callable[[ChatTask], Sequence[Chunk | bytes]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_settings(home: Path) -> NodeSettings:
    return NodeSettings(
        home=home,
        api_host="127.0.0.1",
        api_port=free_port(),
        nats_port=free_port(),
        leaf_port=free_port(),
    )


def token_chunks(task: ChatTask, texts: Sequence[str], start: int = 0) -> list[Chunk]:
    return [
        TokenChunk(task_id=task.task_id, sequence=start + n, text=text, token_ids=(n,))
        for n, text in enumerate(texts)
    ]


def answer_script(task: ChatTask) -> list[Chunk]:
    """A well-behaved worker: five tokens, then a finish chunk with usage."""
    finish = FinishChunk(
        task_id=task.task_id,
        sequence=len(ANSWER),
        finish_reason="stop",
        usage=Usage(prompt_tokens=ANSWER_PROMPT_TOKENS, completion_tokens=len(ANSWER)),
    )
    return [*token_chunks(task, ANSWER), finish]


def cards_for_tests() -> dict[ModelId, ModelCard]:
    cards = dict(builtin_cards())
    unplaced = cards[BUNDLED_MODEL_ID].model_copy(
        update={"model_id": UNPLACED_MODEL_ID, "name": "Unplaced"}
    )
    return {**cards, UNPLACED_MODEL_ID: unplaced}


def telemetry() -> NodeTelemetry:
    return NodeTelemetry(
        hostname="test",
        platform="linux",
        chip="cpu",
        backend="cpu",
        cpu_cores=2,
        memory_total_bytes=8 << 30,
        memory_available_bytes=4 << 30,
    )


def single_shard_instance(
    instance_id: InstanceId, runner_id: RunnerId, card: ModelCard, node_id: NodeId
) -> Instance:
    shard = ShardAssignment(
        runner_id=runner_id, node_id=node_id, rank=0, start_layer=0, end_layer=card.layers
    )
    return Instance(
        instance_id=instance_id,
        model_id=card.model_id,
        sharding="pipeline",
        layer_count=card.layers,
        shards=(shard,),
    )


def ready_cluster(
    node_id: NodeId, card: ModelCard, instance_id: InstanceId, runner_id: RunnerId
) -> tuple[Event, ...]:
    """A one-node cluster with one ready instance of `card`'s model."""
    return (
        MasterElected(master_node_id=node_id, term=1),
        NodeTelemetryUpdated(node_id=node_id, telemetry=telemetry()),
        InstanceCreated(instance=single_shard_instance(instance_id, runner_id, card, node_id)),
        RunnerStatusChanged(
            runner_id=runner_id, instance_id=instance_id, node_id=node_id, status=RunnerReady()
        ),
    )


@contextlib.asynccontextmanager
async def serving(
    app: FastAPI, on_stop: Callable[[], None] | None = None
) -> AsyncGenerator[str, None]:
    """Serve `app` with uvicorn on a free loopback port; yields its base URL."""
    listener = bind_socket("127.0.0.1", 0)
    port = int(listener.getsockname()[1])
    task = asyncio.create_task(serve(app, listener, on_stop))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@final
class FakeMaster:
    def __init__(self, bus: Bus, node_id: NodeId, cards: Mapping[ModelId, ModelCard]) -> None:
        self.bus = bus
        self.node_id = node_id
        self.cards = cards
        self.script: ChunkScript = answer_script
        self.submit_rejection: RejectionCode | None = None
        # False: commands are handled but never answered, as by a master that hangs.
        self.replying = True
        self.commands: list[Command] = []
        self.cancelled: asyncio.Queue[TaskId] = asyncio.Queue()
        self.state = State()
        self._election: Subscription | None = None
        self._commands: Subscription | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._emitted: asyncio.Queue[Event] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._indexing: asyncio.Task[None] | None = None

    async def start(self, events: Sequence[Event]) -> None:
        self._loop = asyncio.get_running_loop()
        js = self.bus.jetstream(domain=self.node_id)
        async with asyncio.timeout(20):
            while True:  # JetStream needs a moment after the server starts
                try:
                    await streams.ensure_stream(js, streams.global_stream_config(self.node_id))
                    break
                except (NatsError, TimeoutError):
                    await asyncio.sleep(0.1)
        for event in events:
            await self.append(event)
        self._election = await self.bus.subscribe(
            subjects.election_query(self.node_id), self._on_query
        )
        self._commands = await self.bus.subscribe(subjects.COMMANDS, self._on_command)
        self._indexing = asyncio.create_task(self._index_emitted())

    async def stop(self) -> None:
        if self._indexing is not None:
            self._indexing.cancel()
            await asyncio.gather(self._indexing, return_exceptions=True)
        await self.stop_answering_commands()
        if self._election is not None:
            await self._election.unsubscribe()
        for task in self._publishing:
            task.cancel()
        await asyncio.gather(*self._publishing, return_exceptions=True)

    async def stop_answering_commands(self) -> None:
        """From now on a command finds no responders, as while no master is elected."""
        if self._commands is not None:
            await self._commands.unsubscribe()
            await self.bus.flush()
            self._commands = None

    async def append(self, event: Event) -> None:
        indexed = IndexedEvent(index=self.state.last_index + 1, term=1, event=event)
        self.state = apply(self.state, indexed)
        await self.bus.jetstream(domain=self.node_id).publish(
            event_subject(self.node_id), LoggedEvent(event=indexed).model_dump_json().encode()
        )

    def emit(self, event: Event) -> None:
        """A worker's local event, appended to the log in order (as the real master indexes
        local streams). Safe from any thread: workers emit from `asyncio.to_thread` too."""
        assert self._loop is not None, "the fake master was not started"
        self._loop.call_soon_threadsafe(self._emitted.put_nowait, event)

    async def _index_emitted(self) -> None:
        while True:
            await self.append(await self._emitted.get())

    def submitted(self) -> list[ChatTask]:
        return [command.task for command in self.commands if isinstance(command, SubmitTask)]

    async def _on_query(self, message: Msg) -> None:
        await self.bus.reply(message, ElectionOutcome(master_node_id=self.node_id, term=1))

    async def _on_command(self, message: Msg) -> None:
        command = COMMAND.validate_json(message.data)
        self.commands.append(command)
        reply = await self._decide(command)
        if not self.replying:
            return
        await self.bus.reply(message, reply)
        if isinstance(command, SubmitTask) and isinstance(reply, CommandAccepted):
            # Apart from this callback: a script may stall, and cancels arrive here too.
            task = asyncio.create_task(self._publish_chunks(command.task))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _decide(self, command: Command) -> CommandReply:
        accepted = CommandAccepted(command_id=command.command_id)

        def rejected(code: RejectionCode, reason: str) -> CommandRejected:
            return CommandRejected(command_id=command.command_id, code=code, reason=reason)

        match command:
            case SubmitTask():
                if self.submit_rejection is not None:
                    return rejected(self.submit_rejection, f"rejected: {self.submit_rejection}")
                return accepted.model_copy(update={"created_id": command.task.task_id})
            case CancelTask():
                self.cancelled.put_nowait(command.task_id)
                return accepted
            case PlaceInstance():
                card = self.cards.get(command.model_id)
                if card is None:
                    return rejected("not_found", f"unknown model {command.model_id!r}")
                number = len(self.state.instances) + 1
                instance = single_shard_instance(
                    InstanceId(f"inst-{number}"), RunnerId(f"runner-{number}"), card, self.node_id
                )
                await self.append(InstanceCreated(instance=instance))
                return accepted.model_copy(update={"created_id": instance.instance_id})
            case DeleteInstance():
                if command.instance_id not in self.state.instances:
                    return rejected("not_found", f"no instance {command.instance_id!r}")
                await self.append(InstanceDeleted(instance_id=command.instance_id))
                return accepted

    async def _publish_chunks(self, task: ChatTask) -> None:
        for chunk in self.script(task):
            payload = chunk if isinstance(chunk, bytes) else chunk.model_dump_json().encode()
            await self.bus.client.publish(subjects.chunks(task.task_id), payload)
