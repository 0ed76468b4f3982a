"""One supervised runner: start it, forward what it says, restart it when it dies.

Token chunks go straight to the requesting API on `shoal.chunks.<task>` with sequence numbers;
status changes and task ends become local events for the master to index.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, final

from shoal_shared import subjects
from shoal_shared.bus import Bus
from shoal_shared.chunks import ErrorChunk, FinishChunk, TokenChunk
from shoal_shared.events import RunnerStatusChanged, TaskFinished
from shoal_shared.ids import NodeId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.runner_status import RunnerFailed, RunnerIdle, RunnerShutDown, RunnerStatus
from shoal_shared.tasks import Task

from shoal_worker.event_sink import LocalEventSink
from shoal_worker.plan import LocalRunner
from shoal_worker.runner.process import RunnerConnectionError, RunnerProcess
from shoal_worker.runner.protocol import (
    Cancel,
    Generate,
    RunnerSpec,
    StatusUpdate,
    TaskDone,
    TaskFailed,
    TokenOutput,
)

logger = logging.getLogger(__name__)

RESTART_BACKOFF_SECONDS: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_SECONDS: Final = 60.0

ModelResolver = Callable[[Instance], Awaitable[Path]]


class ModelUnavailableError(RuntimeError):
    """The model's files are not on this node and cannot be fetched."""


@final
class SupervisedRunner:
    def __init__(
        self,
        bus: Bus,
        node_id: NodeId,
        instance: Instance,
        shard: ShardAssignment,
        resolve_model: ModelResolver,
        events: LocalEventSink,
        on_change: Callable[[], None],
    ) -> None:
        self._bus = bus
        self._node_id = node_id
        self.instance = instance
        self.shard = shard
        self._resolve_model = resolve_model
        self._events = events
        self._on_change = on_change
        self._process: RunnerProcess | None = None
        # Next chunk sequence number of each task this runner is working on.
        self._in_flight: dict[TaskId, int] = {}
        self._dispatched: set[TaskId] = set()
        self._cancelled: set[TaskId] = set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_status: RunnerStatus | None = None

    @property
    def view(self) -> LocalRunner:
        return LocalRunner(
            runner_id=self.shard.runner_id,
            instance_id=self.instance.instance_id,
            dispatched=frozenset(self._dispatched),
            cancelled=frozenset(self._cancelled),
        )

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_running())

    async def dispatch(self, task: Task) -> None:
        self._dispatched.add(task.task_id)
        self._in_flight[task.task_id] = 0
        process = self._process
        if process is None:
            await self._fail_task(task.task_id, "the runner is not running")
            return
        try:
            await process.send(
                Generate(task_id=task.task_id, messages=task.messages, sampling=task.sampling)
            )
        except RunnerConnectionError as error:
            await self._fail_task(task.task_id, f"the runner is gone: {error}")

    async def cancel(self, task_id: TaskId) -> None:
        self._cancelled.add(task_id)
        process = self._process
        if process is not None:
            with contextlib.suppress(RunnerConnectionError):
                await process.send(Cancel(task_id=task_id))

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            await process.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task_id in list(self._in_flight):
            await self._fail_task(task_id, "the instance was shut down")
        self._report(RunnerShutDown())

    def reannounce(self) -> None:
        """A new master's term: say again where this runner stands."""
        if self._last_status is not None:
            self._report(self._last_status)

    def _report(self, status: RunnerStatus) -> None:
        self._last_status = status
        self._events.emit(
            RunnerStatusChanged(
                runner_id=self.shard.runner_id,
                instance_id=self.instance.instance_id,
                node_id=self._node_id,
                status=status,
            )
        )

    async def _keep_running(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started_at = loop.time()
            reason = await self._run_once()
            if self._stopping:
                return
            for task_id in list(self._in_flight):
                await self._fail_task(task_id, f"the runner failed: {reason}")
            self._report(RunnerFailed(reason=reason))
            logger.warning("runner %s failed: %s", self.shard.runner_id, reason)
            failures = 0 if loop.time() - started_at > STABLE_AFTER_SECONDS else failures + 1
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS)) - 1]
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """Run one runner process to its end; return why it ended."""
        self._report(RunnerIdle())
        try:
            model_dir = await self._resolve_model(self.instance)
        except ModelUnavailableError as error:
            return str(error)
        spec = RunnerSpec(
            runner_id=self.shard.runner_id,
            model_dir=str(model_dir),
            rank=self.shard.rank,
            world_size=len(self.instance.shards),
            start_layer=self.shard.start_layer,
            end_layer=self.shard.end_layer,
            layer_count=self.instance.layer_count,
            sharding=self.instance.sharding,
            ring_hosts=tuple(
                shard.ring_address
                for shard in sorted(self.instance.shards, key=lambda shard: shard.rank)
                if shard.ring_address is not None
            ),
        )
        process = RunnerProcess()
        await process.start(spec)
        self._process = process
        # Tasks are dispatched afresh to a new runner process.
        self._dispatched = set(self._in_flight)
        self._on_change()
        async for message in process.messages():
            await self._forward(message)
        returncode = await process.wait()
        self._process = None
        if returncode < 0:
            return f"runner process killed by signal {-returncode}"
        return f"runner process exited with code {returncode}"

    async def _forward(self, message: StatusUpdate | TokenOutput | TaskDone | TaskFailed) -> None:
        match message:
            case StatusUpdate():
                self._report(message.status)
            case TokenOutput():
                sequence = self._next_sequence(message.task_id)
                if sequence is not None:
                    await self._publish_chunk(
                        TokenChunk(
                            task_id=message.task_id,
                            sequence=sequence,
                            text=message.text,
                            token_ids=message.token_ids,
                        )
                    )
            case TaskDone():
                sequence = self._in_flight.pop(message.task_id, None)
                if sequence is None:
                    return
                await self._publish_chunk(
                    FinishChunk(
                        task_id=message.task_id,
                        sequence=sequence,
                        finish_reason=message.finish_reason,
                        usage=message.usage,
                    )
                )
                outcome = "cancelled" if message.finish_reason == "cancelled" else "completed"
                self._events.emit(TaskFinished(task_id=message.task_id, outcome=outcome))
            case TaskFailed():
                await self._fail_task(message.task_id, message.message)

    def _next_sequence(self, task_id: TaskId) -> int | None:
        sequence = self._in_flight.get(task_id)
        if sequence is not None:
            self._in_flight[task_id] = sequence + 1
        return sequence

    async def _fail_task(self, task_id: TaskId, message: str) -> None:
        sequence = self._in_flight.pop(task_id, None)
        if sequence is None:
            return
        await self._publish_chunk(ErrorChunk(task_id=task_id, sequence=sequence, message=message))
        self._events.emit(TaskFinished(task_id=task_id, outcome="failed", error=message))

    async def _publish_chunk(self, chunk: TokenChunk | FinishChunk | ErrorChunk) -> None:
        # Only rank 0 speaks for a distributed instance; the other ranks compute in step.
        if self.shard.rank != 0:
            return
        # A core publish only buffers; the client flushes in the background.
        await self._bus.client.publish(
            subjects.chunks(chunk.task_id), chunk.model_dump_json().encode()
        )
