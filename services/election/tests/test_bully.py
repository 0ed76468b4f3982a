"""The bully election, driven by a deterministic network simulator.

The simulator owns a virtual clock, a queue of messages in flight (with seeded delay, loss,
reordering and partitions) and a "disk" per node holding its persisted term. On every step it
checks the invariants that must hold at all times:

- a term is persisted before any message carrying it is sent;
- a node's term never goes back, also across restarts;
- `MasterChanged` is emitted exactly when a node's (master, term) view changes;
- `PeerAlive`/`PeerDead` track `live_peers` exactly;
- two nodes claim the same term only if they could not hear each other around that time
  (a partition or a crash): without a quorum nothing stronger can hold.
"""

import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, final

import pytest
from pydantic import ValidationError
from shoal_election.bully import (
    Broadcast,
    BullyElection,
    ElectionInput,
    ElectionOutput,
    ElectionTiming,
    MasterChanged,
    PeerAlive,
    PeerDead,
    PersistTerm,
    Received,
    Send,
    Tick,
)
from shoal_election.bully_messages import (
    ELECTION_MESSAGE_ADAPTER,
    Candidate,
    Coordinator,
    ElectionMessage,
    Heartbeat,
    outranks,
    rank_key,
)
from shoal_shared.ids import NodeId

TIMING: Final = ElectionTiming()
A: Final = NodeId("node-a")
B: Final = NodeId("node-b")
C: Final = NodeId("node-c")
D: Final = NodeId("node-d")
MAX_CLAIMS: Final = 50


def candidate(node_id: NodeId, priority: int = 0, seniority: float = 100.0) -> Candidate:
    return Candidate(node_id=node_id, priority=priority, seniority=seniority)


# A outranks B outranks C outranks D by priority alone.
RANKED: Final = (candidate(A, 3), candidate(B, 2), candidate(C, 1), candidate(D, 0))


@dataclass(frozen=True, slots=True)
class Claim:
    """A node made itself master of `term` at `time`."""

    term: int
    node_id: NodeId
    time: float


@dataclass(slots=True)
class SimulatedNode:
    candidate: Candidate
    disk_term: int
    machine: BullyElection | None = None
    # The highest term the node ever held, over all its lifetimes.
    highest_term: int = 0
    live_peers: set[NodeId] = field(default_factory=set[NodeId])


@dataclass(order=True, frozen=True, slots=True)
class Delivery:
    time: float
    sequence: int
    sender: NodeId = field(compare=False)
    receiver: NodeId = field(compare=False)
    message: ElectionMessage = field(compare=False)


