"""The cluster's state: what every process gets by folding the global log."""

from pydantic import Field

from shoal_shared.downloads import Download
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance
from shoal_shared.model_card import ModelCard
from shoal_shared.runner_status import RunnerStatus
from shoal_shared.tasks import Task
from shoal_shared.telemetry import NodeTelemetry


class NodeInfo(FrozenModel):
    node_id: NodeId
    telemetry: NodeTelemetry


class RunnerInfo(FrozenModel):
    runner_id: RunnerId
    instance_id: InstanceId
    node_id: NodeId
    status: RunnerStatus


class State(FrozenModel):
    # Index of the last applied event; -1 before the first.
    last_index: int = -1
    term: int = 0
    master_node_id: NodeId | None = None
    # Nodes the master's election sees alive; `nodes` holds those that reported telemetry.
    members: frozenset[NodeId] = frozenset()
    nodes: dict[NodeId, NodeInfo] = Field(default_factory=dict)
    instances: dict[InstanceId, Instance] = Field(default_factory=dict)
    runners: dict[RunnerId, RunnerInfo] = Field(default_factory=dict)
    tasks: dict[TaskId, Task] = Field(default_factory=dict)
    # Tasks a client cancelled; each leaves state (and this set) when its worker reports it done.
    cancelling: frozenset[TaskId] = frozenset()
    # What model files each node has (or is fetching): node -> model -> record.
    downloads: dict[NodeId, dict[ModelId, Download]] = Field(default_factory=dict)
    # Models added at run time (from the hub or a GGUF import), beside the built-in cards.
    added_models: dict[ModelId, ModelCard] = Field(default_factory=dict)
    # Highest sequence of each node's local stream already indexed, so that a master (this one
    # or the next) indexes every local event exactly once.
    local_sequences: dict[NodeId, int] = Field(default_factory=dict)

    def download(self, node_id: NodeId, model_id: ModelId) -> Download | None:
        """The node's record of the model's files, if it has one."""
        return self.downloads.get(node_id, {}).get(model_id)
