"""Pure translations between OpenAI's chat API and Shoal's tasks and chunks."""

from collections.abc import Sequence
from typing import Final, final

from shoal_shared.chunks import Usage
from shoal_shared.ids import TaskId
from shoal_shared.model_card import ModelCard
from shoal_shared.tasks import ChatMessage, SamplingParameters

from shoal_api.errors import bad_request
from shoal_api.inference import Completion
from shoal_api.openai_chat_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionChoice,
    ContentDelta,
    ContentPart,
    EmptyDelta,
    FinishReason,
    RequestMessage,
    RoleDelta,
    UsageBody,
)

MAX_STOP_SEQUENCES: Final = 4
# Text parts are joined with a newline, as vLLM does: two parts are two paragraphs.
CONTENT_PART_SEPARATOR: Final = "\n"


def flatten_content(content: str | Sequence[ContentPart] | None, message_index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part_index, part in enumerate(content):
        param = f"messages[{message_index}].content[{part_index}]"
        if part.type != "text":
            raise bad_request(
                f"content parts of type {part.type!r} are not supported: "
                "this model takes text only",
                param=param,
                code="unsupported_content",
            )
        if part.text is None:
            raise bad_request("a text content part needs a 'text' field", param=param)
        texts.append(part.text)
    return CONTENT_PART_SEPARATOR.join(texts)


def to_chat_messages(messages: Sequence[RequestMessage]) -> tuple[ChatMessage, ...]:
    return tuple(
        ChatMessage(
            role="system" if message.role == "developer" else message.role,
            content=flatten_content(message.content, index),
        )
        for index, message in enumerate(messages)
    )


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    sequences = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise bad_request(
            f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(sequences)}",
            param="stop",
        )
    # An empty stop sequence would match before the first token; clients send [""] to
    # mean "none", so it is dropped rather than refused.
    return tuple(sequence for sequence in sequences if sequence)


def sampling_parameters(request: ChatCompletionRequest, card: ModelCard) -> SamplingParameters:
    """The request's sampling, with the model card's defaults where the request is silent."""
    if request.n is not None and request.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    # max_completion_tokens replaced max_tokens in OpenAI's API; the newer one wins.
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > card.context_length:
        raise bad_request(
            f"max_tokens={max_tokens} exceeds the context length of {card.model_id} "
            f"({card.context_length} tokens)",
            param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        )
    temperature = card.sampling.temperature if request.temperature is None else request.temperature
    top_p = card.sampling.top_p if request.top_p is None else request.top_p
    return SamplingParameters(
        temperature=float(temperature),
        top_p=float(top_p),
        max_tokens=max_tokens,
        stop=normalize_stop(request.stop),
        seed=request.seed,
    )


def completion_id(task_id: TaskId) -> str:
    return f"chatcmpl-{task_id.removeprefix('task-')}"


def usage_body(usage: Usage) -> UsageBody:
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def chat_completion(
    response_id: str, created: int, model: str, completion: Completion
) -> ChatCompletion:
    return ChatCompletion(
        id=response_id,
        created=created,
        model=model,
        choices=(
            CompletionChoice(
                message=AssistantMessage(content=completion.text),
                finish_reason=completion.finish_reason,
            ),
        ),
        usage=usage_body(completion.usage),
    )


@final
class ChunkRenderer:
    """Renders the `chat.completion.chunk` events of one streamed response as JSON text."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self._response_id = response_id
        self._created = created
        self._model = model

    def _chunk(self, choices: tuple[ChunkChoice, ...], usage: UsageBody | None = None) -> str:
        return ChatCompletionChunk(
            id=self._response_id,
            created=self._created,
            model=self._model,
            choices=choices,
            usage=usage,
        ).model_dump_json()

    def role(self) -> str:
        return self._chunk((ChunkChoice(delta=RoleDelta()),))

    def content(self, text: str) -> str:
        return self._chunk((ChunkChoice(delta=ContentDelta(content=text)),))

    def finish(self, reason: FinishReason) -> str:
        return self._chunk((ChunkChoice(delta=EmptyDelta(), finish_reason=reason),))

    def usage(self, usage: Usage) -> str:
        return self._chunk((), usage=usage_body(usage))