@final
class Cluster:
    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        seed: int = 0,
        loss: float = 0.0,
        max_delay: float = 0.02,
        tick_interval: float = 0.05,
        persisted_terms: dict[NodeId, int] | None = None,
    ) -> None:
        terms = persisted_terms or {}
        self.nodes = {
            each.node_id: SimulatedNode(each, terms.get(each.node_id, 0)) for each in candidates
        }
        self.random = random.Random(seed)
        self.loss = loss
        self.max_delay = max_delay
        self.tick_interval = tick_interval
        self.steps = 0
        self.now = 0.0
        self.in_flight: list[Delivery] = []
        self.sequence = itertools.count()
        self.group_of = dict.fromkeys(self.nodes, 0)
        self.connected_since: dict[frozenset[NodeId], float] = {}
        self.claims: list[Claim] = []
        self.views: dict[NodeId, list[MasterChanged]] = {node_id: [] for node_id in self.nodes}
        # Within this long a claim may not have reached a connected peer yet (first heartbeat
        # after a start, plus delivery), so same-term claims inside it are not a violation.
        self.claim_margin = TIMING.heartbeat_interval + tick_interval + max_delay

    # --- topology ------------------------------------------------------------------------------

    def start(self, *node_ids: NodeId) -> None:
        for node_id in node_ids or tuple(self.nodes):
            node = self.nodes[node_id]
            assert node.machine is None
            node.machine = BullyElection(node.candidate, node.disk_term, TIMING)
            node.live_peers = set()
        self._refresh_connectivity()

    def crash(self, node_id: NodeId) -> None:
        self.nodes[node_id].machine = None
        self._refresh_connectivity()

    def partition(self, *groups: Iterable[NodeId]) -> None:
        for index, group in enumerate(groups):
            for node_id in group:
                self.group_of[node_id] = index
        self._refresh_connectivity()

    def heal(self) -> None:
        self.group_of = dict.fromkeys(self.nodes, 0)
        self._refresh_connectivity()

    def up(self) -> list[NodeId]:
        return sorted(node_id for node_id, node in self.nodes.items() if node.machine)

    def connected(self, first: NodeId, second: NodeId) -> bool:
        return (
            self.nodes[first].machine is not None
            and self.nodes[second].machine is not None
            and self.group_of[first] == self.group_of[second]
        )

    def _refresh_connectivity(self) -> None:
        for first, second in itertools.combinations(sorted(self.nodes), 2):
            pair = frozenset((first, second))
            if self.connected(first, second):
                self.connected_since.setdefault(pair, self.now)
            else:
                self.connected_since.pop(pair, None)

    # --- running -------------------------------------------------------------------------------

    def machine(self, node_id: NodeId) -> BullyElection:
        machine = self.nodes[node_id].machine
        assert machine is not None, f"{node_id} is down"
        return machine

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, seconds)

    def run_until(self, condition: Callable[[], bool], limit: float) -> float | None:
        """Seconds of simulated time until `condition` holds, or None within `limit`."""
        started = self.now
        while self.now - started < limit - 1e-9:
            self.steps += 1
            step_end = self.steps * self.tick_interval
            while self.in_flight and self.in_flight[0].time <= step_end:
                self._deliver(heapq.heappop(self.in_flight))
            self.now = step_end
            order = self.up()
            self.random.shuffle(order)
            for node_id in order:
                self._handle(node_id, Tick(step_end))
            if condition():
                return self.now - started
        return None

    def _deliver(self, delivery: Delivery) -> None:
        self.now = delivery.time
        if self.connected(delivery.sender, delivery.receiver):
            self._handle(delivery.receiver, Received(delivery.message, delivery.time))

    def _handle(self, node_id: NodeId, event: ElectionInput) -> None:
        node = self.nodes[node_id]
        machine = self.machine(node_id)
        before = (machine.master, machine.term)
        outputs = machine.handle(event)
        after = (machine.master, machine.term)
        changes = [output for output in outputs if isinstance(output, MasterChanged)]
        expected = [MasterChanged(*after)] if after != before else []
        assert changes == expected, f"{node_id}: {before} -> {after} announced as {changes}"
        self.views[node_id].extend(changes)
        assert machine.term >= node.highest_term, f"{node_id}: term went back"
        node.highest_term = machine.term
        self._carry_out(node, outputs, event.now)
        assert node.disk_term == machine.term, f"{node_id}: term {machine.term} not persisted"
        assert node.live_peers == machine.live_peers
        if after != before and after[0] == node_id:
            self._record_claim(Claim(after[1], node_id, event.now))

    def _carry_out(
        self, node: SimulatedNode, outputs: Sequence[ElectionOutput], now: float
    ) -> None:
        sender = node.candidate.node_id
        for output in outputs:
            match output:
                case PersistTerm(term=term):
                    assert term > node.disk_term
                    node.disk_term = term
                case Send(to=to, message=message):
                    assert message.term <= node.disk_term, "sent a term before persisting it"
                    self._transmit(sender, to, message, now)
                case Broadcast(message=message):
                    assert message.term <= node.disk_term, "sent a term before persisting it"
                    for receiver in self.nodes:
                        if receiver != sender:
                            self._transmit(sender, receiver, message, now)
                case PeerAlive(node_id=peer):
                    assert peer not in node.live_peers
                    node.live_peers.add(peer)
                case PeerDead(node_id=peer):
                    node.live_peers.remove(peer)
                case MasterChanged():
                    pass

    def _transmit(
        self, sender: NodeId, receiver: NodeId, message: ElectionMessage, now: float
    ) -> None:
        if not self.connected(sender, receiver) or self.random.random() < self.loss:
            return
        delay = self.random.uniform(0.001, self.max_delay)
        delivery = Delivery(now + delay, next(self.sequence), sender, receiver, message)
        heapq.heappush(self.in_flight, delivery)

    def _record_claim(self, claim: Claim) -> None:
        # Fail fast on a term storm instead of simulating it to the end.
        assert len(self.claims) < MAX_CLAIMS, f"{len(self.claims)} elections: a term storm"
        for earlier in self.claims:
            if earlier.term != claim.term or earlier.node_id == claim.node_id:
                continue
            since = self.connected_since.get(frozenset((earlier.node_id, claim.node_id)))
            assert since is None or since > earlier.time - self.claim_margin, (
                f"{earlier} and {claim}: one term, two masters that could hear each other"
            )
        self.claims.append(claim)

    # --- observations --------------------------------------------------------------------------

    def agreement(self) -> tuple[NodeId, int] | None:
        """The (master, term) every running node holds, when it is one and the master runs."""
        views = {
            (self.machine(node_id).master, self.machine(node_id).term) for node_id in self.up()
        }
        if len(views) != 1:
            return None
        master, term = views.pop()
        if master is None or self.nodes[master].machine is None:
            return None
        return master, term

    def agreed(self) -> bool:
        return self.agreement() is not None

    def side_view(self, node_id: NodeId) -> tuple[NodeId | None, int]:
        machine = self.machine(node_id)
        return machine.master, machine.term


