"""Placement: which nodes run a model and which layers each holds. Pure: no I/O, no clocks.

Pipeline parallel splits the layers in proportion to each node's free memory (at least one
layer per node); tensor parallel gives every node every layer and a 1/n slice of each, where
the architecture can shard and the head counts divide by n.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, NodeId, RunnerId
from shoal_shared.instances import Instance, ShardAssignment, Sharding
from shoal_shared.model_card import ModelCard
from shoal_shared.state import NodeInfo

from shoal_master.model_files import NodeDownloads, file_problem, may_hold

# Leave room for the KV cache, activations and the rest of the machine.
MEMORY_HEADROOM_FRACTION: Final = 0.1
# Runners of a multi-node instance listen for their ring neighbours from this port up. Below
# every system's ephemeral range (Linux 32768-60999, macOS and Windows 49152-65535): a ring
# port there can be held by one of the node's own outgoing connections (a leaf link, an HTTP
# poll), and the rank then cannot listen; 52500 did so in a cluster test.
RING_PORT_BASE: Final = 31500


class Layout(FrozenModel):
    """A candidate placement: nodes in rank order and their layer ranges."""

    sharding: Sharding
    node_ids: tuple[NodeId, ...]
    layer_ranges: tuple[tuple[int, int], ...]


class Refusal(FrozenModel):
    sharding: Sharding
    node_ids: tuple[NodeId, ...]
    reason: str


def usable_memory(node: NodeInfo) -> int:
    available = node.telemetry.memory_available_bytes
    return int(available * (1 - MEMORY_HEADROOM_FRACTION))


def split_layers(layer_count: int, weights: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Contiguous ranges, sizes proportional to weights (largest remainder), each >= 1."""
    node_count = len(weights)
    if node_count == 0 or layer_count < node_count:
        raise ValueError(f"cannot split {layer_count} layers over {node_count} nodes")
    total_weight = sum(weights) or node_count
    spare = layer_count - node_count
    exact = [spare * (weight or 1) / total_weight for weight in weights]
    sizes = [1 + int(share) for share in exact]
    by_remainder = sorted(range(node_count), key=lambda index: exact[index] - int(exact[index]))
    for index in reversed(by_remainder[node_count - (layer_count - sum(sizes)) :]):
        sizes[index] += 1
    ranges: list[tuple[int, int]] = []
    start = 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return tuple(ranges)


