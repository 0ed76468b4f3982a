"""The subject map (DESIGN.md section 3). Every subject the services use is built here.

Subjects that a JetStream stream captures are disjoint per domain: a publish is stored by every
stream, in any domain, that captures its subject.
"""

from shoal_shared.ids import NodeId, TaskId

GLOBAL_EVENTS_STREAM = "SHOAL_GLOBAL_EVENTS"
LOCAL_EVENTS_STREAM = "SHOAL_LOCAL_EVENTS"
COMMANDS = "shoal.commands"


def global_events(master_node_id: NodeId) -> str:
    """Captured by the global stream in the master's own domain; only that master appends."""
    return f"shoal.events.global.{master_node_id}"


def local_events(node_id: NodeId) -> str:
    """Captured by the local stream in the node's own domain."""
    return f"shoal.events.local.{node_id}"


def chunks(task_id: TaskId) -> str:
    return f"shoal.chunks.{task_id}"


def election_outcome(node_id: NodeId) -> str:
    """The node's election process announces the current master and term here."""
    return f"shoal.node.{node_id}.election"


def election_query(node_id: NodeId) -> str:
    """Request/reply: ask the node's election process for the current outcome."""
    return f"shoal.node.{node_id}.election.query"


def downloads(node_id: NodeId) -> str:
    return f"shoal.downloads.{node_id}"


def election_inbox(node_id: NodeId) -> str:
    """Election messages for one node, published on that node's server by its peers."""
    return f"shoal.election.inbox.{node_id}"


def election_whoami(node_id: NodeId) -> str:
    """Request/reply on a peer's server: its advert (addresses and ports)."""
    return f"shoal.election.whoami.{node_id}"
