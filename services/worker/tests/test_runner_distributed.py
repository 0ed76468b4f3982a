"""Runner subprocesses forming an `mx.distributed` ring group on 127.0.0.1.

Greedy output of a sharded group must equal single-process greedy output token for token, and
a group that loses a rank must fail within a deadline rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

import pytest
from shoal_shared.ids import RunnerId, TaskId
from shoal_shared.runner_status import RunnerFailed
from shoal_shared.tasks import ChatMessage, SamplingParameters
from shoal_worker.models.default_model import ensure_default_model
from shoal_worker.runner.mlx_bindings import read_layer_count
from shoal_worker.runner.process import RunnerProcess, runner_environment
from shoal_worker.runner.protocol import (
    Cancel,
    Generate,
    RunnerMessage,
    RunnerSpec,
    Sharding,
    StatusUpdate,
    TaskDone,
    TaskFailed,
    TokenOutput,
)

PROMPTS = (
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
)
MAX_TOKENS = 12
READY_TIMEOUT_S = 180.0
TASK_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with the other runner test modules: the conversion is idempotent.
    return ensure_default_model(tmp_path_factory.getbasetemp() / "runner-models")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def group_specs(
    model_dir: Path,
    *,
    world_size: int,
    sharding: Sharding = "pipeline",
    split: Sequence[int] | None = None,
    connect_timeout_s: float = 60.0,
    step_timeout_s: float = 120.0,
) -> list[RunnerSpec]:
    """One spec per rank; pipeline ranks get contiguous ranges (`split` layers each)."""
    layer_count = read_layer_count(model_dir)
    hosts = tuple(f"127.0.0.1:{port}" for port in free_ports(world_size)) if world_size > 1 else ()
    if sharding == "tensor":
        ranges = [(0, layer_count)] * world_size
    else:
        sizes = list(split) if split is not None else [layer_count // world_size] * world_size
        sizes[-1] += layer_count - sum(sizes)
        starts = [sum(sizes[:rank]) for rank in range(world_size)]
        ranges = [(start, start + size) for start, size in zip(starts, sizes, strict=True)]
    return [
        RunnerSpec(
            runner_id=RunnerId(f"runner-rank-{rank}"),
            model_dir=str(model_dir),
            rank=rank,
            world_size=world_size,
            start_layer=start,
            end_layer=end,
            layer_count=layer_count,
            sharding=sharding,
            ring_hosts=hosts,
            connect_timeout_s=connect_timeout_s,
            step_timeout_s=step_timeout_s,
        )
        for rank, (start, end) in enumerate(ranges)
    ]


def runner_env() -> dict[str, str]:
    # Several ranks share this machine's cores: OpenBLAS's own threads would only fight them.
    return {**runner_environment(), "OPENBLAS_NUM_THREADS": "1"}


@final
@dataclass
class TaskResult:
    token_ids: list[int] = field(default_factory=lambda: [])
    end: TaskDone | TaskFailed | None = None


@final
class RunnerGroup:
    """The runners of one group, each with a task pumping its messages into a queue."""

    def __init__(self) -> None:
        self.runners: list[RunnerProcess] = []
        self._queues: list[asyncio.Queue[RunnerMessage | None]] = []
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self, specs: Sequence[RunnerSpec]) -> None:
        for spec in specs:
            runner = RunnerProcess()
            await runner.start(spec, environment=runner_env())
            queue: asyncio.Queue[RunnerMessage | None] = asyncio.Queue()
            self.runners.append(runner)
            self._queues.append(queue)
            self._pumps.append(asyncio.create_task(self._pump(runner.messages(), queue)))

    @staticmethod
    async def _pump(
        messages: AsyncIterator[RunnerMessage], queue: asyncio.Queue[RunnerMessage | None]
    ) -> None:
        async for message in messages:
            await queue.put(message)
        await queue.put(None)  # the runner's socket closed

    async def next_message(self, rank: int) -> RunnerMessage | None:
        return await self._queues[rank].get()

    async def final_status(self, rank: int) -> str:
        """Statuses until ready or failed (or the runner vanished): the last one's name."""
        async with asyncio.timeout(READY_TIMEOUT_S):
            while (message := await self.next_message(rank)) is not None:
                if isinstance(message, StatusUpdate) and message.status.status in (
                    "ready",
                    "failed",
                ):
                    return message.status.status
        return "exited"

    async def wait_ready(self) -> None:
        statuses = await asyncio.gather(*(self.final_status(r) for r in range(len(self.runners))))
        assert statuses == ["ready"] * len(self.runners)

    async def send_all(self, message: Generate | Cancel) -> None:
        for runner in self.runners:
            await runner.send(message)

    async def result(self, rank: int, task_id: TaskId) -> TaskResult:
        result = TaskResult()
        async with asyncio.timeout(TASK_TIMEOUT_S):
            while result.end is None:
                message = await self.next_message(rank)
                assert message is not None, f"rank {rank} exited during task {task_id}"
                if isinstance(message, TokenOutput) and message.task_id == task_id:
                    result.token_ids.extend(message.token_ids)
                elif isinstance(message, TaskDone | TaskFailed) and message.task_id == task_id:
                    result.end = message
        return result

    async def generate(self, task_id: str, prompt: str, max_tokens: int) -> list[TaskResult]:
        request = generate_request(task_id, prompt, max_tokens)
        await self.send_all(request)
        return list(
            await asyncio.gather(
                *(self.result(rank, request.task_id) for rank in range(len(self.runners)))
            )
        )

    async def stop(self) -> None:
        await asyncio.gather(*(runner.stop(timeout=5) for runner in self.runners))
        for pump in self._pumps:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


