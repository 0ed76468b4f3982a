"""The bully election as a pure state machine: inputs in, outputs out, no I/O, no clock.

The wiring (NATS connections to every peer, the term file, the leaf topology) feeds `Tick`s and
`Received` messages with a monotonic `now`, and carries out the returned outputs in order. Tick
at least every half heartbeat interval (0.05-0.1 s): every decision is re-evaluated on each
input, so the tick rate bounds how late a timeout is noticed.

Policy, in one place:

- Rank: priority, then seniority (earlier first start), then the greater node id (see
  `bully_messages.rank_key`).
- Liveness comes only from received messages: a peer is live while it was heard within
  `peer_timeout`. Any message, even one with a stale term, proves life.
- Terms: a node keeps the highest term it has seen (adopting any higher one) and a new master
  takes that term + 1. A `PersistTerm` always precedes the messages of one `handle` call, so
  the wiring persists a term before anything carrying it is sent.
- Who stands: after a `startup_grace` (time to hear the peers before acting), the highest-ranked
  live node makes itself master when there is no live master. A node that outranks a live
  master takes over with a new term only after `takeover_hold` of uptime, so a node that
  crash-loops never deposes anyone. A node that does not outrank the master never deposes it,
  whatever term it comes back with: it adopts the current term and follows.
- Every claim (a new term for oneself) requires that no live peer outranks the claimant, so two
  nodes that hear each other never claim the same term. Without a quorum that is all one can
  promise: the two sides of a partition may each claim the same term.
- Split brain: when a master hears that a lower-ranked node claimed its own term, or an older
  term it had not heard of when it was elected (heartbeats carry the sender's last claimed
  term, so this holds even after the rival stepped down), it opens a new term. With bully
  takeover this makes a healed partition converge on the highest-ranked live node under a term
  higher than both sides'. The one exception: a winner elected while it already knew the
  loser's claim (the loser was cut off after that claim had reached the winner's side) keeps
  its term, which then already supersedes the loser's.
"""

from dataclasses import dataclass
from typing import Self, final

from pydantic import Field, model_validator
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import NodeId

from shoal_election.bully_messages import (
    Candidate,
    Coordinator,
    ElectionMessage,
    Heartbeat,
    claimed_master,
    last_claimed_term,
    outranks,
)


class ElectionTiming(FrozenModel):
    """Seconds. The defaults elect a new master ~1.5 s after the old one's last heartbeat."""

    heartbeat_interval: float = Field(default=0.25, gt=0)
    # Several missed heartbeats in a row before a peer counts as dead: one lost message must
    # not trigger an election.
    peer_timeout: float = Field(default=1.5, gt=0)
    # How long a node that has just started listens before it may make itself master, so that
    # nodes started together hear each other first and elect once.
    startup_grace: float = Field(default=1.0, gt=0)
    # Uptime a node needs before it deposes a live master it outranks (anti-flapping).
    takeover_hold: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _check_proportions(self) -> Self:
        if self.peer_timeout < 3 * self.heartbeat_interval:
            raise ValueError("peer_timeout must span at least three heartbeats")
        if self.startup_grace < 2 * self.heartbeat_interval:
            raise ValueError("startup_grace must span at least two heartbeats")
        if self.takeover_hold < self.startup_grace:
            raise ValueError("takeover_hold must not be shorter than startup_grace")
        return self


# Inputs and outputs never leave the process, so they are plain frozen dataclasses.


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Received:
    message: ElectionMessage
    now: float


ElectionInput = Tick | Received


@dataclass(frozen=True, slots=True)
class Send:
    to: NodeId
    message: ElectionMessage


@dataclass(frozen=True, slots=True)
class Broadcast:
    message: ElectionMessage


@dataclass(frozen=True, slots=True)
class PersistTerm:
    term: int


@dataclass(frozen=True, slots=True)
class MasterChanged:
    """The view changed. `master_node_id` None: the master died and none is known yet."""

    master_node_id: NodeId | None
    term: int


@dataclass(frozen=True, slots=True)
class PeerAlive:
    node_id: NodeId


@dataclass(frozen=True, slots=True)
class PeerDead:
    node_id: NodeId


