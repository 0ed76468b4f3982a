"""What a node's election process announces to the other processes of its node."""

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import NodeId


class ElectionOutcome(FrozenModel):
    master_node_id: NodeId
    term: int = Field(ge=1)
    # Peers the election hears now (heartbeats over direct NATS connections); the active
    # master turns changes of this set into NodeDiscovered / NodeLost events.
    live_peers: tuple[NodeId, ...] = ()