def generate_request(task_id: str, prompt: str, max_tokens: int) -> Generate:
    return Generate(
        task_id=TaskId(task_id),
        messages=(ChatMessage(role="user", content=prompt),),
        sampling=SamplingParameters(temperature=0.0, max_tokens=max_tokens),
    )


@contextlib.asynccontextmanager
async def running_group(specs: Sequence[RunnerSpec]) -> AsyncGenerator[RunnerGroup, None]:
    group = RunnerGroup()
    try:
        await group.start(specs)
        yield group
    finally:
        await group.stop()


async def greedy_outputs(group: RunnerGroup) -> list[list[TaskResult]]:
    return [
        await group.generate(f"task-{index}", prompt, MAX_TOKENS)
        for index, prompt in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="session")
def single_process_tokens(model_dir: Path) -> list[list[int]]:
    """The reference: greedy tokens of one unsharded runner for each of PROMPTS."""

    async def generate() -> list[list[int]]:
        async with running_group(group_specs(model_dir, world_size=1)) as group:
            await group.wait_ready()
            return [results[0].token_ids for results in await greedy_outputs(group)]

    return asyncio.run(generate())


def assert_matches_reference(outputs: list[list[TaskResult]], reference: list[list[int]]) -> None:
    for results, expected in zip(outputs, reference, strict=True):
        assert expected, "the reference generated no tokens"
        for result in results:
            assert isinstance(result.end, TaskDone), result.end
            # Every rank emits rank 0's tokens; the worker forwards rank 0's.
            assert result.token_ids == expected


async def test_two_rank_pipeline_matches_single_process_greedy(
    model_dir: Path, single_process_tokens: list[list[int]]
) -> None:
    # An uneven split, so that the ranks' ranges are not mirror images of each other.
    async with running_group(group_specs(model_dir, world_size=2, split=(11, 19))) as group:
        await group.wait_ready()
        assert_matches_reference(await greedy_outputs(group), single_process_tokens)
        assert [await runner.stop(timeout=10) for runner in group.runners] == [0, 0]


async def test_a_quantized_model_pipelines_too(tmp_path_factory: pytest.TempPathFactory) -> None:
    """4-bit weights: the embedding gives float16, the layers float32; the ranks must pass
    each other what the layers give (a receiver once read float32 bytes as float16)."""
    quantized = ensure_default_model(tmp_path_factory.getbasetemp() / "runner-models", "quantized")
    prompt = PROMPTS[0]
    async with running_group(group_specs(quantized, world_size=1)) as group:
        await group.wait_ready()
        (single,) = await group.generate("task-single", prompt, 8)
    async with running_group(group_specs(quantized, world_size=2)) as group:
        await group.wait_ready()
        results = await group.generate("task-pipelined", prompt, 8)
    assert single.token_ids
    assert [result.token_ids for result in results] == [single.token_ids, single.token_ids]


@pytest.mark.slow
async def test_three_rank_tensor_matches_single_process_greedy(
    model_dir: Path, single_process_tokens: list[list[int]]
) -> None:
    async with running_group(group_specs(model_dir, world_size=3, sharding="tensor")) as group:
        await group.wait_ready()
        assert_matches_reference(await greedy_outputs(group), single_process_tokens)


async def test_tensor_sharding_that_does_not_divide_the_heads_is_refused(model_dir: Path) -> None:
    async with running_group(group_specs(model_dir, world_size=2, sharding="tensor")) as group:
        for rank, runner in enumerate(group.runners):
            message = await group.next_message(rank)
            assert isinstance(message, StatusUpdate)
            assert isinstance(message.status, RunnerFailed)
            assert "attention heads 9" in message.status.reason
            async with asyncio.timeout(30):
                assert await runner.wait() == 1


