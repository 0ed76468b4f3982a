"""Where a model's files are, per node: the download records folded into state.

A record covers layers [start_layer, end_layer) of the model: a pipeline shard fetches only
the weight files of its own layers, so "node N has model M" is always "has these layers".
"""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, NodeId


class FileProgress(FrozenModel):
    path: str
    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)


class DownloadPending(FrozenModel):
    status: Literal["pending"] = "pending"
    bytes_total: int = Field(default=0, ge=0)


class DownloadOngoing(FrozenModel):
    status: Literal["ongoing"] = "ongoing"
    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    bytes_per_second: float = Field(ge=0.0)
    # None while the speed is not yet known.
    eta_seconds: float | None = Field(default=None, ge=0.0)
    files: tuple[FileProgress, ...] = ()


class DownloadCompleted(FrozenModel):
    status: Literal["completed"] = "completed"
    bytes_total: int = Field(ge=0)
    # The model directory on that node.
    path: str
    # Found in an extra model directory that Shoal only reads (never writes, never deletes).
    read_only: bool = False


class DownloadFailed(FrozenModel):
    status: Literal["failed"] = "failed"
    reason: str


DownloadStatus = Annotated[
    DownloadPending | DownloadOngoing | DownloadCompleted | DownloadFailed,
    Field(discriminator="status"),
]


class Download(FrozenModel):
    node_id: NodeId
    model_id: ModelId
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1)
    layer_count: int = Field(ge=1)
    status: DownloadStatus

    @property
    def whole_model(self) -> bool:
        return self.start_layer == 0 and self.end_layer == self.layer_count

    def covers(self, start_layer: int, end_layer: int) -> bool:
        """Whether the files for layers [start_layer, end_layer) are all on the node."""
        return (
            isinstance(self.status, DownloadCompleted)
            and self.start_layer <= start_layer
            and end_layer <= self.end_layer
        )