def started(candidates: Sequence[Candidate] = RANKED[:3]) -> Cluster:
    cluster = Cluster(candidates)
    cluster.start()
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    return cluster


def current_master(cluster: Cluster) -> NodeId:
    agreement = cluster.agreement()
    assert agreement is not None
    return agreement[0]


# --- ranks -------------------------------------------------------------------------------------


def test_priority_beats_seniority_beats_node_id() -> None:
    newcomer_with_priority = candidate(A, priority=1, seniority=500.0)
    veteran = candidate(B, priority=0, seniority=100.0)
    assert outranks(newcomer_with_priority, veteran)
    # Same priority: the earlier first start wins, whatever the ids.
    assert outranks(candidate(A, seniority=100.0), candidate(B, seniority=200.0))
    # Same priority and seniority: the greater node id wins.
    assert outranks(candidate(B), candidate(A))
    assert sorted([candidate(C), candidate(A), candidate(B)], key=rank_key)[-1].node_id == C


def test_the_election_follows_the_rank_order() -> None:
    priority = candidate(A, priority=1, seniority=300.0)
    senior = candidate(B, priority=0, seniority=100.0)
    greater_id = candidate(D, priority=0, seniority=200.0)
    junior = candidate(C, priority=0, seniority=200.0)
    cluster = started([priority, senior, greater_id, junior])
    assert cluster.agreement() == (A, 1)
    for expected in (B, D, C):
        cluster.crash(current_master(cluster))
        assert cluster.run_until(cluster.agreed, 3.0) is not None
        assert current_master(cluster) == expected


# --- the scenarios from the brief --------------------------------------------------------------


def test_three_nodes_started_together_agree_on_one_master() -> None:
    cluster = Cluster([candidate(A), candidate(B), candidate(C)])
    cluster.start()
    elapsed = cluster.run_until(cluster.agreed, 5.0)
    assert elapsed is not None
    assert elapsed <= TIMING.startup_grace + 0.2
    cluster.run_for(5.0)
    # Equal priority and seniority: the greatest node id wins, in a single election.
    assert cluster.agreement() == (C, 1)
    assert [claim.node_id for claim in cluster.claims] == [C]


def test_master_crash_elects_the_next_node_within_three_seconds() -> None:
    cluster = started()
    assert cluster.agreement() == (A, 1)
    cluster.crash(A)
    elapsed = cluster.run_until(cluster.agreed, 5.0)
    assert elapsed is not None
    assert elapsed < 3.0
    assert cluster.agreement() == (B, 2)


