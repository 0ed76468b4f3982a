"""One chat task, independent of the API flavour that asked for it.

A flavour (OpenAI today; Claude and Ollama later) translates its request into messages and
sampling parameters, calls `start_chat`, then renders `ChatSession.chunks()` in its own format
(or `complete()` for a non-streaming answer). Everything about instances, commands, chunk
order and cancellation lives here once.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final, Literal, final

from shoal_shared.chunks import ErrorChunk, TokenChunk, Usage
from shoal_shared.commands import CancelTask, CommandRejected, SubmitTask
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, new_command_id, new_task_id
from shoal_shared.model_card import ModelCard
from shoal_shared.state import State
from shoal_shared.tasks import ChatMessage, ChatTask, SamplingParameters

from shoal_api.chunk_stream import ChunkReceiver, ChunkStreamError
from shoal_api.context import ApiContext, MasterUnavailableError, Unsubscribe, replica_is_live
from shoal_api.errors import (
    ApiError,
    no_master_error,
    not_found,
    rejection_error,
    server_error,
    unavailable,
)
from shoal_api.instance_choice import choose_instance, not_ready_message

logger = logging.getLogger(__name__)

CompletedReason = Literal["stop", "length"]


class Finished(FrozenModel):
    """The end of a successful task: why it stopped, and what it cost."""

    finish_reason: CompletedReason
    usage: Usage


def resolve_model(context: ApiContext, model: str) -> ModelCard:
    card = context.cards.get(ModelId(model))
    if card is None:
        known = ", ".join(sorted(context.cards)) or "none"
        raise not_found(
            f"the model {model!r} does not exist (known models: {known})",
            code="model_not_found",
            param="model",
        )
    return card


def stream_failure(error: ChunkStreamError) -> ApiError:
    match error.problem:
        case "timeout":
            return server_error(error.message, code="timeout", status=504)
        case "aborted":
            return unavailable(error.message, code="shutting_down")
        case "lost":
            return server_error(error.message, code="task_lost", status=502)
        case "gap" | "malformed":
            return server_error(error.message, code=f"chunk_{error.problem}", status=502)


# How long the final chunk may trail the log's word that a task ended.
LOSS_GRACE_SECONDS: Final = 3.0
LOSS_CHECK_SECONDS: Final = 30.0


@final
class ChatSession:
    """A submitted task and its chunk stream. Always `close()` it: a session closed before its
    task finished cancels the task, so an abandoned request frees its runner."""

    def __init__(
        self,
        context: ApiContext,
        task: ChatTask,
        receiver: ChunkReceiver,
        unsubscribe: Unsubscribe,
    ) -> None:
        self.task = task
        self.created = int(time.time())
        self._context = context
        self._receiver = receiver
        self._unsubscribe = unsubscribe
        self._finished = False
        self._closed = False
        context.open_sessions.add(self)
        self._watcher = asyncio.create_task(self._watch_for_loss(), name=f"watch-{task.task_id}")

    def abort(self, message: str) -> None:
        """End the session's chunk stream with an error (the API is stopping)."""
        self._receiver.abort(message)

    async def _watch_for_loss(self) -> None:
        """End the stream when the cluster drops the task without a final chunk reaching us:
        e.g. the node of its rank-0 runner died, so no worker is left to report the end."""
        task_id, instance_id = self.task.task_id, self.task.instance_id
        seen = False

        def vanished(state: State) -> bool:
            nonlocal seen
            if task_id in state.tasks:
                seen = True
                return False
            return seen or instance_id not in state.instances

        cluster = self._context.cluster
        while not (self._finished or self._closed):
            if await cluster.wait_for_state(vanished, timeout=LOSS_CHECK_SECONDS):
                # The final chunk normally lands before the log says the task ended.
                await asyncio.sleep(LOSS_GRACE_SECONDS)
                if not (self._finished or self._closed):
                    self._receiver.abort(
                        f"task {task_id} ended without its final chunk: the instance or a "
                        "node running it was lost",
                        problem="lost",
                    )
                return

    async def chunks(self) -> AsyncIterator[TokenChunk | Finished]:
        """Token chunks, then `Finished`; raises ApiError when the task fails, is cancelled
        or its chunks stop arriving in order."""
        while not self._finished:
            try:
                chunk = await self._receiver.next_chunk()
            except ChunkStreamError as error:
                raise stream_failure(error) from None
            if isinstance(chunk, TokenChunk):
                yield chunk
                continue
            self._finished = True
            if isinstance(chunk, ErrorChunk):
                raise server_error(f"inference failed: {chunk.message}", code="inference_failed")
            match chunk.finish_reason:
                case "stop" | "length":
                    yield Finished(finish_reason=chunk.finish_reason, usage=chunk.usage)
                case "cancelled":
                    # Not by this client (it would not be listening): by whoever deleted the
                    # instance or cancelled the task. OpenAI has no finish reason for it.
                    raise unavailable(
                        "the task was cancelled before it finished (was its instance deleted?)",
                        code="task_cancelled",
                    )

    def close(self, cancel_unfinished: bool = True) -> None:
        """Idempotent and synchronous: safe in a `finally` of a cancelled request. The I/O
        runs in the background so that the request's cancellation cannot cut it short."""
        if self._closed:
            return
        self._closed = True
        self._watcher.cancel()
        self._context.open_sessions.discard(self)
        cancel = cancel_unfinished and not self._finished
        self._context.background.spawn(
            _release(self._context, self.task, self._unsubscribe, cancel=cancel),
            name=f"release-{self.task.task_id}",
        )


