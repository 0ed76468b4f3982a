"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Layout of one network (run token T, subnet 10.77.K.0/24):

    shoaltest-<pid>-T-h0 (shoal0 10.77.K.1) --veth-- port0 \\
    shoaltest-<pid>-T-h1 (shoal0 10.77.K.2) --veth-- port1  >-- bridge in shoaltest-<pid>-T-sw
    ...                                                     /

The bridge lives in its own "switch" namespace, so the root namespace (the real host) is never
touched: no interface, route or bridge appears there, and nothing can leak onto the real
network. Each veth is created directly between a host and the switch namespace. Cutting a host
downs its switch port, as if its cable were pulled.

Names carry the creating process's id: a later run sweeps namespaces whose creator is dead
(a crashed or killed run) and never those of a run still going.
"""

import contextlib
import functools
import ipaddress
import json
import os
import queue
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, final, overload

import psutil

NAME_PREFIX: Final = "shoaltest-"
HOST_INTERFACE: Final = "shoal0"
BRIDGE: Final = "bridge0"
SUBNET_PREFIX: Final = "10.77"
MULTICAST_NETWORK: Final = "224.0.0.0/4"
FORCE_NO_NAMESPACES_VARIABLE: Final = "SHOAL_TEST_NO_NETNS"
_IP_TIMEOUT_SECONDS: Final = 10.0


class NamespaceError(RuntimeError):
    pass


def _ip(*arguments: str) -> None:
    completed = subprocess.run(
        ["ip", *arguments],
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT_SECONDS,
        check=False,
    )
    if completed.returncode != 0:
        raise NamespaceError(f"ip {' '.join(arguments)}: {completed.stderr.strip()}")


def _namespace_names() -> list[str]:
    completed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_IP_TIMEOUT_SECONDS
    )
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in completed.stdout.splitlines() if line.strip()]


def _creator_pid(namespace: str) -> int | None:
    parts = namespace.removeprefix(NAME_PREFIX).split("-")
    return int(parts[0]) if parts and parts[0].isdigit() else None


def leftover_namespaces() -> list[str]:
    """Namespaces of ours whose creating process is gone."""
    leftovers: list[str] = []
    for namespace in _namespace_names():
        if not namespace.startswith(NAME_PREFIX):
            continue
        creator = _creator_pid(namespace)
        if creator is None or not psutil.pid_exists(creator):
            leftovers.append(namespace)
    return leftovers


def sweep_leftovers() -> None:
    # Deleting a namespace destroys the veth ends in it, and with them their peers.
    for namespace in leftover_namespaces():
        with contextlib.suppress(NamespaceError):
            _ip("netns", "delete", namespace)


@functools.cache
def namespaces_available() -> bool:
    """Whether this process may create network namespaces (root and a working `ip netns`).

    `SHOAL_TEST_NO_NETNS=1` answers False, to exercise the tests' loopback fallback.
    """
    if os.environ.get(FORCE_NO_NAMESPACES_VARIABLE) == "1":
        return False
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"{NAME_PREFIX}{os.getpid()}-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (NamespaceError, OSError, subprocess.TimeoutExpired):
        return False
    with contextlib.suppress(NamespaceError):
        _ip("netns", "delete", probe)
    return True


def _free_subnet_octet() -> int:
    """A K for 10.77.K.0/24 that overlaps no address of the root namespace's interfaces.

    Our namespaces are isolated from the root one, so an overlap would not misroute anything;
    avoiding it keeps `ip addr` output and any debugging unambiguous.
    """
    used = {
        ipaddress.IPv4Interface(f"{address.address}/{address.netmask}").network
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and address.netmask
    }
    candidates = list(range(1, 255))
    random.shuffle(candidates)
    for octet in candidates:
        network = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{octet}.0/24")
        if not any(network.overlaps(other) for other in used):
            return octet
    raise NamespaceError(f"every {SUBNET_PREFIX}.K.0/24 overlaps an existing interface")


@final
class Host:
    """One namespace: a host with a single interface on the test network."""

    def __init__(self, name: str, address: str, index: int) -> None:
        self.name = name
        self.address = address
        self.index = index
        self._processes: list[subprocess.Popen[Any]] = []

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in this host; `Hosts.destroy` kills it if it is still running."""
        process = subprocess.Popen(self.command(argv), **kwargs)
        self._processes.append(process)
        return process

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def kill_processes(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            # Unclosed pipes would surface as ResourceWarnings (errors in the test run).
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self._processes.clear()

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address!r})"


