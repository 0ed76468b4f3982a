"""`GET /v1/models` and `GET /v1/models/{id}`: OpenAI's model list, plus what the cluster is
doing with each model (placed? ready? if not, why not)."""

from typing import Final, Literal

from fastapi import APIRouter, Response
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard
from shoal_shared.state import State

from shoal_api.context import ApiContext, replica_is_live
from shoal_api.errors import JSON_MEDIA_TYPE, not_found
from shoal_api.instance_choice import (
    describe_instance,
    instance_is_ready,
    instances_of,
    not_placed_message,
)
from shoal_api.model_files import ModelFiles, downloads_of, is_downloaded, model_files

OWNER: Final = "shoal"


class ModelObject(FrozenModel):
    id: str
    object: Literal["model"] = "model"
    # Model cards carry no release date; OpenAI clients only need an integer here.
    created: int = 0
    owned_by: str = OWNER
    # Shoal's additions: OpenAI clients ignore fields they do not know.
    name: str
    context_length: int
    capabilities: tuple[str, ...]
    placed: bool
    ready: bool
    status: str
    # Where the model comes from: "bundled" (no download), "huggingface" or "local" (GGUF).
    source: str
    storage_bytes: int
    # Bundled, or some node has every layer on disk.
    downloaded: bool
    downloads: tuple[ModelFiles, ...]


class ModelList(FrozenModel):
    object: Literal["list"] = "list"
    data: tuple[ModelObject, ...]


def model_object(card: ModelCard, state: State, live: bool) -> ModelObject:
    instances = instances_of(state, card.model_id) if live else []
    downloads = downloads_of(state, card.model_id) if live else []
    ready = any(instance_is_ready(state, instance) for instance in instances)
    if not live:
        status = "unknown: this node has not joined the cluster yet"
    elif ready:
        status = "ready"
    elif instances:
        status = "; ".join(describe_instance(state, instance) for instance in instances)
    else:
        status = not_placed_message(card.model_id)
    return ModelObject(
        id=card.model_id,
        name=card.name,
        context_length=card.context_length,
        capabilities=card.capabilities,
        placed=bool(instances),
        ready=ready,
        status=status,
        source=card.source,
        storage_bytes=card.storage_bytes,
        downloaded=is_downloaded(card, downloads),
        downloads=tuple(model_files(download) for download in downloads),
    )


def router(context: ApiContext) -> APIRouter:
    routes = APIRouter()

    async def list_models() -> Response:
        live = replica_is_live(context.cluster)
        state = context.cluster.state
        models = ModelList(
            data=tuple(model_object(card, state, live) for _, card in sorted(context.cards.items()))
        )
        return Response(content=models.model_dump_json(), media_type=JSON_MEDIA_TYPE)

    async def get_model(model_id: str) -> Response:
        card = context.cards.get(ModelId(model_id))
        if card is None:
            raise not_found(f"the model {model_id!r} does not exist", code="model_not_found")
        live = replica_is_live(context.cluster)
        body = model_object(card, context.cluster.state, live)
        return Response(content=body.model_dump_json(), media_type=JSON_MEDIA_TYPE)

    routes.add_api_route("/v1/models", list_models, methods=["GET"])
    # `:path` because Hugging Face style ids contain a slash (org/model).
    routes.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    return routes
