"""The multi-host harness: namespaces reach each other, partitions cut, cleanup is complete."""

import ipaddress
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Final

import pytest

from .netns import (
    NAME_PREFIX,
    Host,
    Hosts,
    NetworkNamespaces,
    leftover_namespaces,
    namespaces_available,
    sweep_leftovers,
)

ECHO_PORT: Final = 7007

# Echoes one line per connection on the host's own address, until killed.
ECHO_SERVER: Final = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    with connection:
        connection.sendall(connection.recv(64))
"""

ECHO_CLIENT: Final = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])) as connection:
    connection.sendall(b"hello")
    sys.exit(0 if connection.recv(64) == b"hello" else 1)
"""


def _all_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if not namespaces_available():
        pytest.skip("cannot create network namespaces here (needs root and `ip netns`)")
    with NetworkNamespaces.create(3) as created:
        for host in created:
            server = host.popen(
                [sys.executable, "-c", ECHO_SERVER, host.address, str(ECHO_PORT)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening"
        yield created


def reachable(source: Host, destination: Host, timeout: float = 1.0) -> bool:
    # ping is not installed everywhere; the TCP echo also proves that both ends' stacks work.
    if shutil.which("ping") is not None:
        return source.run(["ping", "-c1", "-W1", destination.address], check=False).returncode == 0
    echo = source.run(
        [sys.executable, "-c", ECHO_CLIENT, destination.address, str(ECHO_PORT), str(timeout)],
        check=False,
    )
    return echo.returncode == 0


def eventually_reachable(source: Host, destination: Host, within_seconds: float) -> bool:
    deadline = time.monotonic() + within_seconds
    while not reachable(source, destination):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_every_host_reaches_every_other(hosts: Hosts) -> None:
    assert len({host.name for host in hosts}) == 3
    assert all(ipaddress.IPv4Address(host.address) in hosts.network for host in hosts)
    for source in hosts:
        for destination in hosts:
            if source is not destination:
                assert reachable(source, destination), f"{source} cannot reach {destination}"


def test_hosts_have_no_route_off_the_test_network(hosts: Hosts) -> None:
    # Nothing the tests start in a host can reach the real network: no default route.
    routes = hosts[0].run(["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes
    assert "224.0.0.0/4" in routes


def test_cut_isolates_one_host_until_healed(hosts: Hosts) -> None:
    hosts.cut(2)
    # Short timeouts: these are expected to fail, and a cut link drops packets silently.
    assert not reachable(hosts[0], hosts[2], timeout=0.3)
    assert not reachable(hosts[2], hosts[1], timeout=0.3)
    assert reachable(hosts[0], hosts[1])
    hosts.heal(2)
    assert eventually_reachable(hosts[0], hosts[2], within_seconds=3)
    assert eventually_reachable(hosts[2], hosts[1], within_seconds=3)


def test_destroy_kills_processes_and_deletes_everything() -> None:
    if not namespaces_available():
        pytest.skip("cannot create network namespaces here (needs root and `ip netns`)")
    hosts = NetworkNamespaces.create(2)
    names = hosts.namespaces
    assert set(names) <= set(_all_namespaces())
    sleeper = hosts[0].popen(["sleep", "60"])
    hosts.destroy()
    assert sleeper.poll() is not None
    assert not set(names) & set(_all_namespaces())
    hosts.destroy()  # a second call is harmless


def test_a_failing_test_body_still_cleans_up() -> None:
    if not namespaces_available():
        pytest.skip("cannot create network namespaces here (needs root and `ip netns`)")
    names: list[str] = []

    def failing_test_body() -> None:
        with NetworkNamespaces.create(1) as hosts:
            names.extend(hosts.namespaces)
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        failing_test_body()
    assert names
    assert not set(names) & set(_all_namespaces())


def test_sweep_deletes_namespaces_of_dead_runs_only() -> None:
    if not namespaces_available():
        pytest.skip("cannot create network namespaces here (needs root and `ip netns`)")
    # The pid of a process that has exited (and was reaped) stands for a crashed run.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{NAME_PREFIX}{dead.pid}-dead00-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with NetworkNamespaces.create(1) as live:
            assert stale not in _all_namespaces()
            sweep_leftovers()
            # Our own run's namespaces are alive: the sweep leaves them.
            assert set(live.namespaces) <= set(_all_namespaces())
            assert not set(live.namespaces) & set(leftover_namespaces())
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, check=False)
