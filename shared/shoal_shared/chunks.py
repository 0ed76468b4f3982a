"""Token chunks: from the rank-0 runner's worker to the API that owns the request.

They bypass the event log. Each carries a sequence number starting at 0 so that the receiver
detects a gap instead of silently producing a hole in the text.
"""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import TaskId

FinishReason = Literal["stop", "length", "cancelled"]


class Usage(FrozenModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenChunk(FrozenModel):
    kind: Literal["token"] = "token"
    task_id: TaskId
    sequence: int = Field(ge=0)
    text: str
    token_ids: tuple[int, ...]


class FinishChunk(FrozenModel):
    kind: Literal["finish"] = "finish"
    task_id: TaskId
    sequence: int = Field(ge=0)
    finish_reason: FinishReason
    usage: Usage


class ErrorChunk(FrozenModel):
    kind: Literal["error"] = "error"
    task_id: TaskId
    sequence: int = Field(ge=0)
    message: str


Chunk = Annotated[TokenChunk | FinishChunk | ErrorChunk, Field(discriminator="kind")]
