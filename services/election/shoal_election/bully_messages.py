"""What the bully election says on the wire, and how candidates are ranked.

Messages travel as JSON over the election's direct NATS connections to every peer (DESIGN §2).
Two kinds are enough: liveness and the view of the master ride on the periodic `Heartbeat`, and
a node that has just made itself master says so at once with a `Coordinator` instead of waiting
for its next heartbeat. The classic bully `Election`/`Answer` round trip is not needed: every
heartbeat carries the sender's candidate identity, so each node already knows the rank of every
live peer and can decide alone whether it is the one that must stand.
"""

from typing import Annotated, Final, Literal

from pydantic import Field, TypeAdapter
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import NodeId

# Term 0 means "no election has happened yet" (a node's first start); every claim is >= 1.
Term = Annotated[int, Field(ge=0)]


class Candidate(FrozenModel):
    """Who a node is in an election. Static for the life of the process."""

    node_id: NodeId
    # Configured; higher wins. Lets an operator prefer the machine with the most memory.
    priority: int
    # The node's first-start time (epoch seconds, persisted): an earlier start is more senior
    # and wins a tie on priority, so a long-serving node is not displaced by a newcomer.
    seniority: float = Field(allow_inf_nan=False)


RankKey = tuple[int, float, str]


def rank_key(candidate: Candidate) -> RankKey:
    """Greater key = higher rank: priority, then seniority, then the greater node id.

    Seniority is negated because an earlier first start must rank higher. The node id is the
    last tie-break only so that the order is total (two nodes are never equal).
    """
    return (candidate.priority, -candidate.seniority, candidate.node_id)


def outranks(challenger: Candidate, incumbent: Candidate) -> bool:
    return rank_key(challenger) > rank_key(incumbent)


class Heartbeat(FrozenModel):
    """Broadcast every heartbeat interval: proof of life plus the sender's current view."""

    kind: Literal["heartbeat"] = "heartbeat"
    sender: Candidate
    term: Term
    # Whom the sender follows in `term`; itself when it is the master; None when it knows none.
    master_node_id: NodeId | None
    # The last term the sender made itself master of since it started (None: never). A master
    # that had not heard of that claim learns it met the other side of a healed partition,
    # even when the rival has already stepped down.
    last_claimed_term: Term | None


class Coordinator(FrozenModel):
    """The winner's announcement: the sender is the master of `term` (a new term)."""

    kind: Literal["coordinator"] = "coordinator"
    sender: Candidate
    term: Term = Field(ge=1)


ElectionMessage = Annotated[Heartbeat | Coordinator, Field(discriminator="kind")]

ELECTION_MESSAGE_ADAPTER: Final[TypeAdapter[Heartbeat | Coordinator]] = TypeAdapter(ElectionMessage)


def claimed_master(message: Heartbeat | Coordinator) -> NodeId | None:
    """The master the message names for its term (a coordinator names its sender)."""
    match message:
        case Heartbeat():
            return message.master_node_id
        case Coordinator():
            return message.sender.node_id


def last_claimed_term(message: Heartbeat | Coordinator) -> int | None:
    """The last term the sender itself claimed, as far as the message tells."""
    match message:
        case Heartbeat():
            return message.last_claimed_term
        case Coordinator():
            return message.term
