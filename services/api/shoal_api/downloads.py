"""Model files: start, cancel and delete a node's downloads, add a hub model, list records.

Commands go to the chosen node's worker (`shoal.downloads.<node>`), not the master: the
files live on that node. What the worker then does shows up as download records in state.
"""

from collections.abc import Callable
from typing import Final

from fastapi import APIRouter, Request, Response
from pydantic import Field, TypeAdapter
from shoal_shared.download_commands import (
    AddModel,
    CancelDownload,
    DeleteDownload,
    DownloadCommand,
    DownloadCommandAccepted,
    DownloadCommandRejected,
    StartDownload,
)
from shoal_shared.downloads import Download, DownloadCompleted, DownloadFailed
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard
from shoal_shared.state import State

from shoal_api.bodies import LenientRequest, read_body
from shoal_api.context import ApiContext, WorkerUnavailableError, replica_is_live
from shoal_api.errors import JSON_MEDIA_TYPE, not_found, rejection_error, unavailable
from shoal_api.model_files import all_downloads

_DOWNLOAD_LIST: Final[TypeAdapter[list[Download]]] = TypeAdapter(list[Download])


class StartDownloadRequest(LenientRequest):
    model_id: str = Field(min_length=1)
    # None: the node that serves this API.
    node_id: str | None = None
    # Both None: the whole model; otherwise the files of layers [start_layer, end_layer).
    start_layer: int | None = Field(default=None, ge=0)
    end_layer: int | None = Field(default=None, ge=1)


class CancelDownloadRequest(LenientRequest):
    model_id: str = Field(min_length=1)
    node_id: str | None = None


class AddModelRequest(LenientRequest):
    model_id: str = Field(min_length=1)


class DownloadAnswer(FrozenModel):
    node_id: NodeId
    model_id: ModelId
    detail: str
    # The node's record once the command took effect in this node's replica (None: no
    # record, as for a bundled model, or the replica has not caught up yet).
    download: Download | None = None


def _json(body: FrozenModel, status: int = 200) -> Response:
    return Response(content=body.model_dump_json(), status_code=status, media_type=JSON_MEDIA_TYPE)


def _card(context: ApiContext, model_id: str) -> ModelCard:
    card = context.cards.get(ModelId(model_id))
    if card is None:
        raise not_found(
            f"the model {model_id!r} does not exist", code="model_not_found", param="model_id"
        )
    return card


def _node(context: ApiContext, requested: str | None) -> NodeId:
    """The node a command is for: this one by default, else one the cluster knows."""
    if requested is None or requested == context.node_id:
        return context.node_id
    state = context.cluster.state
    node_id = NodeId(requested)
    if node_id in state.members or node_id in state.nodes:
        return node_id
    if not replica_is_live(context.cluster):
        raise unavailable(
            f"this node has not joined the cluster yet and cannot tell whether node "
            f"{requested!r} exists",
            code="not_joined",
        )
    raise not_found(f"no node {requested!r} in the cluster", code="node_not_found", param="node_id")


async def _ask_worker(
    context: ApiContext, node_id: NodeId, command: DownloadCommand, timeout: float
) -> DownloadCommandAccepted:
    try:
        reply = await context.cluster.request_download(node_id, command, timeout)
    except WorkerUnavailableError as error:
        raise unavailable(str(error), code="worker_unavailable") from None
    if isinstance(reply, DownloadCommandRejected):
        raise rejection_error(reply)
    return reply


def _started(
    old: Download | None, start_layer: int, end_layer: int
) -> Callable[[Download | None], bool]:
    """Whether a replica shows the started download: a record that covers the layers or is
    under way, or any change from a record that said otherwise (a failure of an earlier try
    must not be taken for this one's)."""

    def check(record: Download | None) -> bool:
        if record is None:
            return False
        if record != old:
            return True
        if isinstance(record.status, DownloadCompleted):
            return record.covers(start_layer, end_layer)
        return not isinstance(record.status, DownloadFailed)

    return check


