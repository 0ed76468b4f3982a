"""Finding the other nodes of a namespace on the local network with mDNS/DNS-SD.

Every node advertises one `_shoal._tcp.local.` service whose TXT record carries its node id,
namespace, ports and protocol version (never the cluster secret: anyone on the LAN can read
it). Discovery only ever *adds* knowledge: a vanished record is not a death, because a crashed
node's record lingers for minutes and liveness comes from NATS heartbeats elsewhere. An address
or port change of a known node is reported again, so the caller can reconnect.

Networks without multicast use `parse_static_peers` for a `--peers host:port,...` flag instead.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Final, Protocol, cast, final

import psutil
from pydantic import Field, ValidationError, field_validator
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import NodeId, is_subject_token
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_shoal._tcp.local."
PROTOCOL_VERSION: Final = 1
# How long one peer's records may take to arrive after its PTR record did.
RESOLVE_TIMEOUT_MILLISECONDS: Final = 3000
RESOLVE_RETRY_DELAYS_SECONDS: Final = (1.0, 2.0, 4.0, 8.0)
# A DNS label (the service instance name) is at most 63 bytes.
_MAX_LABEL_BYTES: Final = 63

# TXT keys: short, because the whole record should stay well inside one mDNS packet.
TXT_NODE_ID: Final = "id"
TXT_NAMESPACE: Final = "ns"
TXT_NATS_PORT: Final = "nats"
TXT_LEAF_PORT: Final = "leaf"
TXT_API_PORT: Final = "api"
TXT_PROTOCOL_VERSION: Final = "pv"

Port = Annotated[int, Field(ge=1, le=65535)]


class PeerAdvert(FrozenModel):
    """What a node tells the network about itself, and what we learn about a peer."""

    node_id: NodeId
    namespace: Annotated[str, Field(min_length=1, max_length=200)]
    # A node nobody can reach is useless as a peer, so at least one address.
    addresses: Annotated[tuple[str, ...], Field(min_length=1)]
    nats_port: Port
    leaf_port: Port
    api_port: Port
    protocol_version: Annotated[int, Field(ge=0)]

    @field_validator("node_id")
    @classmethod
    def _node_id_is_subject_token(cls, value: NodeId) -> NodeId:
        if not is_subject_token(value):
            raise ValueError(f"node id {value!r} is not a NATS subject token")
        return value

    @field_validator("addresses")
    @classmethod
    def _addresses_are_ipv4(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            # Raises ValueError (reported by pydantic) for anything but dotted-quad IPv4.
            ipaddress.IPv4Address(address)
        return value


def local_ipv4_addresses(include_loopback: bool) -> tuple[str, ...]:
    """This host's IPv4 addresses (sorted, without duplicates), to fill `PeerAdvert.addresses`."""
    found: set[str] = set()
    for interface_addresses in psutil.net_if_addrs().values():
        for interface_address in interface_addresses:
            if interface_address.family != socket.AF_INET:
                continue
            if (
                not include_loopback
                and ipaddress.IPv4Address(interface_address.address).is_loopback
            ):
                continue
            found.add(interface_address.address)
    return tuple(sorted(found, key=ipaddress.IPv4Address))


