"""Discovery: adverts and their parsing, static peers, and real mDNS between "hosts".

The network tests run each node in its own network namespace (tests/netns.py), so mDNS never
leaves the machine. Where namespaces cannot be created they fall back to zeroconf bound to
127.0.0.1 and say so in the test output.
"""

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, final

import pytest
from pydantic import ValidationError
from shoal_election.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    PeerAdvert,
    advert_from_service_info,
    advert_service_info,
    local_ipv4_addresses,
    parse_static_peers,
)
from shoal_shared.ids import NodeId
from zeroconf import ServiceInfo

from tests.netns import (
    FORCE_NO_NAMESPACES_VARIABLE,
    Hosts,
    JsonLinesProcess,
    NetworkNamespaces,
    namespaces_available,
)

# Discovery's own latency, measured inside the nodes from their Discovery.start().
FIND_WITHIN_SECONDS: Final = 5.0
# Wall-clock patience for processes: on a loaded two-core machine an interpreter importing
# pydantic and zeroconf has been seen to take 4 s to start.
WAIT_SECONDS: Final = 20.0
HOST_COUNT: Final = 4

# One node: prints {"started": t} just before Discovery.start(), {"ready": t} once registered,
# {"peer": advert, "at": t} per report (t: time.time(), one clock for all processes), and stops
# cleanly when its stdin closes.
NODE_SCRIPT: Final = """
import asyncio, json, logging, sys, time
from shoal_shared.ids import NodeId
from zeroconf import InterfaceChoice
from shoal_election.discovery import Discovery, PeerAdvert, local_ipv4_addresses

logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
logging.getLogger("zeroconf").setLevel(logging.WARNING)

async def main():
    node_id, namespace, nats_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loopback = sys.argv[4] == "loopback"
    def on_peer(peer):
        print(json.dumps({"peer": peer.model_dump(mode="json"), "at": time.time()}), flush=True)
    advert = PeerAdvert(
        node_id=NodeId(node_id), namespace=namespace,
        addresses=("127.0.0.1",) if loopback else local_ipv4_addresses(include_loopback=False),
        nats_port=nats_port, leaf_port=nats_port + 1, api_port=nats_port + 2, protocol_version=1,
    )
    discovery = Discovery(advert, ["127.0.0.1"] if loopback else InterfaceChoice.All, on_peer)
    print(json.dumps({"started": time.time()}), flush=True)
    await discovery.start()
    print(json.dumps({"ready": time.time()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await discovery.stop()

asyncio.run(main())
"""

# Raw registrations that other software or versions could make under our service type:
# argv[3] is a JSON list of [instance label, {TXT key: value}] (value null = bare key). On each
# stdin line it bumps the "nats" entry of the services that have one, then re-announces them.
RAW_SCRIPT: Final = """
import asyncio, json, sys
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

async def main():
    address, loopback, services = sys.argv[1], sys.argv[2] == "loopback", json.loads(sys.argv[3])
    interfaces = ["127.0.0.1"] if loopback else InterfaceChoice.All
    zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    def info(label, properties):
        encoded = {
            key.encode(): None if value is None else value.encode("utf-8", "surrogateescape")
            for key, value in properties.items()
        }
        return ServiceInfo(
            "_shoal._tcp.local.", f"{label}._shoal._tcp.local.", port=4222, properties=encoded,
            server=f"{label}.local.", parsed_addresses=[address],
        )
    infos = [info(label, properties) for label, properties in services]
    # Concurrently: each registration probes for about a second.
    await asyncio.gather(*(zeroconf.async_register_service(service) for service in infos))
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        for label, properties in services:
            if "nats" in properties:
                properties["nats"] = str(int(properties["nats"]) + 1)
                await zeroconf.async_update_service(info(label, properties))
    await zeroconf.async_close()

asyncio.run(main())
"""


def peers_of(node: JsonLinesProcess) -> list[PeerAdvert]:
    reports = [line["peer"] for line in node.seen if "peer" in line]
    return [PeerAdvert.model_validate(report, strict=False) for report in reports]


def peers_by_id(node: JsonLinesProcess) -> dict[str, PeerAdvert]:
    return {peer.node_id: peer for peer in peers_of(node)}