def test_restarted_master_adopts_the_term_then_takes_over_with_a_higher_one() -> None:
    cluster = started()
    cluster.crash(A)
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    assert cluster.agreement() == (B, 2)
    assert cluster.nodes[A].disk_term == 1
    cluster.start(A)
    cluster.run_for(1.0)
    # It listens first: follows the current master under the current term.
    assert cluster.side_view(A) == (B, 2)
    elapsed = cluster.run_until(lambda: cluster.agreement() == (A, 3), 5.0)
    assert elapsed is not None
    assert elapsed <= TIMING.takeover_hold
    cluster.run_for(5.0)
    assert cluster.agreement() == (A, 3)
    assert cluster.views[A][-2:] == [MasterChanged(B, 2), MasterChanged(A, 3)]


def test_healed_partition_converges_on_one_master_with_a_higher_term() -> None:
    cluster = started()
    cluster.partition([A], [B, C])
    cluster.run_for(3.0)
    assert cluster.side_view(A) == (A, 1)
    assert cluster.side_view(B) == cluster.side_view(C) == (B, 2)
    cluster.heal()
    elapsed = cluster.run_until(cluster.agreed, 5.0)
    assert elapsed is not None
    assert elapsed < 1.0
    cluster.run_for(5.0)
    assert cluster.agreement() == (A, 3)


def test_heal_opens_a_new_term_even_when_the_surviving_master_has_the_higher_one() -> None:
    cluster = started()
    cluster.partition([A, B], [C])
    cluster.run_for(3.0)
    assert cluster.side_view(C) == (C, 2)
    # Raise the A side's term above C's: A crashes, B stands, A returns and takes over.
    cluster.crash(A)
    cluster.run_for(3.0)
    cluster.start(A)
    cluster.run_for(5.0)
    assert cluster.side_view(A) == cluster.side_view(B) == (A, 3)
    cluster.heal()
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    cluster.run_for(5.0)
    assert cluster.agreement() == (A, 4)


def test_lower_ranked_former_master_returning_with_an_old_term_does_not_depose() -> None:
    cluster = started()
    cluster.crash(A)
    cluster.run_for(3.0)
    assert cluster.agreement() == (B, 2)
    # B is cut off while still master; A comes back on the other side and is elected there.
    cluster.partition([B], [A, C])
    cluster.start(A)
    cluster.run_for(5.0)
    assert cluster.side_view(A) == cluster.side_view(C) == (A, 3)
    assert cluster.side_view(B) == (B, 2)
    cluster.heal()
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    cluster.run_for(5.0)
    # A was elected knowing B's claim (C had passed it on), so its term already supersedes it.
    assert cluster.agreement() == (A, 3)
    assert [claim.node_id for claim in cluster.claims if claim.term >= 2] == [B, A]


def test_converges_under_message_loss_and_reordering() -> None:
    for seed in range(5):
        # Delays up to 0.3 s exceed the heartbeat interval, so messages overtake each other.
        cluster = Cluster(RANKED[:3], seed=seed, loss=0.2, max_delay=0.3)
        cluster.start()
        cluster.run_for(6.0)
        assert cluster.agreement() == (A, 1), seed
        cluster.crash(A)
        assert cluster.run_until(cluster.agreed, 4.0) is not None, seed
        cluster.run_for(6.0)
        assert cluster.agreement() == (B, 2), seed


def test_a_node_with_an_old_term_joins_and_adopts_the_current_term() -> None:
    cluster = Cluster(RANKED, persisted_terms={B: 7, C: 7, D: 2})
    cluster.start(B, C)
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    assert cluster.agreement() == (B, 8)
    cluster.start(D)
    elapsed = cluster.run_until(lambda: cluster.side_view(D) == (B, 8), 2.0)
    assert elapsed is not None
    assert elapsed < 0.5
    cluster.run_for(5.0)
    assert cluster.agreement() == (B, 8)
    assert cluster.nodes[D].disk_term == 8
    assert [claim.node_id for claim in cluster.claims] == [B]


