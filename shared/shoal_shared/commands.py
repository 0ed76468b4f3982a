"""Requests to the active master, answered on `shoal.commands` by request/reply."""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from shoal_shared.instances import Sharding
from shoal_shared.tasks import Task


class PlaceInstance(FrozenModel):
    kind: Literal["place_instance"] = "place_instance"
    command_id: CommandId
    model_id: ModelId
    sharding: Sharding = "pipeline"
    # When given, the placement must use exactly these nodes (a user forcing a layout).
    node_ids: tuple[NodeId, ...] | None = None
    node_count: int | None = Field(default=None, ge=1)


class DeleteInstance(FrozenModel):
    kind: Literal["delete_instance"] = "delete_instance"
    command_id: CommandId
    instance_id: InstanceId


class SubmitTask(FrozenModel):
    kind: Literal["submit_task"] = "submit_task"
    command_id: CommandId
    task: Task


class CancelTask(FrozenModel):
    kind: Literal["cancel_task"] = "cancel_task"
    command_id: CommandId
    task_id: TaskId


Command = Annotated[
    PlaceInstance | DeleteInstance | SubmitTask | CancelTask,
    Field(discriminator="kind"),
]

RejectionCode = Literal["not_found", "invalid", "conflict", "unavailable"]


class CommandAccepted(FrozenModel):
    outcome: Literal["accepted"] = "accepted"
    command_id: CommandId
    # The id of what the command created (an instance id for PlaceInstance), if anything.
    created_id: str | None = None


class CommandRejected(FrozenModel):
    outcome: Literal["rejected"] = "rejected"
    command_id: CommandId
    code: RejectionCode
    reason: str


CommandReply = Annotated[CommandAccepted | CommandRejected, Field(discriminator="outcome")]
