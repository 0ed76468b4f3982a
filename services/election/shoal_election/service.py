"""The election process.

On its own a node elects itself, under a new term persisted on disk. It announces the outcome
to the node's other processes on a core subject (and answers queries for it), and appends
`MasterElected` to the node's local stream so the outcome enters the global log. Discovery of
peers and the bully election across nodes build on this.
"""

import asyncio
import logging
from typing import Final

from nats.aio.msg import Msg
from shoal_shared import streams, subjects
from shoal_shared.bus import Bus
from shoal_shared.election_outcome import ElectionOutcome
from shoal_shared.events import MasterElected
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings

from shoal_election.term_store import TermStore

logger = logging.getLogger(__name__)

ANNOUNCE_INTERVAL_SECONDS: Final = 1.0


async def run_election(settings: NodeSettings) -> None:
    node_id = load_or_create_node_id(settings.home)
    bus = await Bus.connect(settings.nats_url, name=f"election-{node_id}")
    term = TermStore(settings.home).next_term()
    outcome = ElectionOutcome(master_node_id=node_id, term=term)
    logger.info("node %s is master of term %d", node_id, term)

    async def answer_query(message: Msg) -> None:
        await bus.reply(message, outcome)

    await bus.subscribe(subjects.election_query(node_id), answer_query)
    await streams.append_local_event(bus, node_id, MasterElected(master_node_id=node_id, term=term))
    try:
        while True:
            await bus.publish(subjects.election_outcome(node_id), outcome)
            await asyncio.sleep(ANNOUNCE_INTERVAL_SECONDS)
    finally:
        await bus.close()