def found_ids(expected: set[str]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda seen: {line["peer"]["node_id"] for line in seen if "peer" in line} >= expected


def found_at(node: JsonLinesProcess, node_id: str) -> float:
    """When `node` first reported `node_id`, waiting for it if need be."""
    node.wait_until(found_ids({node_id}), WAIT_SECONDS)
    reports = [line for line in node.seen if "peer" in line]
    return next(float(line["at"]) for line in reports if line["peer"]["node_id"] == node_id)


@final
class Network:
    """Where the scripts run: a namespace per node, or (fallback) all on 127.0.0.1."""

    def __init__(self, hosts: Hosts | None, tmp_path: Path) -> None:
        self.hosts = hosts
        self.tmp_path = tmp_path
        self.started: list[JsonLinesProcess] = []

    @property
    def mode(self) -> str:
        return "loopback" if self.hosts is None else "namespaces"

    def address(self, index: int) -> str:
        return "127.0.0.1" if self.hosts is None else self.hosts[index].address

    def run(self, index: int, script: str, *arguments: str) -> JsonLinesProcess:
        log = self.tmp_path / f"host{index}-{len(self.started)}.err"
        argv = [sys.executable, "-c", script, *arguments]
        with log.open("w") as stderr:
            pipe = subprocess.PIPE
            options: dict[str, Any] = {
                "stdin": pipe,
                "stdout": pipe,
                "stderr": stderr,
                "text": True,
            }
            if self.hosts is None:
                process: subprocess.Popen[str] = subprocess.Popen(argv, **options)
            else:
                process = self.hosts[index].popen(argv, **options)
        node = JsonLinesProcess(process, f"host {index}", log, WAIT_SECONDS)
        self.started.append(node)
        return node

    def node(
        self, index: int, node_id: str, namespace: str, nats_port: int = 4222
    ) -> JsonLinesProcess:
        return self.run(index, NODE_SCRIPT, node_id, namespace, str(nats_port), self.mode)

    def stop_all(self) -> None:
        # All at once: each spends a few hundred milliseconds sending goodbyes.
        for node in self.started:
            node.request_stop()
        for node in self.started:
            node.stop()
        self.started.clear()


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts | None]:
    if not namespaces_available():
        yield None
        return
    with NetworkNamespaces.create(HOST_COUNT) as created:
        yield created


_told_fallback: list[bool] = []


@pytest.fixture
def network(
    hosts: Hosts | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Network]:
    if hosts is None and not _told_fallback:
        _told_fallback.append(True)
        with capsys.disabled():
            print(
                "\nNOTE: network namespaces unavailable (needs root and `ip netns`) or disabled by "
                f"{FORCE_NO_NAMESPACES_VARIABLE}=1: "
                "discovery tests run zeroconf on 127.0.0.1 only"
            )
    network = Network(hosts, tmp_path)
    try:
        yield network
    finally:
        network.stop_all()


def unique(prefix: str) -> str:
    # Fresh ids and Shoal namespaces per test keep tests (and parallel runs) from seeing each other.
    return f"{prefix}-{secrets.token_hex(4)}"


def test_two_nodes_find_each_other(network: Network) -> None:
    namespace = unique("ns")
    first_id, second_id = unique("node-a"), unique("node-b")
    first = network.node(0, first_id, namespace, nats_port=4222)
    first.moment("ready")
    second = network.node(1, second_id, namespace, nats_port=5222)
    second_started = second.moment("started")
    running_found_after = found_at(second, first_id) - second_started
    new_found_after = found_at(first, second_id) - second_started
    print(
        f"\n[{network.mode}] a running node found after {running_found_after:.3f} s, "
        f"a new one after {new_found_after:.3f} s"
    )
    assert running_found_after < FIND_WITHIN_SECONDS
    assert new_found_after < FIND_WITHIN_SECONDS
    seen_by_first = peers_by_id(first)[second_id]
    assert seen_by_first.addresses == (network.address(1),)
    ports = (seen_by_first.nats_port, seen_by_first.leaf_port, seen_by_first.api_port)
    assert ports == (5222, 5223, 5224)
    assert peers_by_id(second)[first_id].addresses == (network.address(0),)
    # Each reported once (no duplicate reports of an unchanged advert), and never itself.
    first.drain(0.5)
    assert [peer.node_id for peer in peers_of(first)] == [second_id]
    assert [peer.node_id for peer in peers_of(second)] == [first_id]


