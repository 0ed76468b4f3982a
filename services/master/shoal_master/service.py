"""The master process: a warm standby replica, active when its node is elected."""

import asyncio
import functools
import logging
from typing import Final

from shoal_shared.apply import StaleTermError
from shoal_shared.bus import Bus
from shoal_shared.follower import StateFollower
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import builtin_cards
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings

from shoal_master.active import ActiveMaster

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID: Final = ModelId("smollm2-135m")
OUTCOME_POLL_SECONDS: Final = 0.05


def live_peers_in_term(
    follower: StateFollower, node_id: NodeId, term: int
) -> tuple[NodeId, ...] | None:
    """The peers this node's election hears, while it still names this node master of `term`."""
    current = follower.outcome
    if current is None or current.term != term or current.master_node_id != node_id:
        return None
    return current.live_peers


async def run_master(settings: NodeSettings) -> None:
    node_id = load_or_create_node_id(settings.home)
    bus = await Bus.connect(settings.nats_url, name=f"master-{node_id}")
    follower = StateFollower(bus, node_id)
    await follower.start()
    cards = builtin_cards()
    default_model = DEFAULT_MODEL_ID if settings.place_default_model else None
    active: ActiveMaster | None = None
    try:
        while True:
            outcome = follower.outcome
            elected_term = (
                outcome.term if outcome is not None and outcome.master_node_id == node_id else None
            )
            if active is not None and active.term != elected_term:
                await active.stop()
                active = None
                logger.info("stepped down")
            if elected_term is not None and active is None:
                live_peers = functools.partial(live_peers_in_term, follower, node_id, elected_term)
                candidate = ActiveMaster(
                    bus, node_id, elected_term, follower.state, cards, default_model, live_peers
                )
                try:
                    await candidate.start()
                except StaleTermError as error:
                    logger.error("%s", error)
                    await candidate.stop()
                    await asyncio.sleep(1)
                    continue
                active = candidate
                default_model = None
            await asyncio.sleep(OUTCOME_POLL_SECONDS)
    finally:
        if active is not None:
            await active.stop()
        await follower.stop()
        await bus.close()
