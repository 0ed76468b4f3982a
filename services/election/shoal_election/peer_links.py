"""Direct NATS client connections from this node's election to every peer's server.

They do not depend on the leaf-node star, so an election still works when the master (the
hub of the star) is gone. A static peer (`--peers host:port`) tells us who it is through its
JetStream domain (= its node id) and then its advert.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final, final

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel
from shoal_shared import subjects
from shoal_shared.bus import Bus, BusConnectError
from shoal_shared.ids import NodeId
from shoal_shared.settings import NodeSettings

from shoal_election.discovery import PeerAdvert

logger = logging.getLogger(__name__)

CONNECT_DEADLINE_SECONDS: Final = 3.0
STATIC_RETRY_SECONDS: Final = 1.0


@final
class PeerLinks:
    def __init__(
        self,
        settings: NodeSettings,
        own_node_id: NodeId,
        on_advert: Callable[[PeerAdvert], None],
    ) -> None:
        self._settings = settings
        self._own_node_id = own_node_id
        self._on_advert = on_advert
        self._links: dict[NodeId, Bus] = {}
        self._adverts: dict[NodeId, PeerAdvert] = {}
        self._connecting: set[NodeId] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def advert(self, node_id: NodeId) -> PeerAdvert | None:
        return self._adverts.get(node_id)

    def add_discovered(self, advert: PeerAdvert) -> None:
        """A peer found by mDNS: connect to the first of its addresses that answers."""
        if advert.node_id == self._own_node_id:
            return
        self._adverts[advert.node_id] = advert
        if advert.node_id in self._links or advert.node_id in self._connecting:
            return
        self._connecting.add(advert.node_id)
        self._spawn(self._connect_discovered(advert))

    def add_static(self, host: str, port: int) -> None:
        self._spawn(self._connect_static(host, port))

    async def publish(self, node_id: NodeId, message: BaseModel) -> None:
        link = self._links.get(node_id)
        if link is None or not link.client.is_connected:
            return
        with contextlib.suppress(Exception):
            await link.publish(subjects.election_inbox(node_id), message)

    def linked_peers(self) -> tuple[NodeId, ...]:
        return tuple(self._links)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in self._links.values():
            with contextlib.suppress(Exception):
                await link.client.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, host: str, port: int) -> Bus | None:
        url = self._settings.nats_url_for(host, port)
        try:
            return await Bus.connect(
                url, name=f"election-{self._own_node_id}", deadline_seconds=CONNECT_DEADLINE_SECONDS
            )
        except BusConnectError:
            return None

    async def _connect_discovered(self, advert: PeerAdvert) -> None:
        try:
            while advert.node_id not in self._links:
                for address in advert.addresses:
                    link = await self._connect(address, advert.nats_port)
                    if link is not None:
                        self._links[advert.node_id] = link
                        logger.info(
                            "linked to %s at %s:%d", advert.node_id, address, advert.nats_port
                        )
                        return
                await asyncio.sleep(STATIC_RETRY_SECONDS)
        finally:
            self._connecting.discard(advert.node_id)

    async def _connect_static(self, host: str, port: int) -> None:
        while True:
            link = await self._connect(host, port)
            if link is None:
                await asyncio.sleep(STATIC_RETRY_SECONDS)
                continue
            node_id = await self._identify(link)
            if node_id is None or node_id == self._own_node_id:
                await link.client.close()
                if node_id == self._own_node_id:
                    return
                await asyncio.sleep(STATIC_RETRY_SECONDS)
                continue
            advert = await self._ask_advert(link, node_id)
            if advert is None:
                await link.client.close()
                await asyncio.sleep(STATIC_RETRY_SECONDS)
                continue
            self._adverts[node_id] = advert
            previous = self._links.get(node_id)
            self._links[node_id] = link
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous.client.close()
            logger.info("linked to static peer %s at %s:%d", node_id, host, port)
            self._on_advert(advert)
            return

    async def _identify(self, link: Bus) -> NodeId | None:
        """The server's JetStream domain is its node id (the broker sets it so)."""
        try:
            info = await link.jetstream().account_info()
        except (NatsTimeoutError, NoRespondersError):
            return None
        return NodeId(info.domain) if info.domain else None

    async def _ask_advert(self, link: Bus, node_id: NodeId) -> PeerAdvert | None:
        try:
            reply = await link.client.request(subjects.election_whoami(node_id), b"", timeout=2)
        except (NatsTimeoutError, NoRespondersError):
            return None
        return PeerAdvert.model_validate_json(reply.data)