async def test_rank_whose_peer_never_comes_fails_after_the_connect_deadline(
    model_dir: Path,
) -> None:
    rank_zero = group_specs(model_dir, world_size=2, connect_timeout_s=3.0)[0]
    async with running_group([rank_zero]) as group:
        statuses: list[str] = []
        reason = ""
        async with asyncio.timeout(60):
            while (message := await group.next_message(0)) is not None:
                if isinstance(message, StatusUpdate):
                    statuses.append(message.status.status)
                    if isinstance(message.status, RunnerFailed):
                        reason = message.status.reason
            assert await group.runners[0].wait() == 1
        assert statuses == ["connecting", "failed"]
        assert "rank 1" in reason
        assert "connect deadline" in reason


async def test_killed_rank_makes_the_other_fail_promptly(model_dir: Path) -> None:
    specs = group_specs(model_dir, world_size=2, step_timeout_s=10.0)
    async with running_group(specs) as group:
        await group.wait_ready()
        request = generate_request("task-long", PROMPTS[0] + " Answer at length.", 400)
        await group.send_all(request)
        async with asyncio.timeout(TASK_TIMEOUT_S):
            while not isinstance(await group.next_message(0), TokenOutput):
                pass
        group.runners[1].kill()
        killed_at = time.monotonic()
        ends: list[RunnerMessage] = []
        async with asyncio.timeout(30):
            while (message := await group.next_message(0)) is not None:
                if isinstance(message, TaskFailed | StatusUpdate):
                    ends.append(message)
            assert await group.runners[0].wait() == 1
        assert time.monotonic() - killed_at < 30
        assert any(isinstance(end, TaskFailed) and end.task_id == request.task_id for end in ends)
        statuses = [end.status.status for end in ends if isinstance(end, StatusUpdate)]
        # Failed, and never ready again on the way: the worker must not send it more work.
        assert statuses[-1] == "failed"
        assert "ready" not in statuses


@pytest.mark.slow
async def test_stalled_rank_trips_the_watchdog(model_dir: Path) -> None:
    specs = group_specs(model_dir, world_size=2, step_timeout_s=4.0)
    async with running_group(specs) as group:
        await group.wait_ready()
        await group.send_all(generate_request("task-stalled", PROMPTS[0], 400))
        # Past the first token: right after it mlx-lm calls `mx.clear_cache()`, which blocks
        # holding the GIL behind a stalled collective, and then only the native backstop
        # (exit code 1, no failed status) can end the runner.
        tokens_seen = 0
        async with asyncio.timeout(TASK_TIMEOUT_S):
            while tokens_seen < 3:
                tokens_seen += isinstance(await group.next_message(0), TokenOutput)
        os.kill(group.runners[1].pid, signal.SIGSTOP)
        try:
            reason = ""
            async with asyncio.timeout(30):
                while (message := await group.next_message(0)) is not None:
                    if isinstance(message, StatusUpdate) and isinstance(
                        message.status, RunnerFailed
                    ):
                        reason = message.status.reason
                assert await group.runners[0].wait() == 1
            assert "no progress for 4 s" in reason
        finally:
            group.runners[1].kill()


async def test_cancellation_stays_in_lockstep(
    model_dir: Path, single_process_tokens: list[list[int]]
) -> None:
    async with running_group(group_specs(model_dir, world_size=2)) as group:
        await group.wait_ready()
        running = generate_request("task-running", "Tell me a long story about a dragon.", 400)
        queued = generate_request("task-queued", PROMPTS[1], MAX_TOKENS)
        await group.send_all(running)
        await group.send_all(queued)
        async with asyncio.timeout(TASK_TIMEOUT_S):
            while not isinstance(first := await group.next_message(0), TokenOutput):
                pass
        # Only rank 0 hears about the running task: its decision travels with the next token.
        await group.runners[0].send(Cancel(task_id=running.task_id))
        await group.send_all(Cancel(task_id=queued.task_id))
        for task in (running, queued):
            rank_zero, rank_one = await asyncio.gather(
                group.result(0, task.task_id), group.result(1, task.task_id)
            )
            if task is running:
                rank_zero.token_ids[:0] = first.token_ids
            for result in (rank_zero, rank_one):
                assert isinstance(result.end, TaskDone)
                assert result.end.finish_reason == "cancelled"
            # The stop landed on the same token on both ranks.
            assert rank_zero.token_ids == rank_one.token_ids
            assert rank_zero.end == rank_one.end
        # Still in step afterwards.
        follow_up = await group.generate("task-after", PROMPTS[0], MAX_TOKENS)
        assert [result.token_ids for result in follow_up] == [single_process_tokens[0]] * 2
