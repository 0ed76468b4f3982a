"""The wire types of OpenAI's chat completions API: lenient requests, exact responses."""

from typing import Literal

from pydantic import Field
from shoal_shared.frozen import FrozenModel

from shoal_api.bodies import LenientRequest

# --- requests ---------------------------------------------------------------------------


class ContentPart(LenientRequest):
    """One element of an array `content`. Only text parts carry anything we can serve; the
    other types are accepted here so that the translation can name them in its error."""

    type: str
    text: str | None = None


class RequestMessage(LenientRequest):
    # "developer" is OpenAI's newer name for "system" (o1 and later models).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None is legal for an assistant message that only carried tool calls.
    content: str | tuple[ContentPart, ...] | None = None


class StreamOptions(LenientRequest):
    include_usage: bool = False


class ChatCompletionRequest(LenientRequest):
    model: str = Field(min_length=1)
    messages: tuple[RequestMessage, ...] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | tuple[str, ...] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None


# --- responses --------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class UsageBody(FrozenModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(FrozenModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class CompletionChoice(FrozenModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(FrozenModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: tuple[CompletionChoice, ...]
    usage: UsageBody


class RoleDelta(FrozenModel):
    """The first delta of a stream announces the role, as OpenAI's does."""

    role: Literal["assistant"] = "assistant"
    content: str = ""


class ContentDelta(FrozenModel):
    content: str


class EmptyDelta(FrozenModel):
    pass


class ChunkChoice(FrozenModel):
    index: int = 0
    delta: RoleDelta | ContentDelta | EmptyDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(FrozenModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    # Empty in the usage chunk that `stream_options.include_usage` adds at the end.
    choices: tuple[ChunkChoice, ...]
    usage: UsageBody | None = None
