"""The token chunks of one task, from the NATS callback to the request handler.

The callback only enqueues the raw payload (it runs on the bus's reader path and must never
wait); the handler awaits the queue, so every chunk is handled the moment it arrives, with no
polling. Chunks are checked for order: a missing sequence number or a silent worker ends the
stream with an error instead of a hole in the text.
"""

import asyncio
from typing import Final, Literal, final

from pydantic import TypeAdapter, ValidationError
from shoal_shared.chunks import Chunk
from shoal_shared.ids import TaskId

CHUNK: Final[TypeAdapter[Chunk]] = TypeAdapter(Chunk)

ChunkProblem = Literal["gap", "timeout", "malformed", "aborted", "lost"]


@final
class ChunkStreamError(Exception):
    def __init__(self, problem: ChunkProblem, message: str) -> None:
        super().__init__(message)
        self.problem: ChunkProblem = problem
        self.message = message


def check_chunk(task_id: TaskId, expected_sequence: int, chunk: Chunk) -> None:
    """Raises ChunkStreamError unless `chunk` is the next one of `task_id`."""
    if chunk.task_id != task_id:
        raise ChunkStreamError(
            "malformed", f"received a chunk of task {chunk.task_id} on the stream of {task_id}"
        )
    if chunk.sequence != expected_sequence:
        raise ChunkStreamError(
            "gap",
            f"token chunk {expected_sequence} of task {task_id} never arrived "
            f"(the next one received was {chunk.sequence}): the output would have a hole",
        )


@final
class ChunkReceiver:
    def __init__(self, task_id: TaskId, timeout_seconds: float) -> None:
        self._task_id = task_id
        self._timeout_seconds = timeout_seconds
        # Payloads, or the error that ends the stream early (`abort`).
        self._queue: asyncio.Queue[bytes | ChunkStreamError] = asyncio.Queue()
        self._expected_sequence = 0

    def deliver(self, payload: bytes) -> None:
        """The bus callback: never blocks (the queue is unbounded)."""
        self._queue.put_nowait(payload)

    def abort(self, message: str, problem: ChunkProblem = "aborted") -> None:
        """End the stream: the waiting (or next) `next_chunk` raises instead of waiting."""
        self._queue.put_nowait(ChunkStreamError(problem, message))

    async def next_chunk(self) -> Chunk:
        try:
            async with asyncio.timeout(self._timeout_seconds):
                payload = await self._queue.get()
        except TimeoutError:
            raise ChunkStreamError(
                "timeout",
                f"no token chunk of task {self._task_id} arrived for "
                f"{self._timeout_seconds:g} s: the worker or its runner stopped answering",
            ) from None
        if isinstance(payload, ChunkStreamError):
            raise payload
        try:
            chunk = CHUNK.validate_json(payload)
        except ValidationError as error:
            raise ChunkStreamError(
                "malformed", f"received a malformed chunk for task {self._task_id}: {error}"
            ) from None
        check_chunk(self._task_id, self._expected_sequence, chunk)
        self._expected_sequence += 1
        return chunk
