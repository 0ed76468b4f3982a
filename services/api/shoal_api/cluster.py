"""Cluster endpoints: state, the event log, placing and deleting instances, health."""

from typing import Annotated, Final

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field
from shoal_shared.commands import (
    Command,
    CommandAccepted,
    CommandRejected,
    DeleteInstance,
    PlaceInstance,
)
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, new_command_id
from shoal_shared.instances import Sharding

from shoal_api.bodies import LenientRequest, read_body
from shoal_api.context import (
    ApiContext,
    LogUnavailableError,
    MasterUnavailableError,
    replica_is_live,
)
from shoal_api.errors import JSON_MEDIA_TYPE, no_master_error, rejection_error, unavailable
from shoal_api.event_log import MAX_EVENTS_PER_PAGE

DEFAULT_EVENTS_PER_PAGE: Final = 100


class PlaceInstanceRequest(LenientRequest):
    model_id: str = Field(min_length=1)
    sharding: Sharding = "pipeline"
    node_ids: tuple[str, ...] | None = None
    node_count: int | None = Field(default=None, ge=1)


class PlacedInstance(FrozenModel):
    instance_id: InstanceId
    command_id: str


class DeletedInstance(FrozenModel):
    instance_id: InstanceId
    deleted: bool = True


class NodeIdBody(FrozenModel):
    node_id: NodeId


class Health(FrozenModel):
    status: str
    node_id: NodeId
    master_node_id: NodeId | None
    term: int
    last_index: int


def _json(body: FrozenModel, status: int = 200) -> Response:
    return Response(content=body.model_dump_json(), status_code=status, media_type=JSON_MEDIA_TYPE)


async def _send(context: ApiContext, command: Command) -> CommandAccepted:
    try:
        reply = await context.cluster.send_command(command, context.timeouts.command_seconds)
    except MasterUnavailableError:
        raise no_master_error() from None
    if isinstance(reply, CommandRejected):
        raise rejection_error(reply)
    return reply


def router(context: ApiContext) -> APIRouter:
    routes = APIRouter()
    cluster = context.cluster

    async def get_state() -> Response:
        return Response(content=cluster.state.model_dump_json(), media_type=JSON_MEDIA_TYPE)

    async def get_events(
        since: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PER_PAGE)] = DEFAULT_EVENTS_PER_PAGE,
    ) -> Response:
        if cluster.election is None:
            raise unavailable("no master is known yet: the election has not answered")
        try:
            page = await cluster.read_events(since, limit)
        except LogUnavailableError as error:
            raise unavailable(f"the master's event log cannot be read: {error}") from None
        return _json(page)

    async def place_instance(request: Request) -> Response:
        body = await read_body(request, PlaceInstanceRequest)
        command = PlaceInstance(
            command_id=new_command_id(),
            model_id=ModelId(body.model_id),
            sharding=body.sharding,
            node_ids=None if body.node_ids is None else tuple(NodeId(n) for n in body.node_ids),
            node_count=body.node_count,
        )
        accepted = await _send(context, command)
        if accepted.created_id is None:
            raise unavailable("the master accepted the placement but named no instance")
        instance_id = InstanceId(accepted.created_id)
        # Read-your-writes: the client's next GET /state should show the new instance.
        await cluster.wait_for_state(
            lambda state: instance_id in state.instances,
            context.timeouts.replica_catch_up_seconds,
        )
        return _json(PlacedInstance(instance_id=instance_id, command_id=command.command_id))

    async def delete_instance(instance_id: str) -> Response:
        command = DeleteInstance(command_id=new_command_id(), instance_id=InstanceId(instance_id))
        await _send(context, command)
        await cluster.wait_for_state(
            lambda state: instance_id not in state.instances,
            context.timeouts.replica_catch_up_seconds,
        )
        return _json(DeletedInstance(instance_id=InstanceId(instance_id)))

    async def get_node_id() -> Response:
        return _json(NodeIdBody(node_id=cluster.node_id))

    async def healthz() -> Response:
        live = replica_is_live(cluster)
        election = cluster.election
        state = cluster.state
        health = Health(
            status="ok" if live else "starting",
            node_id=cluster.node_id,
            master_node_id=None if election is None else election.master_node_id,
            term=state.term,
            last_index=state.last_index,
        )
        return _json(health, status=200 if live else 503)

    routes.add_api_route("/state", get_state, methods=["GET"])
    routes.add_api_route("/events", get_events, methods=["GET"])
    routes.add_api_route("/instance", place_instance, methods=["POST"])
    routes.add_api_route("/instance/{instance_id}", delete_instance, methods=["DELETE"])
    routes.add_api_route("/node_id", get_node_id, methods=["GET"])
    routes.add_api_route("/healthz", healthz, methods=["GET"])
    return routes
