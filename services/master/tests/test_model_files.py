"""Placement sends a shard only where its files are or can arrive."""

from shoal_master.placement import Layout, Refusal, choose_layout
from shoal_shared.downloads import Download, DownloadCompleted, DownloadOngoing
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard, builtin_cards
from shoal_shared.state import NodeInfo
from shoal_shared.testing import telemetry

HUB_CARD = builtin_cards()[ModelId("mlx-community/Llama-3.2-1B-Instruct-4bit")]
GB = 1_000_000_000


def node(name: str, *, disk_gb: float = 100, online: bool = True) -> tuple[NodeId, NodeInfo]:
    node_id = NodeId(name)
    reported = telemetry(16, 32, disk_gb=disk_gb, can_download=online)
    return node_id, NodeInfo(node_id=node_id, telemetry=reported)


def has(node_id: str, card: ModelCard, start: int, end: int, done: bool = True) -> Download:
    status = (
        DownloadCompleted(bytes_total=1, path="/models/x")
        if done
        else DownloadOngoing(bytes_done=0, bytes_total=1, bytes_per_second=0.0)
    )
    return Download(
        node_id=NodeId(node_id),
        model_id=card.model_id,
        start_layer=start,
        end_layer=end,
        layer_count=card.layers,
        status=status,
    )


def test_an_online_node_with_room_may_fetch() -> None:
    nodes = dict([node("a")])
    assert isinstance(choose_layout(HUB_CARD, nodes, "pipeline", None, None, {}), Layout)


def test_an_offline_node_without_the_files_is_not_a_candidate() -> None:
    nodes = dict([node("a", online=False)])
    refusal = choose_layout(HUB_CARD, nodes, "pipeline", None, None, {})
    assert isinstance(refusal, Refusal)
    assert "can fetch" in refusal.reason
    forced = choose_layout(HUB_CARD, nodes, "pipeline", (NodeId("a"),), None, {})
    assert isinstance(forced, Refusal)
    assert "offline" in forced.reason


def test_an_offline_node_with_the_files_is_used() -> None:
    nodes = dict([node("a", online=False)])
    downloads = {NodeId("a"): {HUB_CARD.model_id: has("a", HUB_CARD, 0, HUB_CARD.layers)}}
    assert isinstance(choose_layout(HUB_CARD, nodes, "pipeline", None, None, downloads), Layout)


def test_files_must_cover_the_shard_and_be_complete() -> None:
    nodes = dict([node("a", online=False)])
    partial = {NodeId("a"): {HUB_CARD.model_id: has("a", HUB_CARD, 0, 8)}}
    refusal = choose_layout(HUB_CARD, nodes, "pipeline", (NodeId("a"),), None, partial)
    assert isinstance(refusal, Refusal)
    assert "layers 0-15" in refusal.reason
    ongoing = {NodeId("a"): {HUB_CARD.model_id: has("a", HUB_CARD, 0, 16, done=False)}}
    assert isinstance(
        choose_layout(HUB_CARD, nodes, "pipeline", (NodeId("a"),), None, ongoing), Refusal
    )


def test_too_little_disk_for_the_shard_is_refused_with_the_numbers() -> None:
    nodes = dict([node("a", disk_gb=0.1)])
    refusal = choose_layout(HUB_CARD, nodes, "pipeline", (NodeId("a"),), None, {})
    assert isinstance(refusal, Refusal)
    assert "GB of disk" in refusal.reason


def test_pipeline_shards_need_disk_only_for_their_layers() -> None:
    # Room for about half the model on each node: enough for a two-node pipeline.
    half = HUB_CARD.storage_bytes / GB * 0.55
    nodes = dict([node("a", disk_gb=half), node("b", disk_gb=half)])
    assert isinstance(choose_layout(HUB_CARD, nodes, "pipeline", None, 1, {}), Refusal)
    assert isinstance(choose_layout(HUB_CARD, nodes, "pipeline", None, 2, {}), Layout)


def test_the_bundled_model_needs_no_download() -> None:
    bundled = builtin_cards()[ModelId("smollm2-135m")]
    nodes = dict([node("a", disk_gb=0, online=False)])
    assert isinstance(choose_layout(bundled, nodes, "pipeline", None, None, {}), Layout)
