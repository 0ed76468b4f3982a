"""A real runner subprocess, driven through RunnerProcess over its socketpair."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_shared.ids import RunnerId, TaskId
from shoal_shared.runner_status import RunnerFailed, RunnerShutDown, RunnerStatus
from shoal_shared.tasks import ChatMessage, SamplingParameters
from shoal_worker.models.default_model import ensure_default_model
from shoal_worker.runner.mlx_bindings import read_layer_count
from shoal_worker.runner.process import RunnerProcess, find_openblas, runner_environment
from shoal_worker.runner.protocol import (
    Generate,
    RunnerMessage,
    RunnerSpec,
    StatusUpdate,
    TaskDone,
    TokenOutput,
    decode_runner_message,
)

CAPITAL_QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
# Generous: a runner starts in a few seconds, but CI machines may be busy.
READY_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory for both runner test modules: the conversion is idempotent, so whichever
    # module runs second reuses the first one's output instead of converting again.
    return ensure_default_model(tmp_path_factory.getbasetemp() / "runner-models")


def spec_for(model_dir: Path, *, world_size: int = 1) -> RunnerSpec:
    layer_count = read_layer_count(model_dir)
    return RunnerSpec(
        runner_id=RunnerId("runner-test"),
        model_dir=str(model_dir),
        world_size=world_size,
        start_layer=0,
        end_layer=layer_count,
        layer_count=layer_count,
    )


async def statuses_until_ready(messages: AsyncIterator[RunnerMessage]) -> list[RunnerStatus]:
    statuses: list[RunnerStatus] = []
    async with asyncio.timeout(READY_TIMEOUT_S):
        async for message in messages:
            if isinstance(message, StatusUpdate):
                statuses.append(message.status)
                if message.status.status in ("ready", "failed"):
                    break
    return statuses


async def test_round_trip_through_a_real_runner(model_dir: Path) -> None:
    runner = RunnerProcess()
    await runner.start(spec_for(model_dir))
    try:
        messages = runner.messages()
        statuses = [status.status for status in await statuses_until_ready(messages)]
        first_of = statuses.index
        assert first_of("loading") < first_of("loaded") < first_of("warming_up") < first_of("ready")

        task_id = TaskId("task-round-trip")
        sampling = SamplingParameters(temperature=0.0, max_tokens=16)
        await runner.send(Generate(task_id=task_id, messages=CAPITAL_QUESTION, sampling=sampling))
        text: list[str] = []
        done: TaskDone | None = None
        async with asyncio.timeout(60):
            async for message in messages:
                if isinstance(message, TokenOutput):
                    text.append(message.text)
                elif isinstance(message, TaskDone):
                    done = message
                    break
        assert "Paris" in "".join(text)
        assert done is not None
        assert done.finish_reason == "stop"

        assert await runner.stop(timeout=10) == 0
        remaining = [message async for message in messages]
        assert StatusUpdate(status=RunnerShutDown()) in remaining
    finally:
        await runner.stop(timeout=5)


async def test_sigkill_ends_messages_promptly(model_dir: Path) -> None:
    runner = RunnerProcess()
    await runner.start(spec_for(model_dir))
    try:
        messages = runner.messages()
        await statuses_until_ready(messages)
        sampling = SamplingParameters(temperature=0.0, max_tokens=16)
        request = Generate(
            task_id=TaskId("task-killed"), messages=CAPITAL_QUESTION, sampling=sampling
        )
        await runner.send(request)
        runner.kill()
        started = time.monotonic()
        async with asyncio.timeout(5):
            async for _ in messages:
                pass
        assert time.monotonic() - started < 5
        assert await runner.wait() == -signal.SIGKILL
        assert runner.returncode == -9
    finally:
        await runner.stop(timeout=5)


async def test_unsupported_spec_reports_failed_and_exits(model_dir: Path) -> None:
    runner = RunnerProcess()
    await runner.start(spec_for(model_dir, world_size=2))
    try:
        statuses = await statuses_until_ready(runner.messages())
        assert len(statuses) == 1
        assert isinstance(statuses[0], RunnerFailed)
        assert "not supported" in statuses[0].reason
        async with asyncio.timeout(30):
            assert await runner.wait() == 1
    finally:
        await runner.stop(timeout=5)


def test_runner_exits_when_its_worker_goes_away(model_dir: Path) -> None:
    """The parent's end of the socket closing (as when the worker dies) stops the runner."""
    worker_end, runner_end = socket.socketpair()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal_worker.runner.main",
            "--socket-fd",
            str(runner_end.fileno()),
            "--spec",
            spec_for(model_dir).model_dump_json(),
        ],
        pass_fds=(runner_end.fileno(),),
        env=runner_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    runner_end.close()
    try:
        with worker_end.makefile("rb") as lines:
            for line in lines:
                message = decode_runner_message(line)
                if isinstance(message, StatusUpdate) and message.status.status == "ready":
                    break
        worker_end.close()
        assert process.wait(timeout=30) == 0
    finally:
        worker_end.close()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS is preloaded only on Linux")
def test_runner_environment_preloads_system_openblas() -> None:
    openblas = find_openblas()
    if openblas is None:
        pytest.skip("no system OpenBLAS here (apt-get install libopenblas0-pthread)")
    preload = runner_environment()["LD_PRELOAD"].split(":")
    assert preload[0] == str(openblas)


async def test_stop_while_loading_exits_cleanly(model_dir: Path) -> None:
    runner = RunnerProcess()
    await runner.start(spec_for(model_dir))
    try:
        # Shutdown waits in the socket until the runner reads it, during import or loading.
        async with asyncio.timeout(60):
            assert await runner.stop(timeout=30) == 0
        statuses = [
            m.status for m in [m async for m in runner.messages()] if isinstance(m, StatusUpdate)
        ]
        assert statuses[-1] == RunnerShutDown()
        assert all(status.status != "ready" for status in statuses)
    finally:
        await runner.stop(timeout=5)
