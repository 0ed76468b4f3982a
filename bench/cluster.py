"""Control-plane numbers of a real cluster:

- discovery and election: three nodes started together, until all agree on one master;
- failover: kill -9 of every process of the master node, until the survivors agree on a new
  master under a higher term;
- events per second indexed by the master (local stream -> master -> global stream);
- chunk latency leaf to leaf: a request/reply between two non-master nodes' servers, which
  travels through the master's server (the hub of the leaf star).

    uv run python bench/cluster.py

Nodes run in network namespaces when this process may create them (as root), else on
loopback joined with --peers (the output says which).
"""

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from shoal_shared.bus import Bus
from shoal_shared.events import NodeTelemetryUpdated
from shoal_shared.ids import NodeId
from shoal_shared.settings import resolve_settings
from shoal_shared.streams import append_local_event
from shoal_shared.telemetry import NodeTelemetry

from tests.cluster_harness import ClusterNode, cluster, wait_until
from tests.netns import namespaces_available


def views(nodes: list[ClusterNode]) -> set[tuple[str | None, int, int]]:
    seen: set[tuple[str | None, int, int]] = set()
    for node in nodes:
        state = node.state()
        seen.add((state["master_node_id"], state["term"], len(state["nodes"])))
    return seen


def agreed(nodes: list[ClusterNode]) -> bool:
    seen = views(nodes)
    return len(seen) == 1 and next(iter(seen))[2] == len(nodes) and next(iter(seen))[0] is not None


def control_plane(base: Path) -> dict[str, float]:
    with cluster(base, 3) as nodes:
        started = time.monotonic()
        for node in nodes:
            node.start()
        discovery = wait_until("agreement", 120, lambda: agreed(nodes), nodes)
        ((master_id, term, _),) = views(nodes)
        master = next(node for node in nodes if node.node_id() == master_id)
        survivors = [node for node in nodes if node is not master]
        master.kill()
        killed = time.monotonic()

        def new_master() -> bool:
            seen = views(survivors)
            return (
                len(seen) == 1
                and next(iter(seen))[0] not in (None, master_id)
                and next(iter(seen))[1] > term
            )

        wait_until("a new master", 60, new_master, survivors)
        failover = time.monotonic() - killed
        return {
            "start_to_agreement_s": discovery,
            "failover_s": failover,
            "wall_s": time.monotonic() - started,
        }


async def throughput_and_latency(base: Path) -> dict[str, float]:
    # The bench process connects to every server itself: loopback it is.
    with cluster(base, 3, namespaces=False) as nodes:
        for node in nodes:
            node.start()
        wait_until("agreement", 120, lambda: agreed(nodes), nodes)
        ((master_id, _, _),) = views(nodes)
        leaves = [node for node in nodes if node.node_id() != master_id]
        master = next(node for node in nodes if node.node_id() == master_id)
        settings = resolve_settings({"home": base}, environment={})
        buses = [
            await Bus.connect(settings.nats_url_for("127.0.0.1", n.nats_port), "bench")
            for n in nodes
        ]
        by_node = {node.node_id(): bus for node, bus in zip(nodes, buses, strict=True)}

        # Events: append to a leaf's local stream; the master indexes them into its log.
        leaf_id = NodeId(leaves[0].node_id())
        leaf_bus = by_node[leaf_id]
        telemetry = NodeTelemetry(
            hostname="bench",
            platform="bench",
            chip="bench",
            backend="cpu",
            cpu_cores=1,
            memory_total_bytes=1,
            memory_available_bytes=1,
        )
        count = 2000
        before = master.state()["last_index"]
        started = time.perf_counter()
        batch = [
            append_local_event(
                leaf_bus,
                leaf_id,
                NodeTelemetryUpdated(node_id=NodeId("bench-node"), telemetry=telemetry),
            )
            for _ in range(count)
        ]
        await asyncio.gather(*batch)
        appended = time.perf_counter()
        wait_until(
            "the master to index them",
            120,
            lambda: master.state()["last_index"] >= before + count,
            nodes,
        )
        indexed = time.perf_counter()

        # Leaf to leaf through the hub: request/reply round trips.
        responder, requester = by_node[leaves[0].node_id()], by_node[leaves[1].node_id()]

        async def echo(message: Msg) -> None:
            await responder.client.publish(message.reply, message.data)

        await responder.subscribe("bench.echo", echo)
        await responder.client.flush()
        # Interest crosses the leaf links within moments: wait for the first answer.
        for _ in range(100):
            try:
                await requester.client.request("bench.echo", b"x", timeout=1)
                break
            except (NoRespondersError, NatsTimeoutError):
                await asyncio.sleep(0.1)
        round_trips: list[float] = []
        for _ in range(500):
            sent = time.perf_counter()
            await requester.client.request("bench.echo", b"x" * 200, timeout=2)
            round_trips.append(time.perf_counter() - sent)
        for bus in buses:
            await bus.close()
        round_trips.sort()
        return {
            "events": count,
            "append_events_per_s": count / (appended - started),
            "indexed_events_per_s": count / (indexed - started),
            "leaf_to_leaf_rtt_p50_ms": 1000 * statistics.median(round_trips),
            "leaf_to_leaf_rtt_p99_ms": 1000 * round_trips[int(len(round_trips) * 0.99)],
        }


def main() -> None:
    results: dict[str, Any] = {"namespaces": namespaces_available()}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as scratch:
        results["control_plane"] = control_plane(Path(scratch) / "a")
    print(json.dumps(results, indent=2), flush=True)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as scratch:
        results["data_plane_loopback"] = asyncio.run(throughput_and_latency(Path(scratch) / "b"))
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