def test_a_higher_ranked_node_takes_over_only_after_the_hold() -> None:
    cluster = Cluster(RANKED[:3])
    cluster.start(B, C)
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    # A crash-loops faster than the hold: the master is never disturbed.
    for _ in range(3):
        cluster.start(A)
        cluster.run_for(TIMING.takeover_hold - 0.5)
        assert cluster.side_view(A) == (B, 1)
        cluster.crash(A)
        cluster.run_for(0.5)
    assert [claim.node_id for claim in cluster.claims] == [B]
    cluster.start(A)
    elapsed = cluster.run_until(lambda: cluster.agreement() == (A, 2), 5.0)
    assert elapsed is not None
    assert TIMING.takeover_hold <= elapsed <= TIMING.takeover_hold + 0.2


def test_a_new_highest_term_without_a_master_makes_the_master_stand_again() -> None:
    # C comes back with a term above the cluster's: the master keeps its place in a new term.
    cluster = Cluster(RANKED[:3], persisted_terms={C: 9})
    cluster.start(A, B)
    assert cluster.run_until(cluster.agreed, 5.0) is not None
    assert cluster.agreement() == (A, 1)
    cluster.start(C)
    assert cluster.run_until(lambda: cluster.agreement() == (A, 10), 2.0) is not None
    assert [claim.node_id for claim in cluster.claims] == [A, A]


# --- effects of one machine --------------------------------------------------------------------


def heartbeat(sender: NodeId, term: int, master: NodeId | None) -> Heartbeat:
    """A heartbeat as a running node sends it: a master's last claimed term is its own."""
    return Heartbeat(
        sender=candidate(sender),
        term=term,
        master_node_id=master,
        last_claimed_term=term if master == sender else None,
    )


def test_terms_are_persisted_before_they_are_sent() -> None:
    machine = BullyElection(candidate(A), persisted_term=4, timing=TIMING)
    outputs = machine.handle(Tick(0.0)) + machine.handle(Tick(TIMING.startup_grace))
    persist = outputs.index(PersistTerm(5))
    announce = outputs.index(Broadcast(Coordinator(sender=candidate(A), term=5)))
    assert persist < announce
    assert outputs[persist + 1] == MasterChanged(A, 5)
    # Adopting a term from a peer persists it before the next heartbeat carries it.
    follower = BullyElection(candidate(D), persisted_term=0, timing=TIMING)
    adopted = follower.handle(Received(heartbeat(B, 7, B), now=0.0))
    assert adopted == (PersistTerm(7), PeerAlive(B), MasterChanged(B, 7))
    assert follower.handle(Tick(0.0)) == (Broadcast(heartbeat(D, 7, B)),)


def test_a_stale_message_proves_life_and_is_answered_with_the_current_view() -> None:
    machine = BullyElection(candidate(A), persisted_term=5, timing=TIMING)
    outputs = machine.handle(Received(heartbeat(B, 3, B), now=0.0))
    assert outputs == (PeerAlive(B), Send(B, heartbeat(A, 5, None)))
    assert (machine.master, machine.term, machine.live_peers) == (None, 5, frozenset({B}))


def test_silent_peers_die_after_the_timeout() -> None:
    machine = BullyElection(candidate(D), persisted_term=0, timing=TIMING)
    machine.handle(Received(Coordinator(sender=candidate(A), term=1), now=0.0))
    assert machine.handle(Tick(TIMING.peer_timeout - 0.01)) == (Broadcast(heartbeat(D, 1, A)),)
    # The master is gone and no live peer outranks D: it stands at once.
    assert machine.handle(Tick(TIMING.peer_timeout)) == (
        PersistTerm(2),
        PeerDead(A),
        MasterChanged(D, 2),
        Broadcast(Coordinator(sender=candidate(D), term=2)),
    )


def master_of_term_two(node_id: NodeId) -> BullyElection:
    machine = BullyElection(candidate(node_id), persisted_term=1, timing=TIMING)
    machine.handle(Tick(0.0))
    machine.handle(Tick(TIMING.startup_grace))
    assert (machine.master, machine.term) == (node_id, 2)
    return machine


