"""Whether a node has, or can fetch, the files a shard needs. Pure: no I/O."""

from collections.abc import Mapping

from shoal_shared.downloads import Download, DownloadCompleted
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard
from shoal_shared.state import NodeInfo

NodeDownloads = Mapping[NodeId, Mapping[ModelId, Download]]


def _record(card: ModelCard, node_id: NodeId, downloads: NodeDownloads) -> Download | None:
    return downloads.get(node_id, {}).get(card.model_id)


def file_problem(
    card: ModelCard,
    node: NodeInfo,
    downloads: NodeDownloads,
    start_layer: int,
    end_layer: int,
) -> str | None:
    """Why the node cannot get the files of layers [start_layer, end_layer), or None."""
    if card.source == "bundled":
        return None
    record = _record(card, node.node_id, downloads)
    if record is not None and record.covers(start_layer, end_layer):
        return None
    layers = f"layers {start_layer}-{end_layer - 1} of {card.model_id}"
    if card.source == "local":
        return f"node {node.node_id} lacks {layers}, which was imported on another node"
    if not node.telemetry.can_download:
        return f"node {node.node_id} is offline and lacks the files of {layers}"
    need = (end_layer - start_layer) * card.bytes_per_layer
    free = node.telemetry.disk_available_bytes
    if need > free:
        return (
            f"node {node.node_id} needs {need / 1e9:.2f} GB of disk for {layers}, "
            f"has {free / 1e9:.2f} GB free"
        )
    return None


def may_hold(card: ModelCard, node: NodeInfo, downloads: NodeDownloads) -> bool:
    """Whether the node could hold some shard of the model: can fetch, or has files."""
    if card.source == "bundled":
        return True
    record = _record(card, node.node_id, downloads)
    if record is not None and isinstance(record.status, DownloadCompleted):
        return True
    return card.source == "huggingface" and node.telemetry.can_download
