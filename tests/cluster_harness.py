"""Several real nodes: each in its own network namespace (real mDNS, addresses and faults),
or, where namespaces cannot be made, on loopback joined with `--peers`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Final, final

from .netns import Host, Hosts, NetworkNamespaces, namespaces_available
from .node_harness import free_port

NATS_PORT: Final = 52416


@final
class ClusterNode:
    def __init__(self, index: int, home: Path, host: Host | None, peers: str) -> None:
        self.index = index
        self.home = home
        self.host = host
        self.peers = peers
        self.api_port = 52415 if host is not None else free_port()
        self.nats_port = NATS_PORT if host is not None else free_port()
        self.leaf_port = 52417 if host is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.host.address if self.host is not None else "127.0.0.1"

    def start(self, *extra: str, environment: dict[str, str] | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "shoal", "run",
            "--home", str(self.home),
            "--api-host", "0.0.0.0" if self.host is not None else "127.0.0.1",
            "--api-port", str(self.api_port),
            "--nats-port", str(self.nats_port),
            "--leaf-port", str(self.leaf_port),
            "--no-default-model",
            *extra,
        ]  # fmt: skip
        if self.host is None:
            argv += ["--no-mdns", "--bind-host", "127.0.0.1", "--peers", self.peers]
        log = (self.home / "node.out").open("ab")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        environment = {**clean, **(environment or {})}
        command = self.host.command(argv) if self.host is not None else argv
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        log.close()

    def kill(self) -> None:
        """kill -9 of every process of the node."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.kill()
            return
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self.kill()

    def http(self, method: str, path: str, body: object = None, timeout: float = 60) -> Any:
        """JSON from the node's API, fetched from inside its namespace."""
        url = f"http://{self.address}:{self.api_port}{path}"
        argv = ["curl", "-s", "-m", str(int(timeout)), "-X", method, url]
        if body is not None:
            argv += ["-H", "content-type: application/json", "-d", json.dumps(body)]
        command = self.host.command(argv) if self.host is not None else argv
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 5)
        if result.returncode != 0 or not result.stdout:
            raise ConnectionError(
                f"node {self.index}: {method} {path} failed ({result.returncode})"
            )
        return json.loads(result.stdout)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.http("GET", "/state", timeout=5)
        return state

    def node_id(self) -> str:
        node_id: str = (self.home / "node_id").read_text().strip()
        return node_id

    def tail(self, lines: int = 40) -> str:
        path = self.home / "node.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(
    description: str, timeout: float, check: Callable[[], bool], nodes: list[ClusterNode]
) -> float:
    """Seconds it took; raises with the nodes' logs when the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(ConnectionError, KeyError, ValueError, subprocess.TimeoutExpired):
            if check():
                return time.monotonic() - started
        time.sleep(0.1)
    logs = "\n".join(f"--- node {node.index}\n{node.tail()}" for node in nodes)
    raise AssertionError(f"timed out after {timeout}s waiting for {description}\n{logs}")


@contextlib.contextmanager
def cluster(base: Path, count: int, namespaces: bool | None = None) -> Generator[list[ClusterNode]]:
    """`count` nodes, not yet started; in namespaces when possible (or as `namespaces` says)."""
    use_namespaces = namespaces_available() if namespaces is None else namespaces
    hosts: Hosts | None = NetworkNamespaces.create(count) if use_namespaces else None
    if hosts is None:
        print("NOTE: network namespaces unavailable: nodes run on loopback with --peers")
    nodes: list[ClusterNode] = []
    try:
        for index in range(count):
            host = hosts[index] if hosts is not None else None
            nodes.append(ClusterNode(index, base / f"node{index}", host, peers=""))
        if hosts is None:
            for node in nodes:
                node.peers = ",".join(
                    f"127.0.0.1:{other.nats_port}" for other in nodes if other is not node
                )
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        if hosts is not None:
            hosts.destroy()


def agreed(nodes: list[ClusterNode]) -> bool:
    """Every node sees the same master, term and node set, holding all of `nodes`."""
    views = {
        (state["master_node_id"], state["term"], frozenset(state["nodes"]))
        for state in (node.state() for node in nodes)
    }
    return len(views) == 1 and len(next(iter(views))[2]) == len(nodes)


def place(node: ClusterNode, body: dict[str, Any], nodes: list[ClusterNode]) -> str:
    """Place an instance through `node` and wait until every runner of it is ready."""
    placed = node.http("POST", "/instance", body)
    assert "instance_id" in placed, placed
    instance_id: str = placed["instance_id"]

    def ready() -> bool:
        state = node.state()
        instance = state["instances"].get(instance_id)
        if instance is None:
            return False
        statuses = [state["runners"].get(shard["runner_id"]) for shard in instance["shards"]]
        return all(s is not None and s["status"]["status"] == "ready" for s in statuses)

    wait_until(f"instance {body} to be ready", 180, ready, nodes)
    return instance_id
