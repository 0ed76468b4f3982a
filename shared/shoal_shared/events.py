"""Everything that can happen to the cluster. State is a fold of these (see apply.py)."""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.downloads import Download
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance
from shoal_shared.model_card import ModelCard
from shoal_shared.runner_status import RunnerStatus
from shoal_shared.tasks import Task
from shoal_shared.telemetry import NodeTelemetry


class MasterElected(FrozenModel):
    kind: Literal["master_elected"] = "master_elected"
    master_node_id: NodeId
    term: int = Field(ge=1)


class NodeDiscovered(FrozenModel):
    """The master's election sees the node alive (NATS heartbeats): index its local stream."""

    kind: Literal["node_discovered"] = "node_discovered"
    node_id: NodeId


class NodeLost(FrozenModel):
    """The master's election stopped hearing the node: it leaves state with its runners."""

    kind: Literal["node_lost"] = "node_lost"
    node_id: NodeId


class NodeTelemetryUpdated(FrozenModel):
    kind: Literal["node_telemetry_updated"] = "node_telemetry_updated"
    node_id: NodeId
    telemetry: NodeTelemetry


class InstanceCreated(FrozenModel):
    kind: Literal["instance_created"] = "instance_created"
    instance: Instance


class InstanceDeleted(FrozenModel):
    kind: Literal["instance_deleted"] = "instance_deleted"
    instance_id: InstanceId


class RunnerStatusChanged(FrozenModel):
    kind: Literal["runner_status_changed"] = "runner_status_changed"
    runner_id: RunnerId
    instance_id: InstanceId
    node_id: NodeId
    status: RunnerStatus


class TaskCreated(FrozenModel):
    kind: Literal["task_created"] = "task_created"
    task: Task


class TaskCancelRequested(FrozenModel):
    kind: Literal["task_cancel_requested"] = "task_cancel_requested"
    task_id: TaskId


TaskOutcome = Literal["completed", "cancelled", "failed"]


class TaskFinished(FrozenModel):
    kind: Literal["task_finished"] = "task_finished"
    task_id: TaskId
    outcome: TaskOutcome
    error: str | None = None


class DownloadUpdated(FrozenModel):
    """A node's files for a model: pending, ongoing (at most about one per second), done."""

    kind: Literal["download_updated"] = "download_updated"
    download: Download


class DownloadRemoved(FrozenModel):
    """The node deleted its files of the model."""

    kind: Literal["download_removed"] = "download_removed"
    node_id: NodeId
    model_id: ModelId


class ModelAdded(FrozenModel):
    """A model beyond the built-in catalogue: added from the hub or imported from a GGUF."""

    kind: Literal["model_added"] = "model_added"
    card: ModelCard


Event = Annotated[
    MasterElected
    | NodeDiscovered
    | NodeLost
    | NodeTelemetryUpdated
    | InstanceCreated
    | InstanceDeleted
    | RunnerStatusChanged
    | TaskCreated
    | TaskCancelRequested
    | TaskFinished
    | DownloadUpdated
    | DownloadRemoved
    | ModelAdded,
    Field(discriminator="kind"),
]


class LocalOrigin(FrozenModel):
    """Where an indexed event came from: a node's local stream and its sequence there."""

    node_id: NodeId
    sequence: int = Field(ge=1)


class LocalEnvelope(FrozenModel):
    """What a node appends to its own local stream for the master to index."""

    node_id: NodeId
    event: Event


class IndexedEvent(FrozenModel):
    """One entry of the global log, appended only by the active master of `term`."""

    index: int = Field(ge=0)
    term: int = Field(ge=1)
    event: Event
    origin: LocalOrigin | None = None
