"""Work the cluster does for a client: a chat completion handed to one instance."""

from typing import Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, TaskId


class ChatMessage(FrozenModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class SamplingParameters(FrozenModel):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None


class ChatTask(FrozenModel):
    kind: Literal["chat"] = "chat"
    task_id: TaskId
    instance_id: InstanceId
    model_id: ModelId
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParameters
    # The node whose API waits for the chunks; kept so a node that leaves can fail its tasks.
    requester_node_id: NodeId


# One kind of task today; the `kind` tag keeps room for others (embeddings, image input).
Task = ChatTask
