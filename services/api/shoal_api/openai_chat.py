"""`POST /v1/chat/completions`, OpenAI's chat API, streaming (SSE) and not."""

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Final

from fastapi import APIRouter, Request, Response
from shoal_shared.chunks import TokenChunk

from shoal_api.bodies import read_body
from shoal_api.context import ApiContext
from shoal_api.errors import JSON_MEDIA_TYPE, ApiError, error_body, server_error
from shoal_api.inference import ChatSession, Completion, complete, resolve_model, start_chat
from shoal_api.openai_chat_schema import ChatCompletionRequest
from shoal_api.openai_chat_translate import (
    ChunkRenderer,
    chat_completion,
    completion_id,
    sampling_parameters,
    to_chat_messages,
)
from shoal_api.sse import DONE, EventStreamResponse, sse_data

logger = logging.getLogger(__name__)


async def _sse_events(
    session: ChatSession, renderer: ChunkRenderer, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    try:
        # The role goes out at once, before the first token: the client knows it is served.
        yield sse_data(renderer.role())
        async for chunk in session.chunks():
            if isinstance(chunk, TokenChunk):
                if chunk.text:
                    yield sse_data(renderer.content(chunk.text))
                continue
            yield sse_data(renderer.finish(chunk.finish_reason))
            if include_usage:
                yield sse_data(renderer.usage(chunk.usage))
        yield DONE
    except ApiError as error:
        # The status line went out with the first event: a failure can only be an event now.
        yield sse_data(error_body(error).model_dump_json())
    except Exception:
        # A bug must still end the stream readably, not as a torn chunked response.
        logger.exception("chat stream of task %s failed", session.task.task_id)
        yield sse_data(
            error_body(server_error("internal error in the Shoal API")).model_dump_json()
        )
    finally:
        session.close()


async def _until_disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next ASGI
    message is the disconnect); the server wakes us for it, nothing is polled."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete_unless_disconnected(
    request: Request, session: ChatSession
) -> Completion | None:
    """The completion, or None when the client hung up first."""
    answer = asyncio.ensure_future(complete(session))
    hang_up = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({answer, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        if not answer.done():
            answer.cancel()
    if not answer.done() or answer.cancelled():
        return None
    return answer.result()


# Failures of the chunk transport, not of inference: a non-streamed request retries them.
RETRIED_TRANSPORT_CODES: Final = frozenset({"chunk_gap", "task_lost"})
TRANSPORT_ATTEMPTS: Final = 2


def router(context: ApiContext) -> APIRouter:
    routes = APIRouter()

    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        card = resolve_model(context, body.model)
        messages = to_chat_messages(body.messages)
        sampling = sampling_parameters(body, card)
        session = await start_chat(context, card, messages, sampling)
        response_id = completion_id(session.task.task_id)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            renderer = ChunkRenderer(response_id, session.created, body.model)
            return EventStreamResponse(_sse_events(session, renderer, include_usage))
        attempt = 1
        while True:
            try:
                completion = await _complete_unless_disconnected(request, session)
                break
            except ApiError as error:
                # Chunks are core NATS: a leaf link rewired under a new master can drop one.
                # The client has seen nothing yet, so asking again is invisible to it.
                if error.code not in RETRIED_TRANSPORT_CODES or attempt >= TRANSPORT_ATTEMPTS:
                    raise
            finally:
                session.close()
            attempt += 1
            session = await start_chat(context, card, messages, sampling)
            response_id = completion_id(session.task.task_id)
        if completion is None:
            # Nobody is listening any more; closing the session cancelled the task.
            return Response(status_code=499)
        answer = chat_completion(response_id, session.created, body.model, completion)
        return Response(content=answer.model_dump_json(), media_type=JSON_MEDIA_TYPE)

    routes.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return routes
