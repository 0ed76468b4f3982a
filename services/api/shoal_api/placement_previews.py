"""`GET /instance/previews?model_id=`: every candidate placement, the invalid ones with why."""

from typing import Annotated

from fastapi import APIRouter, Query, Response
from shoal_master.placement import Layout, previews
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.instances import Sharding

from shoal_api.context import ApiContext
from shoal_api.errors import JSON_MEDIA_TYPE
from shoal_api.inference import resolve_model


class Preview(FrozenModel):
    sharding: Sharding
    node_count: int
    node_ids: tuple[NodeId, ...]
    valid: bool
    # Pipeline: the layer range of each node, in rank order.
    layer_ranges: tuple[tuple[int, int], ...] | None
    reason: str | None


class Previews(FrozenModel):
    model_id: ModelId
    previews: tuple[Preview, ...]


def previews_router(context: ApiContext) -> APIRouter:
    routes = APIRouter()

    async def get_previews(model_id: Annotated[str, Query(min_length=1)]) -> Response:
        card = resolve_model(context, model_id)
        listed: list[Preview] = []
        for candidate in previews(
            card, context.cluster.state.nodes, context.cluster.state.downloads
        ):
            valid = isinstance(candidate, Layout)
            listed.append(
                Preview(
                    sharding=candidate.sharding,
                    node_count=len(candidate.node_ids),
                    node_ids=candidate.node_ids,
                    valid=valid,
                    layer_ranges=candidate.layer_ranges if isinstance(candidate, Layout) else None,
                    reason=None if isinstance(candidate, Layout) else candidate.reason,
                )
            )
        body = Previews(model_id=card.model_id, previews=tuple(listed))
        return Response(content=body.model_dump_json(), media_type=JSON_MEDIA_TYPE)

    routes.add_api_route("/instance/previews", get_previews, methods=["GET"])
    return routes