@final
class Hosts(Sequence[Host]):
    """A switched network of namespaces; a context manager that always cleans up."""

    def __init__(self, token: str, subnet_octet: int) -> None:
        self.token = token
        self.switch = f"{token}-sw"
        self.network = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{subnet_octet}.0/24")
        self._hosts: list[Host] = []
        self._destroyed = False

    @classmethod
    def create(cls, count: int) -> Self:
        """Sweep leftovers of crashed runs, then build a fresh network of `count` hosts."""
        if count < 1 or count > 250:
            raise ValueError(f"between 1 and 250 hosts, not {count}")
        sweep_leftovers()
        token = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        hosts = cls(token, _free_subnet_octet())
        try:
            hosts._add_switch()
            for index in range(count):
                hosts._add_host(index)
        except BaseException:
            hosts.destroy()
            raise
        return hosts

    @overload
    def __getitem__(self, index: int) -> Host: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Host]: ...
    def __getitem__(self, index: int | slice) -> Host | Sequence[Host]:
        return self._hosts[index]

    def __len__(self) -> int:
        return len(self._hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self._hosts)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *(host.name for host in self._hosts)]

    def _add_switch(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        # mDNS is link-local multicast, which bridges flood anyway; no snooping makes sure.
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", BRIDGE, "up")

    def _add_host(self, index: int) -> None:
        name = f"{self.token}-h{index}"
        address = str(self.network.network_address + index + 1)
        host = Host(name, address, index)
        _ip("netns", "add", name)
        self._hosts.append(host)
        _ip(
            "link",
            "add",
            HOST_INTERFACE,
            "netns",
            name,
            "type",
            "veth",
            "peer",
            "name",
            self._port(index),
            "netns",
            self.switch,
        )
        _ip("-n", self.switch, "link", "set", self._port(index), "master", BRIDGE, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", HOST_INTERFACE, "up")
        _ip(
            "-n",
            name,
            "addr",
            "add",
            f"{address}/{self.network.prefixlen}",
            "dev",
            HOST_INTERFACE,
        )
        # Without it a multicast send that names no interface has no route (no default route
        # in these namespaces).
        _ip("-n", name, "route", "add", MULTICAST_NETWORK, "dev", HOST_INTERFACE)

    @staticmethod
    def _port(index: int) -> str:
        return f"port{index}"

    def cut(self, index: int) -> None:
        """Unplug host `index` from the switch (link down); its own interface keeps its address."""
        _ip("-n", self.switch, "link", "set", self._port(index), "down")

    def heal(self, index: int) -> None:
        _ip("-n", self.switch, "link", "set", self._port(index), "up")

    def destroy(self) -> None:
        """Kill the hosts' processes, then delete veths and namespaces. Safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        for host in self._hosts:
            host.kill_processes()
        errors: list[str] = []
        # A process still inside a namespace would keep it (and its veth) alive after
        # `netns delete`, so the veths go explicitly first.
        existing = set(_namespace_names())
        for index, host in enumerate(self._hosts):
            if host.name in existing:
                with contextlib.suppress(NamespaceError):
                    _ip("-n", host.name, "link", "delete", HOST_INTERFACE)
            with contextlib.suppress(NamespaceError):
                _ip("-n", self.switch, "link", "delete", self._port(index))
        for namespace in self.namespaces:
            if namespace in existing:
                try:
                    _ip("netns", "delete", namespace)
                except NamespaceError as error:
                    errors.append(str(error))
        if errors:
            raise NamespaceError("; ".join(errors))


@final
class NetworkNamespaces:
    """Factory of `Hosts`: `with NetworkNamespaces.create(3) as hosts: ...`."""

    @staticmethod
    def create(count: int) -> Hosts:
        return Hosts.create(count)


@final
class JsonLinesProcess:
    """A test script's process that prints one JSON object a line, read on a thread.

    Everything printed so far is in `seen` (filled by `wait_until`); stderr goes to `log`,
    shown when a wait fails.
    """

    def __init__(
        self, process: subprocess.Popen[str], label: str, log: Path, patience: float
    ) -> None:
        self.process = process
        self.label = label
        self.log = log
        self.patience = patience
        self.seen: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        assert process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(json.loads(line))

    def wait_until(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(
                    f"{self.label}: gave up after {timeout} s; saw {self.seen}; "
                    f"exit {self.process.poll()}; stderr: {self.log.read_text()[-2000:]}"
                )
            with contextlib.suppress(queue.Empty):
                self.seen.append(self._lines.get(timeout=min(remaining, 0.1)))

    def drain(self, seconds: float) -> None:
        """Collect whatever else arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        self.wait_until(lambda _: time.monotonic() >= deadline, seconds + 1)

    def moment(self, key: str) -> Any:
        """The value of the first line with `key`, waiting up to `patience` for it."""
        self.wait_until(lambda seen: any(key in line for line in seen), self.patience)
        return next(line[key] for line in self.seen if key in line)

    def request_stop(self) -> None:
        """Close stdin: the scripts take that as their signal to shut down cleanly."""
        assert self.process.stdin is not None
        if not self.process.stdin.closed:
            self.process.stdin.close()

    def stop(self) -> None:
        self.request_stop()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        assert self.process.stdout is not None
        self.process.stdout.close()