def test_two_masters_of_one_term_resolve_by_rank() -> None:
    # Greater node id, equal priority and seniority: B outranks A.
    higher, lower = master_of_term_two(B), master_of_term_two(A)
    assert higher.handle(Received(heartbeat(A, 2, A), now=2.0)) == (
        PersistTerm(3),
        PeerAlive(A),
        MasterChanged(B, 3),
        Broadcast(Coordinator(sender=candidate(B), term=3)),
    )
    # The lower one steps down within the term; the new term reaches it next.
    assert lower.handle(Received(heartbeat(B, 2, B), now=2.0)) == (
        PeerAlive(B),
        MasterChanged(B, 2),
    )
    assert lower.handle(Received(Coordinator(sender=candidate(B), term=3), now=2.1)) == (
        PersistTerm(3),
        MasterChanged(B, 3),
    )


def test_messages_round_trip_as_json() -> None:
    for message in (
        Heartbeat(sender=candidate(A, 2, 1.5), term=3, master_node_id=None, last_claimed_term=2),
        Coordinator(sender=candidate(B), term=1),
    ):
        assert ELECTION_MESSAGE_ADAPTER.validate_json(message.model_dump_json()) == message


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValidationError):
        Candidate(node_id=A, priority=0, seniority=float("nan"))
    with pytest.raises(ValidationError):
        ElectionTiming(heartbeat_interval=1.0, peer_timeout=1.5)
    with pytest.raises(ValidationError):
        ElectionTiming(startup_grace=4.0, takeover_hold=3.0)
    with pytest.raises(ValueError, match="negative"):
        BullyElection(candidate(A), persisted_term=-1, timing=TIMING)


# --- property: many random runs ----------------------------------------------------------------


def random_scenario(seed: int) -> None:
    """Random crashes, restarts and partitions, then a stable network: invariants throughout
    (checked by the simulator), agreement on the highest-ranked running node at the end."""
    scenario = random.Random(seed)
    names = [NodeId(f"node-{index}") for index in range(scenario.randint(2, 5))]
    candidates = [
        Candidate(
            node_id=name,
            priority=scenario.choice((0, 0, 1)),
            seniority=scenario.choice((100.0, 200.0)),
        )
        for name in names
    ]
    persisted = {name: scenario.choice((0, 0, scenario.randint(1, 5))) for name in names}
    cluster = Cluster(
        candidates,
        seed=seed,
        max_delay=scenario.choice((0.01, 0.05, 0.2)),
        tick_interval=0.1,
        persisted_terms=persisted,
    )
    cluster.start(*scenario.sample(names, scenario.randint(1, len(names))))
    for _ in range(scenario.randint(3, 8)):
        cluster.run_for(scenario.uniform(0.1, 2.5))
        down = [name for name in names if cluster.nodes[name].machine is None]
        action = scenario.choice(("crash", "restart", "partition", "heal"))
        if action == "crash" and len(cluster.up()) > 1:
            cluster.crash(scenario.choice(cluster.up()))
        elif action == "restart" and down:
            cluster.start(scenario.choice(down))
        elif action == "partition":
            cluster.partition(*split(scenario, names))
        else:
            cluster.heal()
    cluster.heal()
    # Settle: a node started just now needs the hold before it may take over.
    elapsed = cluster.run_until(lambda: stably_agreed(cluster), 10.0)
    assert elapsed is not None, f"seed {seed}: no agreement"
    cluster.run_for(2.0)
    assert stably_agreed(cluster), f"seed {seed}: agreement did not last"


def split(scenario: random.Random, names: Sequence[NodeId]) -> list[list[NodeId]]:
    groups: list[list[NodeId]] = [[] for _ in range(scenario.randint(2, 3))]
    for name in names:
        scenario.choice(groups).append(name)
    return groups


def stably_agreed(cluster: Cluster) -> bool:
    agreement = cluster.agreement()
    if agreement is None:
        return False
    up = cluster.up()
    highest = max((cluster.nodes[name].candidate for name in up), key=rank_key)
    everyone_sees_everyone = all(
        cluster.machine(name).live_peers == frozenset(up) - {name} for name in up
    )
    return agreement[0] == highest.node_id and everyone_sees_everyone


@pytest.mark.parametrize("seed", range(200))
def test_random_crashes_restarts_and_partitions_keep_the_invariants(seed: int) -> None:
    random_scenario(seed)