ElectionOutput = Send | Broadcast | PersistTerm | MasterChanged | PeerAlive | PeerDead


@dataclass(slots=True)
class _Peer:
    candidate: Candidate
    last_heard: float


@final
class BullyElection:
    def __init__(self, me: Candidate, persisted_term: int, timing: ElectionTiming) -> None:
        if persisted_term < 0:
            raise ValueError(f"persisted term {persisted_term} is negative")
        self._me = me
        self._timing = timing
        self._term = persisted_term
        # A restarted node never resumes as master of its old term: it listens, then elects.
        self._master: NodeId | None = None
        # When the current view was adopted: a master named by gossip gets one peer timeout to
        # be heard directly before it counts as dead.
        self._view_since = 0.0
        self._started_at: float | None = None
        self._next_heartbeat_at: float | None = None
        self._peers: dict[NodeId, _Peer] = {}
        # The highest term each node has been seen claiming, and a copy taken when this node
        # last became master: a claim outside the copy is news of a split brain.
        self._claims_seen: dict[NodeId, int] = {}
        self._claims_known_when_elected: dict[NodeId, int] = {}
        self._last_claimed_term: int | None = None
        self._messages: list[Send | Broadcast] = []
        self._peer_changes: list[PeerAlive | PeerDead] = []

    @property
    def me(self) -> Candidate:
        return self._me

    @property
    def master(self) -> NodeId | None:
        return self._master

    @property
    def term(self) -> int:
        return self._term

    @property
    def live_peers(self) -> frozenset[NodeId]:
        return frozenset(self._peers)

    def handle(self, event: ElectionInput) -> tuple[ElectionOutput, ...]:
        now = event.now
        if self._started_at is None:
            self._started_at = now
        term_before, master_before = self._term, self._master
        self._messages = []
        self._peer_changes = []
        if isinstance(event, Received):
            self._receive(event.message, now)
        self._expire_silent_peers(now)
        self._stand_if_due(now)
        if isinstance(event, Tick):
            self._heartbeat_if_due(now)
        # Coalesced: one PersistTerm for the final term, before every message of this step.
        outputs: list[ElectionOutput] = []
        if self._term > term_before:
            outputs.append(PersistTerm(self._term))
        outputs.extend(self._peer_changes)
        if (self._master, self._term) != (master_before, term_before):
            outputs.append(MasterChanged(self._master, self._term))
        outputs.extend(self._messages)
        return tuple(outputs)

    # --- receiving ---------------------------------------------------------------------------

    def _receive(self, message: ElectionMessage, now: float) -> None:
        sender = message.sender
        if sender.node_id == self._me.node_id:
            return  # our own broadcast echoed back
        self._hear(sender, now)
        claimed = claimed_master(message)
        rival_term = last_claimed_term(message)
        self._note_claim(claimed, message.term)
        self._note_claim(sender.node_id, rival_term)
        if message.term > self._term:
            # A claim naming us for a term we never held cannot be trusted: adopt the term only.
            self._adopt(message.term, None if claimed == self._me.node_id else claimed, now)
        elif message.term == self._term:
            self._same_term_claim(sender, claimed, now)
        else:
            # Stale for the view, but tell the sender the current one now rather than at our
            # next heartbeat.
            self._messages.append(Send(sender.node_id, self._heartbeat()))
        if rival_term is not None and rival_term < self._term:
            self._merge_if_rival(sender, rival_term, now)

    def _note_claim(self, node_id: NodeId | None, term: int | None) -> None:
        if node_id is not None and term is not None:
            self._claims_seen[node_id] = max(self._claims_seen.get(node_id, -1), term)

    def _hear(self, sender: Candidate, now: float) -> None:
        peer = self._peers.get(sender.node_id)
        if peer is None:
            self._peers[sender.node_id] = _Peer(candidate=sender, last_heard=now)
            self._peer_changes.append(PeerAlive(sender.node_id))
        else:
            peer.candidate = sender
            peer.last_heard = max(peer.last_heard, now)

    def _adopt(self, term: int, master: NodeId | None, now: float) -> None:
        self._term = term
        self._master = master
        self._view_since = now

    def _same_term_claim(self, sender: Candidate, claimed: NodeId | None, now: float) -> None:
        if claimed == self._master or claimed == self._me.node_id:
            return
        if sender.node_id == self._master:
            # Our master no longer claims this term (it stepped down after a split brain):
            # follow whom it follows rather than a master that does not believe it is one.
            self._adopt(self._term, claimed, now)
            return
        if claimed is None:
            return
        if claimed != sender.node_id:
            # Gossip fills a gap only with a master we hear ourselves; re-adopting one we have
            # just declared dead would postpone the election for another timeout.
            if self._master is None and claimed in self._peers:
                self._adopt(self._term, claimed, now)
            return
        # The sender itself claims our term.
        if self._master is None:
            self._adopt(self._term, claimed, now)
        elif self._master == self._me.node_id:
            # Two masters in one term (a healed partition): the higher-ranked stays and opens a
            # new term when it may stand; the other steps down and follows it meanwhile.
            if not outranks(self._me, sender):
                self._adopt(self._term, claimed, now)
            elif self._highest_live():
                self._become_master(now)
        else:
            current = self._peers.get(self._master)
            if current is None or outranks(sender, current.candidate):
                self._adopt(self._term, claimed, now)

    def _merge_if_rival(self, sender: Candidate, rival_term: int, now: float) -> None:
        """The sender was master of an older term that we had not heard of when elected: the
        other side of a healed partition. Open a new term, so that the merged cluster's term is
        higher than both sides'. A claim we knew of is already superseded by our term: acting
        on it again would bump the term on every delayed heartbeat of the master we replaced.
        """
        if (
            self._master == self._me.node_id
            and outranks(self._me, sender)
            and rival_term > self._claims_known_when_elected.get(sender.node_id, -1)
            and self._highest_live()
        ):
            self._become_master(now)

    # --- time-driven ---------------------------------------------------------------------------

    def _expire_silent_peers(self, now: float) -> None:
        timeout = self._timing.peer_timeout
        for node_id, peer in list(self._peers.items()):
            if now - peer.last_heard >= timeout:
                del self._peers[node_id]
                self._peer_changes.append(PeerDead(node_id))
        master = self._master
        if (
            master is not None
            and master != self._me.node_id
            and master not in self._peers
            and now - self._view_since >= timeout
        ):
            self._master = None

    def _stand_if_due(self, now: float) -> None:
        """Re-evaluated on every input, so lost or reordered messages cannot wedge it."""
        if self._master == self._me.node_id or self._uptime(now) < self._timing.startup_grace:
            return
        if not self._highest_live():
            return  # a live higher-ranked node is the one to stand
        if self._master is None:
            self._become_master(now)
        elif self._master in self._peers and self._uptime(now) >= self._timing.takeover_hold:
            # Bully takeover of a live master we outrank. A master known only by gossip is
            # left alone until we hear it (or it times out), so we never depose a stranger.
            self._become_master(now)

    def _highest_live(self) -> bool:
        """Every claim requires it: two nodes that hear each other never claim one term."""
        return not any(outranks(peer.candidate, self._me) for peer in self._peers.values())

    def _become_master(self, now: float) -> None:
        self._adopt(self._term + 1, self._me.node_id, now)
        self._claims_seen[self._me.node_id] = self._term
        self._claims_known_when_elected = dict(self._claims_seen)
        self._last_claimed_term = self._term
        self._messages.append(Broadcast(Coordinator(sender=self._me, term=self._term)))

    def _heartbeat_if_due(self, now: float) -> None:
        due = self._next_heartbeat_at
        if due is not None and now < due:
            return
        # Keep the cadence of the schedule, not of the ticks, but never burst after a stall.
        interval = self._timing.heartbeat_interval
        if due is not None and due + interval > now:
            self._next_heartbeat_at = due + interval
        else:
            self._next_heartbeat_at = now + interval
        self._messages.append(Broadcast(self._heartbeat()))

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            sender=self._me,
            term=self._term,
            master_node_id=self._master,
            last_claimed_term=self._last_claimed_term,
        )

    def _uptime(self, now: float) -> float:
        return 0.0 if self._started_at is None else now - self._started_at
