"""Requests to one node's worker about model files, answered on `shoal.downloads.<node>`.

They go to the worker directly, not through the master: files live on that node, and a
download must start (or be cancelled) even while the cluster has no master.
"""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard


def requested_layers(
    start_layer: int | None, end_layer: int | None, layer_count: int
) -> tuple[int, int]:
    """The layers asked for, [start, end), with the whole model for what is left out."""
    start = start_layer if start_layer is not None else 0
    end = end_layer if end_layer is not None else layer_count
    return start, end


class StartDownload(FrozenModel):
    kind: Literal["start_download"] = "start_download"
    model_id: ModelId
    # Both None: the whole model. Otherwise the files of layers [start_layer, end_layer).
    start_layer: int | None = Field(default=None, ge=0)
    end_layer: int | None = Field(default=None, ge=1)

    def layer_range(self, layer_count: int) -> tuple[int, int]:
        return requested_layers(self.start_layer, self.end_layer, layer_count)


class CancelDownload(FrozenModel):
    kind: Literal["cancel_download"] = "cancel_download"
    model_id: ModelId


class DeleteDownload(FrozenModel):
    kind: Literal["delete_download"] = "delete_download"
    model_id: ModelId


class AddModel(FrozenModel):
    """Make a card for a Hugging Face repo from its config.json and safetensors index."""

    kind: Literal["add_model"] = "add_model"
    model_id: ModelId


DownloadCommand = Annotated[
    StartDownload | CancelDownload | DeleteDownload | AddModel,
    Field(discriminator="kind"),
]

DownloadRejectionCode = Literal["not_found", "invalid", "conflict", "unavailable"]


class DownloadCommandAccepted(FrozenModel):
    outcome: Literal["accepted"] = "accepted"
    detail: str
    # The card an AddModel made.
    card: ModelCard | None = None


class DownloadCommandRejected(FrozenModel):
    outcome: Literal["rejected"] = "rejected"
    code: DownloadRejectionCode
    reason: str


DownloadCommandReply = Annotated[
    DownloadCommandAccepted | DownloadCommandRejected, Field(discriminator="outcome")
]