def layout_for(
    card: ModelCard,
    nodes: Mapping[NodeId, NodeInfo],
    node_ids: Sequence[NodeId],
    sharding: Sharding,
    downloads: NodeDownloads | None = None,
) -> Layout | Refusal:
    chosen = tuple(node_ids)
    count = len(chosen)

    def refuse(reason: str) -> Refusal:
        return Refusal(sharding=sharding, node_ids=chosen, reason=reason)

    if count == 0:
        return refuse("no nodes to place on")
    missing = [node_id for node_id in chosen if node_id not in nodes]
    if missing:
        return refuse(f"unknown or unreachable node(s): {', '.join(missing)}")
    if len(set(chosen)) != count:
        return refuse("a node is listed twice")
    if sharding == "pipeline":
        if card.layers < count:
            return refuse(f"{card.layers} layers cannot give each of {count} nodes one")
        ranges = split_layers(card.layers, [usable_memory(nodes[node]) for node in chosen])
        needs = [(end - start) * card.bytes_per_layer for start, end in ranges]
    else:
        if count > 1 and not card.supports_tensor:
            return refuse(f"{card.architecture} models cannot be tensor-sharded")
        if card.attention_heads % count or card.kv_heads % count:
            return refuse(
                f"{card.attention_heads} attention heads and {card.kv_heads} KV heads "
                f"do not both divide by {count} nodes"
            )
        ranges = tuple((0, card.layers) for _ in chosen)
        needs = [-(-card.storage_bytes // count)] * count
    for node_id, need in zip(chosen, needs, strict=True):
        free = usable_memory(nodes[node_id])
        if need > free:
            return refuse(
                f"node {node_id} needs {need / 1e9:.2f} GB for its shard, has {free / 1e9:.2f} GB"
            )
    for node_id, (start, end) in zip(chosen, ranges, strict=True):
        problem = file_problem(card, nodes[node_id], downloads or {}, start, end)
        if problem is not None:
            return refuse(problem)
    return Layout(sharding=sharding, node_ids=chosen, layer_ranges=ranges)


def nodes_by_free_memory(
    card: ModelCard, nodes: Mapping[NodeId, NodeInfo], downloads: NodeDownloads
) -> tuple[NodeId, ...]:
    """Candidates for automatic placement: nodes that could hold a shard, most memory first."""
    return tuple(
        sorted(
            (node_id for node_id, node in nodes.items() if may_hold(card, node, downloads)),
            key=lambda node_id: (-usable_memory(nodes[node_id]), node_id),
        )
    )


def choose_layout(
    card: ModelCard,
    nodes: Mapping[NodeId, NodeInfo],
    sharding: Sharding,
    node_ids: Sequence[NodeId] | None,
    node_count: int | None,
    downloads: NodeDownloads | None = None,
) -> Layout | Refusal:
    """Honour explicit nodes or a node count; otherwise the fewest nodes that fit."""
    if node_ids is not None:
        if node_count is not None and node_count != len(node_ids):
            return Refusal(
                sharding=sharding,
                node_ids=tuple(node_ids),
                reason=f"node_count {node_count} disagrees with {len(node_ids)} listed nodes",
            )
        return layout_for(card, nodes, node_ids, sharding, downloads)
    ranked = nodes_by_free_memory(card, nodes, downloads or {})
    if node_count is not None:
        if node_count > len(ranked):
            return Refusal(
                sharding=sharding,
                node_ids=ranked,
                reason=f"{node_count} nodes asked for, {len(ranked)} in the cluster can hold "
                f"{card.model_id}",
            )
        return layout_for(card, nodes, ranked[:node_count], sharding, downloads)
    reason = (
        "the cluster has no nodes yet"
        if not nodes
        else f"no node has {card.model_id} or can fetch it (offline, or imported elsewhere)"
    )
    refusal = Refusal(sharding=sharding, node_ids=(), reason=reason)
    for count in range(1, len(ranked) + 1):
        outcome = layout_for(card, nodes, ranked[:count], sharding, downloads)
        if isinstance(outcome, Layout):
            return outcome
        refusal = outcome
    return refusal


def previews(
    card: ModelCard, nodes: Mapping[NodeId, NodeInfo], downloads: NodeDownloads | None = None
) -> tuple[Layout | Refusal, ...]:
    """Every candidate (sharding x node count, on the nodes with most free memory)."""
    ranked = nodes_by_free_memory(card, nodes, downloads or {})
    return tuple(
        layout_for(card, nodes, ranked[:count], sharding, downloads)
        for sharding in ("pipeline", "tensor")
        for count in range(1, len(ranked) + 1)
    )


def ring_addresses(
    layout: Layout, nodes: Mapping[NodeId, NodeInfo], instances: Iterable[Instance]
) -> tuple[str | None, ...]:
    """One "ip:port" per rank for a multi-node ring, avoiding ports that live instances use on
    the same address (nodes on one host, as in tests, share an address)."""
    if len(layout.node_ids) == 1:
        return (None,)
    taken = {
        shard.ring_address
        for instance in instances
        for shard in instance.shards
        if shard.ring_address is not None
    }
    addresses: list[str | None] = []
    for node_id in layout.node_ids:
        host = next(iter(nodes[node_id].telemetry.addresses), "127.0.0.1")
        port = RING_PORT_BASE
        while f"{host}:{port}" in taken:
            port += 1
        taken.add(f"{host}:{port}")
        addresses.append(f"{host}:{port}")
    return tuple(addresses)


def instance_from_layout(
    layout: Layout,
    card: ModelCard,
    instance_id: InstanceId,
    runner_ids: Sequence[RunnerId],
    addresses: Sequence[str | None],
) -> Instance:
    shards = tuple(
        ShardAssignment(
            runner_id=runner_id,
            node_id=node_id,
            rank=rank,
            start_layer=start,
            end_layer=end,
            ring_address=address,
        )
        for rank, (node_id, (start, end), runner_id, address) in enumerate(
            zip(layout.node_ids, layout.layer_ranges, runner_ids, addresses, strict=False)
        )
    )
    return Instance(
        instance_id=instance_id,
        model_id=card.model_id,
        sharding=layout.sharding,
        layer_count=card.layers,
        shards=shards,
    )
