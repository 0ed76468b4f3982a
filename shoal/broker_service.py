"""`shoal broker`: the embedded nats-server, restarted whenever it dies."""

import asyncio

from shoal_shared.broker import Broker
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings


async def run_broker(settings: NodeSettings) -> None:
    broker = Broker(settings, load_or_create_node_id(settings.home))
    try:
        await broker.run()
    except asyncio.CancelledError:
        await broker.stop()
        raise