def router(context: ApiContext) -> APIRouter:
    routes = APIRouter()
    cluster = context.cluster
    timeouts = context.timeouts

    async def start_download(request: Request) -> Response:
        body = await read_body(request, StartDownloadRequest)
        card = _card(context, body.model_id)
        node_id = _node(context, body.node_id)
        old = cluster.state.download(node_id, card.model_id)
        command = StartDownload(
            model_id=card.model_id, start_layer=body.start_layer, end_layer=body.end_layer
        )
        accepted = await _ask_worker(context, node_id, command, timeouts.worker_seconds)
        record: Download | None = None
        if card.source != "bundled":
            started = _started(old, *command.layer_range(card.layers))
            # Read-your-writes: a client polling GET /downloads next sees this download,
            # not a record left by an earlier one.
            await cluster.wait_for_state(
                lambda state: started(state.download(node_id, card.model_id)),
                timeouts.replica_catch_up_seconds,
            )
            record = cluster.state.download(node_id, card.model_id)
        answer = DownloadAnswer(
            node_id=node_id, model_id=card.model_id, detail=accepted.detail, download=record
        )
        return _json(answer, status=202)

    async def cancel_download(request: Request) -> Response:
        body = await read_body(request, CancelDownloadRequest)
        card = _card(context, body.model_id)
        node_id = _node(context, body.node_id)
        command = CancelDownload(model_id=card.model_id)
        accepted = await _ask_worker(context, node_id, command, timeouts.worker_seconds)
        answer = DownloadAnswer(node_id=node_id, model_id=card.model_id, detail=accepted.detail)
        return _json(answer, status=202)

    async def delete_download(node_id: str, model_id: str) -> Response:
        card = _card(context, model_id)
        node = _node(context, node_id)
        command = DeleteDownload(model_id=card.model_id)
        accepted = await _ask_worker(context, node, command, timeouts.worker_seconds)

        def deleted(state: State) -> bool:
            # Gone, or only a read-only copy left (Shoal never deletes those).
            record = state.download(node, card.model_id)
            return record is None or (
                isinstance(record.status, DownloadCompleted) and record.status.read_only
            )

        await cluster.wait_for_state(deleted, timeouts.replica_catch_up_seconds)
        record = cluster.state.download(node, card.model_id)
        answer = DownloadAnswer(
            node_id=node, model_id=card.model_id, detail=accepted.detail, download=record
        )
        return _json(answer)

    async def add_model(request: Request) -> Response:
        body = await read_body(request, AddModelRequest)
        model_id = ModelId(body.model_id)
        known = context.cards.get(model_id)
        if known is not None:
            return _json(known)
        command = AddModel(model_id=model_id)
        accepted = await _ask_worker(context, context.node_id, command, timeouts.add_model_seconds)
        card = accepted.card
        if card is None:
            raise unavailable(f"the worker accepted {model_id} but sent no card")
        # Read-your-writes: the client's next request (a download, a placement) must know
        # the model, and the API knows cards only through its replica. Past the wait the card
        # is added all the same (the worker sent it to the log); it only shows up later.
        await cluster.wait_for_state(
            lambda state: card.model_id in state.added_models, timeouts.model_added_seconds
        )
        return _json(card, status=201)

    async def list_downloads() -> Response:
        records = all_downloads(cluster.state)
        return Response(content=_DOWNLOAD_LIST.dump_json(records), media_type=JSON_MEDIA_TYPE)

    routes.add_api_route("/download/start", start_download, methods=["POST"])
    routes.add_api_route("/download/cancel", cancel_download, methods=["POST"])
    # `:path` because Hugging Face style ids contain a slash (org/model).
    routes.add_api_route("/download/{node_id}/{model_id:path}", delete_download, methods=["DELETE"])
    routes.add_api_route("/models/add", add_model, methods=["POST"])
    routes.add_api_route("/downloads", list_downloads, methods=["GET"])
    return routes