def test_three_nodes_find_each_other_and_ignore_another_namespace(network: Network) -> None:
    namespace, other_namespace = unique("ns"), unique("other")
    ids = [unique(f"node{index}") for index in range(3)]
    stranger_id = unique("stranger")
    stranger = network.node(3, stranger_id, other_namespace)
    nodes = [network.node(index, ids[index], namespace) for index in range(3)]
    for index, node in enumerate(nodes):
        for other_index, other in enumerate(nodes):
            if other is node:
                continue
            both_started = max(node.moment("started"), other.moment("started"))
            found_after = found_at(node, ids[other_index]) - both_started
            print(
                f"\n[{network.mode}] node {index} found node {other_index} in {found_after:.3f} s"
            )
            assert found_after < FIND_WITHIN_SECONDS
        assert set(peers_by_id(node)) == set(ids) - {ids[index]}
    stranger.moment("ready")
    stranger.drain(0.5)
    assert peers_of(stranger) == []
    assert all(stranger_id not in peers_by_id(node) for node in nodes)


def test_foreign_and_malformed_services_are_skipped_and_changes_reported(
    network: Network,
) -> None:
    namespace = unique("ns")
    observer_id, valid_id = unique("observer"), unique("valid")

    def txt(node_id: str, **overrides: str | None) -> dict[str, str | None]:
        ports = {"nats": "4222", "leaf": "7422", "api": "8000"}
        properties: dict[str, str | None] = {"id": node_id, "ns": namespace, **ports}
        properties["pv"] = str(PROTOCOL_VERSION)
        properties.update(overrides)
        return {key: value for key, value in properties.items() if value is not None}

    raw_services = [
        ["bad-port", txt(unique("bad-port"), leaf="not-a-port")],
        ["bad-range", txt(unique("bad-range"), api="70000")],
        ["no-ns", txt(unique("no-ns"), ns=None)],
        ["bad-id", txt("has.dots.in.it")],
        ["bad-utf8", txt(unique("bad-utf8"), ns="\udcff\udcfe")],
        ["newer-protocol", txt(unique("newer"), pv=str(PROTOCOL_VERSION + 1))],
        ["pretends-to-be-observer", txt(observer_id)],
        ["valid", txt(valid_id)],
    ]
    raw = network.run(0, RAW_SCRIPT, network.address(0), network.mode, json.dumps(raw_services))
    raw.moment("ready")
    observer = network.node(1, observer_id, namespace)
    assert found_at(observer, valid_id) - observer.moment("started") < FIND_WITHIN_SECONDS
    observer.drain(1.0)
    assert [peer.node_id for peer in peers_of(observer)] == [valid_id]
    assert observer.process.poll() is None

    # An update of the valid service's port is reported again; the malformed ones still not.
    assert raw.process.stdin is not None
    raw.process.stdin.write("update\n")
    raw.process.stdin.flush()
    observer.wait_until(
        lambda seen: len([line for line in seen if "peer" in line]) == 2, WAIT_SECONDS
    )
    ports = [peer.nats_port for peer in peers_of(observer)]
    assert ports == [4222, 4223]
    assert {peer.node_id for peer in peers_of(observer)} == {valid_id}


async def test_in_process_peers_survive_a_failing_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In this process zeroconf may only use loopback: the root namespace has real interfaces.
    namespace = unique("ns")
    adverts = [
        ADVERT.model_copy(update={"node_id": NodeId(unique(name)), "namespace": namespace})
        for name in ("failing", "plain")
    ]
    reported: list[PeerAdvert] = []
    both_called = [asyncio.Event(), asyncio.Event()]

    def plain_callback(peer: PeerAdvert) -> None:
        reported.append(peer)
        both_called[1].set()

    def failing_callback(peer: PeerAdvert) -> None:
        both_called[0].set()
        raise RuntimeError(f"callback bug while reporting {peer.node_id}")

    failing = Discovery(adverts[0], ["127.0.0.1"], failing_callback)
    plain = Discovery(adverts[1], ["127.0.0.1"], plain_callback)
    await plain.stop()  # before start: nothing to do
    await asyncio.gather(failing.start(), plain.start())
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            await asyncio.gather(*(called.wait() for called in both_called))
        assert dict(failing.peers) == {adverts[1].node_id: adverts[1]}
        assert dict(plain.peers) == {adverts[0].node_id: adverts[0]}
        assert reported == [adverts[0]]
        assert "callback bug" in caplog.text
    finally:
        await asyncio.gather(failing.stop(), plain.stop())
    await plain.stop()  # twice: harmless


