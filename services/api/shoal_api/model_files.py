"""Where a model's files are, flattened for clients: one row per node from state's download
records, and whether the model is on some node whole (or needs no download at all)."""

from shoal_shared.downloads import (
    Download,
    DownloadCompleted,
    DownloadFailed,
    DownloadOngoing,
    DownloadPending,
)
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard
from shoal_shared.state import State


class ModelFiles(FrozenModel):
    node_id: NodeId
    status: str
    start_layer: int
    end_layer: int
    bytes_done: int
    bytes_total: int
    # The model directory on that node, once completed.
    path: str | None
    # Why a failed download failed.
    reason: str | None


def model_files(download: Download) -> ModelFiles:
    status = download.status
    bytes_done = 0
    bytes_total = 0
    path: str | None = None
    reason: str | None = None
    match status:
        case DownloadPending():
            bytes_total = status.bytes_total
        case DownloadOngoing():
            bytes_done, bytes_total = status.bytes_done, status.bytes_total
        case DownloadCompleted():
            bytes_done = bytes_total = status.bytes_total
            path = status.path
        case DownloadFailed():
            reason = status.reason
    return ModelFiles(
        node_id=download.node_id,
        status=status.status,
        start_layer=download.start_layer,
        end_layer=download.end_layer,
        bytes_done=bytes_done,
        bytes_total=bytes_total,
        path=path,
        reason=reason,
    )


def downloads_of(state: State, model_id: ModelId) -> list[Download]:
    """The model's records, by node id."""
    return [
        of_node[model_id]
        for _node_id, of_node in sorted(state.downloads.items())
        if model_id in of_node
    ]


def is_downloaded(card: ModelCard, downloads: list[Download]) -> bool:
    """Bundled models ship with Shoal; others count once some node has every layer."""
    if card.source == "bundled":
        return True
    return any(
        isinstance(download.status, DownloadCompleted) and download.whole_model
        for download in downloads
    )


def all_downloads(state: State) -> list[Download]:
    """Every record in state, by node id, then model id."""
    return [
        download
        for _node_id, of_node in sorted(state.downloads.items())
        for _model_id, download in sorted(of_node.items())
    ]
