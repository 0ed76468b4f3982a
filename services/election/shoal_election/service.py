"""The election process: discovery, liveness, the bully election, and the leaf-node star.

It advertises the node with mDNS (and links to `--peers`), keeps a direct NATS connection to
every peer's server, runs the pure `BullyElection` on heartbeats and timer ticks, and carries
out its outputs: persist the term, announce the outcome to the node's other processes, append
`MasterElected` when this node wins, and rewire the nats-server's leaf remotes (include file +
SIGHUP) so that every non-master is a leaf of the master.
"""

import asyncio
import logging
import time
from pathlib import Path
from typing import Final, final

from nats.aio.msg import Msg
from pydantic import TypeAdapter, ValidationError
from shoal_shared import streams, subjects
from shoal_shared.broker import leaf_url, reload_server, write_leaf_remotes
from shoal_shared.bus import Bus
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.events import MasterElected
from shoal_shared.ids import NodeId
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings
from zeroconf import InterfaceChoice

from shoal_election.bully import (
    Broadcast,
    BullyElection,
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
from shoal_election.bully_messages import Candidate, ElectionMessage
from shoal_election.discovery import (
    PROTOCOL_VERSION,
    Discovery,
    PeerAdvert,
    local_ipv4_addresses,
    parse_static_peers,
)
from shoal_election.peer_links import PeerLinks
from shoal_election.term_store import TermStore

logger = logging.getLogger(__name__)

TICK_SECONDS: Final = 0.05
ANNOUNCE_SECONDS: Final = 0.25
SENIORITY_FILE: Final = "seniority"
ELECTION_MESSAGE: Final[TypeAdapter[ElectionMessage]] = TypeAdapter(ElectionMessage)


def load_seniority(home: Path) -> float:
    """The node's first start (epoch seconds), persisted: earlier starts rank higher."""
    path = home / SENIORITY_FILE
    try:
        return float(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        first_start = time.time()
        path.write_text(f"{first_start}\n")
        return first_start


def advertised_addresses(bind_host: str) -> tuple[str, ...]:
    """Where peers can reach this node's NATS listeners: where they bind."""
    if bind_host not in ("0.0.0.0", ""):
        return (bind_host,)
    return local_ipv4_addresses(include_loopback=False) or ("127.0.0.1",)


@final
class ElectionService:
    def __init__(self, settings: NodeSettings, node_id: NodeId, bus: Bus) -> None:
        self._settings = settings
        self._node_id = node_id
        self._bus = bus
        self._terms = TermStore(settings.home)
        me = Candidate(
            node_id=node_id, priority=settings.priority, seniority=load_seniority(settings.home)
        )
        self._election = BullyElection(me, self._terms.load(), ElectionTiming())
        self._outcome: ElectionOutcome | None = None
        addresses = advertised_addresses(settings.bind_host)
        self._advert = PeerAdvert(
            node_id=node_id,
            namespace=settings.namespace,
            addresses=addresses,
            nats_port=settings.nats_port,
            leaf_port=settings.leaf_port,
            api_port=settings.api_port,
            protocol_version=PROTOCOL_VERSION,
        )
        self._links = PeerLinks(settings, node_id, self._on_advert)
        self._discovery: Discovery | None = None
        self._wired_to: NodeId | None = None

    async def run(self) -> None:
        await self._bus.subscribe(subjects.election_inbox(self._node_id), self._on_message)
        await self._bus.subscribe(subjects.election_query(self._node_id), self._on_query)
        await self._bus.subscribe(subjects.election_whoami(self._node_id), self._on_whoami)
        for host, port in parse_static_peers(self._settings.peers):
            self._links.add_static(host, port)
        if self._settings.mdns:
            self._discovery = Discovery(self._advert, InterfaceChoice.All, self._on_advert)
            await self._discovery.start()
        loop = asyncio.get_running_loop()
        next_announcement = 0.0
        try:
            while True:
                await self._carry_out(self._election.handle(Tick(now=loop.time())))
                if loop.time() >= next_announcement and self._outcome is not None:
                    await self._announce()
                    next_announcement = loop.time() + ANNOUNCE_SECONDS
                await asyncio.sleep(TICK_SECONDS)
        finally:
            if self._discovery is not None:
                await self._discovery.stop()
            await self._links.close()

    def _on_advert(self, advert: PeerAdvert) -> None:
        self._links.add_discovered(advert)
        if advert.node_id == self._wired_to:
            # The master's address or port changed: point the leaf link at the new one.
            self._wired_to = None

    async def _on_message(self, message: Msg) -> None:
        try:
            parsed = ELECTION_MESSAGE.validate_json(message.data)
        except ValidationError:
            logger.debug("ignoring a malformed election message")
            return
        now = asyncio.get_running_loop().time()
        await self._carry_out(self._election.handle(Received(message=parsed, now=now)))

    async def _on_query(self, message: Msg) -> None:
        if self._outcome is not None:
            await self._bus.reply(message, self._current_outcome())

    async def _on_whoami(self, message: Msg) -> None:
        await self._bus.reply(message, self._advert)

    def _current_outcome(self) -> ElectionOutcome:
        assert self._outcome is not None
        return self._outcome.model_copy(
            update={"live_peers": tuple(sorted(self._election.live_peers))}
        )

    async def _announce(self) -> None:
        await self._bus.publish(subjects.election_outcome(self._node_id), self._current_outcome())
        await self._wire_leaf_links()

    async def _carry_out(self, outputs: tuple[ElectionOutput, ...]) -> None:
        for output in outputs:
            match output:
                case PersistTerm():
                    self._terms.save(output.term)
                case Send():
                    await self._links.publish(output.to, output.message)
                case Broadcast():
                    for peer in self._links.linked_peers():
                        await self._links.publish(peer, output.message)
                case MasterChanged():
                    await self._master_changed(output)
                case PeerAlive():
                    logger.info("peer %s is alive", output.node_id)
                case PeerDead():
                    logger.warning("peer %s stopped answering", output.node_id)

    async def _master_changed(self, change: MasterChanged) -> None:
        if change.master_node_id is None:
            logger.warning("the master of term %d is gone; electing", change.term)
            return
        logger.info("master of term %d: %s", change.term, change.master_node_id)
        self._outcome = ElectionOutcome(master_node_id=change.master_node_id, term=change.term)
        if change.master_node_id == self._node_id:
            await streams.append_local_event(
                self._bus,
                self._node_id,
                MasterElected(master_node_id=self._node_id, term=change.term),
            )
        await self._announce()

    async def _wire_leaf_links(self) -> None:
        """Make this node's server a leaf of the master's (or of nobody, on the master)."""
        outcome = self._outcome
        if outcome is None or outcome.master_node_id == self._wired_to:
            return
        master = outcome.master_node_id
        urls: list[str] = []
        if master != self._node_id:
            advert = self._links.advert(master)
            if advert is None:
                return  # not linked yet: the next announcement retries
            urls = [
                leaf_url(self._settings, address, advert.leaf_port) for address in advert.addresses
            ]
        if write_leaf_remotes(self._settings, urls):
            reload_server(self._settings)
            logger.info("leaf link now points at %s", "nobody (master)" if not urls else master)
        self._wired_to = master


async def run_election(settings: NodeSettings) -> None:
    node_id = load_or_create_node_id(settings.home)
    bus = await Bus.connect(settings.nats_url, name=f"election-{node_id}")
    try:
        await ElectionService(settings, node_id, bus).run()
    finally:
        await bus.close()