async def _cancel_task(context: ApiContext, task: ChatTask) -> None:
    command = CancelTask(command_id=new_command_id(), task_id=task.task_id)
    try:
        reply = await context.cluster.send_command(command, context.timeouts.command_seconds)
    except MasterUnavailableError:
        logger.warning("could not cancel task %s: no master answered", task.task_id)
        return
    if isinstance(reply, CommandRejected):
        logger.warning("cancelling task %s was rejected: %s", task.task_id, reply.reason)


async def _release(
    context: ApiContext, task: ChatTask, unsubscribe: Unsubscribe, cancel: bool
) -> None:
    await unsubscribe()
    if cancel:
        await _cancel_task(context, task)


async def start_chat(
    context: ApiContext,
    card: ModelCard,
    messages: Sequence[ChatMessage],
    sampling: SamplingParameters,
) -> ChatSession:
    """Pick a ready instance, subscribe to the task's chunks, then submit the task.

    Raises ApiError: 503 when no instance is ready or no master answers, and the master's
    rejection mapped to a status otherwise.
    """
    cluster = context.cluster
    if not replica_is_live(cluster):
        raise unavailable(
            "this node has not joined the cluster yet (waiting for the election and the "
            "master's state); try again in a moment",
            code="not_ready",
        )
    state = cluster.state
    instance_id = choose_instance(state, card.model_id)
    if instance_id is None:
        raise unavailable(not_ready_message(state, card.model_id), code="model_not_ready")
    task = ChatTask(
        task_id=new_task_id(),
        instance_id=instance_id,
        model_id=card.model_id,
        messages=tuple(messages),
        sampling=sampling,
        requester_node_id=context.node_id,
    )
    receiver = ChunkReceiver(task.task_id, context.timeouts.chunk_seconds)
    # Subscribe before submitting: the first chunk may arrive before the reply does.
    try:
        unsubscribe = await cluster.subscribe_chunks(task.task_id, receiver.deliver)
    except MasterUnavailableError as error:
        raise unavailable(str(error), code="bus_unavailable") from None
    session = ChatSession(context, task, receiver, unsubscribe)
    submit = SubmitTask(command_id=new_command_id(), task=task)
    try:
        reply = await cluster.send_command(submit, context.timeouts.command_seconds)
    except MasterUnavailableError as error:
        # A master that timed out may still have accepted the task: closing cancels it.
        session.close(cancel_unfinished=error.maybe_delivered)
        raise no_master_error() from None
    except BaseException:
        session.close()
        raise
    if isinstance(reply, CommandRejected):
        session.close(cancel_unfinished=False)  # the master never created the task
        raise rejection_error(reply)
    return session


class Completion(FrozenModel):
    text: str
    finish_reason: CompletedReason
    usage: Usage


async def complete(session: ChatSession) -> Completion:
    """The whole answer of a session (non-streaming APIs); raises ApiError on failure."""
    parts: list[str] = []
    async for chunk in session.chunks():
        if isinstance(chunk, TokenChunk):
            parts.append(chunk.text)
        else:
            return Completion(
                text="".join(parts), finish_reason=chunk.finish_reason, usage=chunk.usage
            )
    raise server_error("the token stream ended without a finish chunk")
