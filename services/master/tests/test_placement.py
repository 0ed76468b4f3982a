import pytest
from shoal_master.placement import (
    RING_PORT_BASE,
    Layout,
    Refusal,
    choose_layout,
    instance_from_layout,
    previews,
    ring_addresses,
    split_layers,
)
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId
from shoal_shared.model_card import builtin_cards
from shoal_shared.state import NodeInfo
from shoal_shared.telemetry import NodeTelemetry

CARD = builtin_cards()[ModelId("smollm2-135m")]


def node(name: str, available_gb: float) -> tuple[NodeId, NodeInfo]:
    node_id = NodeId(name)
    telemetry = NodeTelemetry(
        hostname=name,
        platform="Linux x86_64",
        chip="chip",
        backend="cpu",
        cpu_cores=2,
        memory_total_bytes=int(32e9),
        memory_available_bytes=int(available_gb * 1e9),
    )
    return node_id, NodeInfo(node_id=node_id, telemetry=telemetry)


def cluster(*sizes: float) -> dict[NodeId, NodeInfo]:
    return dict(node(f"node-{index}", size) for index, size in enumerate(sizes))


@pytest.mark.parametrize(
    ("layers", "weights"),
    [(30, [1]), (30, [1, 1]), (30, [3, 1, 1]), (5, [100, 0, 0]), (7, [1, 1, 1, 1, 1, 1, 1])],
)
def test_split_covers_every_layer_once(layers: int, weights: list[int]) -> None:
    ranges = split_layers(layers, weights)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == layers
    assert all(end > start for start, end in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_split_follows_memory() -> None:
    assert split_layers(30, [2, 1]) == ((0, 20), (20, 30))


def test_more_nodes_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_layers(2, [1, 1, 1])


def test_fewest_nodes_that_fit_are_chosen() -> None:
    layout = choose_layout(CARD, cluster(8, 4), "pipeline", None, None)
    assert isinstance(layout, Layout)
    assert layout.node_ids == (NodeId("node-0"),)
    assert layout.layer_ranges == ((0, 30),)


def test_pipeline_over_two_nodes_splits_by_memory() -> None:
    layout = choose_layout(CARD, cluster(6, 3), "pipeline", None, 2)
    assert isinstance(layout, Layout)
    assert layout.layer_ranges == ((0, 20), (20, 30))


def test_a_model_too_big_for_one_node_spreads() -> None:
    layout = choose_layout(CARD, cluster(0.4, 0.4), "pipeline", None, None)
    assert isinstance(layout, Layout)
    assert len(layout.node_ids) == 2


def test_not_enough_memory_anywhere_is_refused_with_the_reason() -> None:
    refusal = choose_layout(CARD, cluster(0.1), "pipeline", None, None)
    assert isinstance(refusal, Refusal)
    assert "needs" in refusal.reason


def test_tensor_needs_heads_divisible_by_node_count() -> None:
    refusal = choose_layout(CARD, cluster(8, 8), "tensor", None, 2)
    assert isinstance(refusal, Refusal)
    assert "9 attention heads and 3 KV heads do not both divide by 2" in refusal.reason
    layout = choose_layout(CARD, cluster(8, 8, 8), "tensor", None, 3)
    assert isinstance(layout, Layout)
    assert layout.layer_ranges == ((0, 30),) * 3


def test_explicit_nodes_are_honoured_or_refused() -> None:
    nodes = cluster(8, 4)
    layout = choose_layout(CARD, nodes, "pipeline", (NodeId("node-1"),), None)
    assert isinstance(layout, Layout)
    assert layout.node_ids == (NodeId("node-1"),)
    unknown = choose_layout(CARD, nodes, "pipeline", (NodeId("node-9"),), None)
    assert isinstance(unknown, Refusal)
    assert "node-9" in unknown.reason
    twice = choose_layout(CARD, nodes, "pipeline", (NodeId("node-1"), NodeId("node-1")), None)
    assert isinstance(twice, Refusal)


def test_empty_cluster_is_refused() -> None:
    refusal = choose_layout(CARD, {}, "pipeline", None, None)
    assert isinstance(refusal, Refusal)


def test_previews_list_every_candidate_with_reasons() -> None:
    candidates = previews(CARD, cluster(8, 8, 8))
    assert len(candidates) == 6
    tensor_two = [
        candidate
        for candidate in candidates
        if candidate.sharding == "tensor" and len(candidate.node_ids) == 2
    ]
    assert isinstance(tensor_two[0], Refusal)


# The ephemeral ranges of Linux (net.ipv4.ip_local_port_range) and of macOS and Windows.
EPHEMERAL_PORTS = (range(32768, 61000), range(49152, 65536))


def addressed(name: str, address: str) -> tuple[NodeId, NodeInfo]:
    node_id, info = node(name, 8)
    telemetry = info.telemetry.model_copy(update={"addresses": (address,)})
    return node_id, NodeInfo(node_id=node_id, telemetry=telemetry)


def test_ring_ports_stay_out_of_the_ephemeral_ranges_and_clear_of_live_instances() -> None:
    nodes = dict([addressed("node-0", "10.0.0.1"), addressed("node-1", "10.0.0.1")])
    layout = choose_layout(CARD, nodes, "pipeline", None, 2)
    assert isinstance(layout, Layout)
    first = ring_addresses(layout, nodes, ())
    # Two nodes on one host (as in tests) share an address: each rank gets its own port.
    assert first == (f"10.0.0.1:{RING_PORT_BASE}", f"10.0.0.1:{RING_PORT_BASE + 1}")
    live = instance_from_layout(
        layout, CARD, InstanceId("inst-0"), (RunnerId("runner-0"), RunnerId("runner-1")), first
    )
    second = ring_addresses(layout, nodes, (live,))
    assert set(second).isdisjoint(first)
    for address in (*first, *second):
        assert address is not None
        port = int(address.rsplit(":", 1)[1])
        assert not any(port in ephemeral for ephemeral in EPHEMERAL_PORTS), port


def test_a_single_node_instance_has_no_ring() -> None:
    nodes = dict([addressed("node-0", "10.0.0.1")])
    layout = choose_layout(CARD, nodes, "pipeline", None, 1)
    assert isinstance(layout, Layout)
    assert ring_addresses(layout, nodes, ()) == (None,)