ADVERT: Final = PeerAdvert(
    node_id=NodeId("node-1"),
    namespace="home lab",
    addresses=("10.0.0.2", "192.168.1.5"),
    nats_port=52416,
    leaf_port=52417,
    api_port=52415,
    protocol_version=PROTOCOL_VERSION,
)
VALID_TXT: Final = {
    b"id": b"node-1",
    b"ns": b"n",
    b"nats": b"1",
    b"leaf": b"2",
    b"api": b"3",
    b"pv": b"1",
}


def test_advert_round_trips_through_service_info() -> None:
    info = advert_service_info(ADVERT)
    assert info.type == SERVICE_TYPE
    assert set(info.properties) == {b"id", b"ns", b"nats", b"leaf", b"api", b"pv"}
    assert advert_from_service_info(info) == ADVERT
    # The longest valid node id is one byte too long for a DNS label.
    long_advert = ADVERT.model_copy(update={"node_id": NodeId("n" * 64)})
    long_info = advert_service_info(long_advert)
    assert len(long_info.name.removesuffix("." + SERVICE_TYPE)) <= 63
    assert advert_from_service_info(long_info) == long_advert
    # A peer without an IPv4 address is of no use (zeroconf may see only its IPv6 records).
    no_address = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=VALID_TXT)
    assert advert_from_service_info(no_address) is None


@pytest.mark.parametrize(
    "properties",
    [
        {b"unrelated": b"yes"},
        {b"id": b"node-1", b"pv": b"1"},
        {**VALID_TXT, b"pv": None},  # a bare key (no "="): present, without a value
        {**VALID_TXT, b"id": b"\xff"},
        {**VALID_TXT, b"ns": b""},
        {**VALID_TXT, b"nats": b"0"},
        {**VALID_TXT, b"pv": b"x"},
    ],
)
def test_malformed_txt_records_parse_to_none(properties: dict[bytes, bytes | None]) -> None:
    info = ServiceInfo(
        SERVICE_TYPE,
        f"x.{SERVICE_TYPE}",
        port=1,
        properties=properties,
        parsed_addresses=["10.0.0.2"],
    )
    assert advert_from_service_info(info) is None


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("node_id", "a.b"),
        ("addresses", ("fe80::1",)),
        ("addresses", ()),
        ("nats_port", 0),
        ("namespace", ""),
    ],
)
def test_advert_validation(field: str, bad: object) -> None:
    with pytest.raises(ValidationError):
        PeerAdvert.model_validate({**ADVERT.model_dump(), field: bad})


def test_local_ipv4_addresses() -> None:
    with_loopback = local_ipv4_addresses(include_loopback=True)
    without_loopback = local_ipv4_addresses(include_loopback=False)
    assert "127.0.0.1" in with_loopback
    assert not any(address.startswith("127.") for address in without_loopback)
    assert set(without_loopback) <= set(with_loopback)


def test_parse_static_peers() -> None:
    assert parse_static_peers("") == ()
    assert parse_static_peers(" 10.0.0.2:52416, host.local:4222 ,10.0.0.2:52416") == (
        ("10.0.0.2", 52416),
        ("host.local", 4222),
    )
    assert parse_static_peers("[fe80::1]:4222") == (("fe80::1", 4222),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.2", "not host:port"),
        ("10.0.0.2:52416,,10.0.0.3:52416", "peer 2"),
        (":52416", "has no host"),
        ("10.0.0.2:http", "expected a number from 1 to 65535"),
        ("10.0.0.2:0", "expected a number from 1 to 65535"),
        ("10.0.0.2:65536", "expected a number from 1 to 65535"),
        ("10.0.0.2:-1", "expected a number from 1 to 65535"),
    ],
)
def test_parse_static_peers_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_static_peers(text)