def parse_static_peers(text: str) -> tuple[tuple[str, int], ...]:
    """Parse `host:port,host:port` (the port is the peer's NATS client port).

    An empty string means no static peers. IPv6 hosts are written in brackets: `[fe80::1]:4222`.
    Duplicates are dropped, the order is kept.
    """
    peers: list[tuple[str, int]] = []
    if not text.strip():
        return ()
    for position, raw_entry in enumerate(text.split(","), start=1):
        entry = raw_entry.strip()
        host, separator, port_text = entry.rpartition(":")
        if not entry or not separator:
            raise ValueError(
                f"peer {position} ({entry!r}) in {text!r} is not host:port (e.g. 10.0.0.2:52416)"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError(f"peer {position} ({entry!r}) in {text!r} has no host")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(
                f"peer {position} ({entry!r}) in {text!r} has port {port_text!r}; "
                "expected a number from 1 to 65535"
            )
        peer = (host, int(port_text))
        if peer not in peers:
            peers.append(peer)
    return tuple(peers)


def service_instance_name(node_id: NodeId) -> str:
    """The DNS-SD instance name of a node: its id, hashed down when too long for one label."""
    label = node_id
    if len(label.encode()) > _MAX_LABEL_BYTES:
        digest = hashlib.sha256(node_id.encode()).hexdigest()[:16]
        label = f"{node_id[: _MAX_LABEL_BYTES - len(digest) - 1]}-{digest}"
    return f"{label}.{SERVICE_TYPE}"


def advert_service_info(advert: PeerAdvert) -> ServiceInfo:
    name = service_instance_name(advert.node_id)
    return ServiceInfo(
        SERVICE_TYPE,
        name,
        port=advert.nats_port,
        properties={
            TXT_NODE_ID: advert.node_id,
            TXT_NAMESPACE: advert.namespace,
            TXT_NATS_PORT: str(advert.nats_port),
            TXT_LEAF_PORT: str(advert.leaf_port),
            TXT_API_PORT: str(advert.api_port),
            TXT_PROTOCOL_VERSION: str(advert.protocol_version),
        },
        server=f"{name.removesuffix('.' + SERVICE_TYPE)}.local.",
        parsed_addresses=list(advert.addresses),
    )


def advert_from_service_info(info: ServiceInfo) -> PeerAdvert | None:
    """The advert in a resolved service, or None (logged at debug) when it is not a valid one.

    Other implementations and versions share the service type, so nothing here may raise.
    """
    try:
        properties = {
            key.decode("utf-8"): None if value is None else value.decode("utf-8")
            for key, value in info.properties.items()
        }
        fields = {
            TXT_NODE_ID: properties.get(TXT_NODE_ID),
            TXT_NAMESPACE: properties.get(TXT_NAMESPACE),
            TXT_NATS_PORT: properties.get(TXT_NATS_PORT),
            TXT_LEAF_PORT: properties.get(TXT_LEAF_PORT),
            TXT_API_PORT: properties.get(TXT_API_PORT),
            TXT_PROTOCOL_VERSION: properties.get(TXT_PROTOCOL_VERSION),
        }
        missing = sorted(key for key, value in fields.items() if value is None)
        if missing:
            logger.debug("skipping service %s: TXT lacks %s", info.name, missing)
            return None
        addresses = sorted(info.parsed_addresses(IPVersion.V4Only), key=ipaddress.IPv4Address)
        # Strict mode wants real ints: convert here so "12x" fails with a ValueError we catch.
        return PeerAdvert(
            node_id=NodeId(str(fields[TXT_NODE_ID])),
            namespace=str(fields[TXT_NAMESPACE]),
            addresses=tuple(addresses),
            nats_port=int(str(fields[TXT_NATS_PORT])),
            leaf_port=int(str(fields[TXT_LEAF_PORT])),
            api_port=int(str(fields[TXT_API_PORT])),
            protocol_version=int(str(fields[TXT_PROTOCOL_VERSION])),
        )
    except (ValueError, ValidationError) as error:
        # UnicodeDecodeError is a ValueError too.
        logger.debug("skipping malformed service %s: %s", info.name, error)
        return None


class _Registry(Protocol):
    """AsyncZeroconf's (un)registration, with the result type its annotations leave open: a
    future that completes once the announcements or goodbyes have been sent."""

    async def async_register_service(
        self, info: ServiceInfo, *, allow_name_change: bool
    ) -> Awaitable[None]: ...

    async def async_unregister_service(self, info: ServiceInfo) -> Awaitable[None]: ...


async def _register(zeroconf: AsyncZeroconf, info: ServiceInfo) -> Awaitable[None]:
    """Probe for name conflicts (~1 s), then return the announcements still being sent."""
    registry = cast(_Registry, zeroconf)
    return await registry.async_register_service(info, allow_name_change=True)


async def _unregister(zeroconf: AsyncZeroconf, info: ServiceInfo) -> None:
    registry = cast(_Registry, zeroconf)
    goodbyes_sent = await registry.async_unregister_service(info)
    await goodbyes_sent


@final
class Discovery:
    """Advertise this node and report the peers of its namespace and protocol version.

    `on_peer` is called (on the event loop) for every newly seen peer and again whenever a
    known peer's advert changes. Removals are never reported.
    """

    def __init__(
        self,
        advert: PeerAdvert,
        interfaces: InterfaceChoice | list[str],
        on_peer: Callable[[PeerAdvert], None],
    ) -> None:
        self._advert = advert
        self._interfaces = interfaces
        self._on_peer = on_peer
        self._peers: dict[NodeId, PeerAdvert] = {}
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announcing: asyncio.Future[None] | None = None
        self._registered = False
        self._service_info = advert_service_info(advert)
        # One resolution at a time per service name; a change during one asks for another, so
        # a slow, stale answer can never overwrite a newer one.
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._resolve_again: set[str] = set()

    @property
    def advert(self) -> PeerAdvert:
        return self._advert

    @property
    def peers(self) -> Mapping[NodeId, PeerAdvert]:
        """Every peer seen so far, latest advert each (a copy)."""
        return dict(self._peers)

    async def start(self) -> None:
        assert self._zeroconf is None, "Discovery already started"
        zeroconf = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        self._zeroconf = zeroconf
        # Browse before registering: peers already running answer within ~0.1 s, while our
        # own registration spends ~1 s probing for name conflicts.
        self._browser = AsyncServiceBrowser(
            zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        try:
            announcements = await _register(zeroconf, self._service_info)
        except BaseException:
            await self.stop()
            raise
        self._registered = True
        # Peers see us after the first announcement; the remaining repeats need no waiting.
        self._announcing = asyncio.ensure_future(announcements)
        logger.info(
            "advertising node %s (namespace %s) at %s",
            self._advert.node_id,
            self._advert.namespace,
            ", ".join(self._advert.addresses),
        )

    async def stop(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        browser, self._browser = self._browser, None
        announcing, self._announcing = self._announcing, None
        if browser is not None:
            await browser.async_cancel()
        tasks: list[asyncio.Future[None]] = list(self._resolving.values())
        if announcing is not None:
            tasks.append(announcing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if zeroconf is not None:
            if self._registered:
                self._registered = False
                # Goodbye packets let peers' caches drop us now instead of after the TTL.
                await _unregister(zeroconf, self._service_info)
            await zeroconf.async_close()

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # zeroconf calls handlers with these keyword arguments, on our event loop.
        del zeroconf, service_type
        if state_change is ServiceStateChange.Removed:
            logger.debug("service %s went away (ignored: liveness comes from heartbeats)", name)
            return
        if name == self._service_info.name:
            return
        if name in self._resolving:
            self._resolve_again.add(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[name] = task

    async def _resolve(self, name: str) -> None:
        try:
            attempt = 0
            while True:
                self._resolve_again.discard(name)
                if await self._resolve_once(name):
                    attempt = 0
                    if name not in self._resolve_again:
                        return
                    continue
                # The browser will not hear of this service again until its PTR record is
                # refreshed (an hour), so unanswered questions are asked again a few times.
                if name in self._resolve_again:
                    continue
                if attempt >= len(RESOLVE_RETRY_DELAYS_SECONDS):
                    logger.debug("giving up on service %s until it changes", name)
                    return
                await asyncio.sleep(RESOLVE_RETRY_DELAYS_SECONDS[attempt])
                attempt += 1
        finally:
            self._resolving.pop(name, None)

    async def _resolve_once(self, name: str) -> bool:
        """Resolve and report one service; False when it did not answer in time."""
        zeroconf = self._zeroconf
        if zeroconf is None:
            return True
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf.zeroconf, RESOLVE_TIMEOUT_MILLISECONDS):
            logger.debug("service %s did not resolve in time", name)
            return False
        advert = advert_from_service_info(info)
        if advert is None or not self._accepts(advert):
            return True
        if self._peers.get(advert.node_id) == advert:
            return True
        self._peers[advert.node_id] = advert
        try:
            self._on_peer(advert)
        except Exception:
            # A faulty callback must not stop discovery of the other peers.
            logger.exception("on_peer failed for %s", advert.node_id)
        return True

    def _accepts(self, advert: PeerAdvert) -> bool:
        if advert.node_id == self._advert.node_id:
            return False
        if advert.namespace != self._advert.namespace:
            logger.debug("ignoring %s of namespace %s", advert.node_id, advert.namespace)
            return False
        if advert.protocol_version != self._advert.protocol_version:
            logger.debug(
                "ignoring %s of protocol version %d", advert.node_id, advert.protocol_version
            )
            return False
        return True
