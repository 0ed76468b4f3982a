"""Chunks arrive through a queue and are checked for order: a gap or silence is an error."""

import asyncio

import pytest
from shoal_api.chunk_stream import ChunkReceiver, ChunkStreamError
from shoal_shared.chunks import FinishChunk, TokenChunk, Usage
from shoal_shared.ids import TaskId

TASK = TaskId("task-1")


def token(sequence: int, text: str = "x", task_id: TaskId = TASK) -> bytes:
    chunk = TokenChunk(task_id=task_id, sequence=sequence, text=text, token_ids=(1,))
    return chunk.model_dump_json().encode()


async def test_chunks_come_out_in_order() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=1)
    receiver.deliver(token(0, "a"))
    receiver.deliver(token(1, "b"))
    finish = FinishChunk(
        task_id=TASK,
        sequence=2,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=2),
    )
    receiver.deliver(finish.model_dump_json().encode())
    first = await receiver.next_chunk()
    second = await receiver.next_chunk()
    assert isinstance(first, TokenChunk)
    assert first.text == "a"
    assert isinstance(second, TokenChunk)
    assert second.text == "b"
    assert await receiver.next_chunk() == finish


async def test_a_missing_sequence_is_a_gap() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=1)
    receiver.deliver(token(0))
    receiver.deliver(token(2))
    await receiver.next_chunk()
    with pytest.raises(ChunkStreamError) as caught:
        await receiver.next_chunk()
    assert caught.value.problem == "gap"
    assert "chunk 1" in caught.value.message


async def test_a_stream_must_start_at_zero() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=1)
    receiver.deliver(token(1))
    with pytest.raises(ChunkStreamError) as caught:
        await receiver.next_chunk()
    assert caught.value.problem == "gap"


async def test_a_chunk_of_another_task_is_refused() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=1)
    receiver.deliver(token(0, task_id=TaskId("task-2")))
    with pytest.raises(ChunkStreamError) as caught:
        await receiver.next_chunk()
    assert caught.value.problem == "malformed"


async def test_a_malformed_payload_is_refused() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=1)
    receiver.deliver(b'{"kind": "token"}')
    with pytest.raises(ChunkStreamError) as caught:
        await receiver.next_chunk()
    assert caught.value.problem == "malformed"


async def test_silence_times_out() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=0.05)
    with pytest.raises(ChunkStreamError) as caught:
        await receiver.next_chunk()
    assert caught.value.problem == "timeout"


async def test_an_abort_wakes_a_waiting_reader() -> None:
    receiver = ChunkReceiver(TASK, timeout_seconds=10)
    reading = asyncio.create_task(receiver.next_chunk())
    await asyncio.sleep(0)
    receiver.abort("stopping")
    with pytest.raises(ChunkStreamError) as caught:
        await reading
    assert (caught.value.problem, caught.value.message) == ("aborted", "stopping")
