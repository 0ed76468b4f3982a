"""Where a model runs: an instance and the shard each of its runners holds."""

from typing import Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId

Sharding = Literal["pipeline", "tensor"]


class ShardAssignment(FrozenModel):
    runner_id: RunnerId
    node_id: NodeId
    rank: int = Field(ge=0)
    # Pipeline shards hold layers [start_layer, end_layer); a tensor shard holds every layer.
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1)
    # "ip:port" of this rank in the instance's mx.distributed ring; None when it runs alone.
    ring_address: str | None = None


class Instance(FrozenModel):
    instance_id: InstanceId
    model_id: ModelId
    sharding: Sharding
    layer_count: int = Field(ge=1)
    shards: tuple[ShardAssignment, ...] = Field(min_length=1)

    def shard_on(self, node_id: NodeId) -> ShardAssignment | None:
        return next((shard for shard in self.shards if shard.node_id == node_id), None)

    @property
    def first_shard(self) -> ShardAssignment:
        return min(self.shards, key=lambda shard: shard.rank)
