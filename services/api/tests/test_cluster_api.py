"""Cluster endpoints and the model list, over real HTTP and NATS with a fake master."""

import httpx
from shoal_api.event_log import EventPage
from shoal_api.testing import (
    BUNDLED_MODEL_ID,
    TEST_INSTANCE_ID,
    TEST_NODE_ID,
    UNPLACED_MODEL_ID,
    FakeMaster,
)
from shoal_shared.commands import PlaceInstance
from shoal_shared.state import State


async def test_state_is_the_replica(http: httpx.AsyncClient, fake_master: FakeMaster) -> None:
    response = await http.get("/state")
    assert response.status_code == 200
    state = State.model_validate_json(response.content)
    assert state == fake_master.state
    assert TEST_INSTANCE_ID in state.instances


async def test_node_id_and_health(http: httpx.AsyncClient) -> None:
    assert (await http.get("/node_id")).json() == {"node_id": TEST_NODE_ID}
    health = await http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "node_id": TEST_NODE_ID,
        "master_node_id": TEST_NODE_ID,
        "term": 1,
        "last_index": 3,
    }


async def test_events_are_read_from_the_masters_log(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    response = await http.get("/events", params={"since": 1, "limit": 2})
    assert response.status_code == 200
    page = EventPage.model_validate_json(response.content)
    assert [indexed.index for indexed in page.events] == [1, 2]
    assert page.events[0].event.kind == "node_telemetry_updated"
    assert page.next_index == 3
    assert page.last_index == fake_master.state.last_index
    rest = (await http.get("/events", params={"since": page.next_index})).json()
    assert [indexed["index"] for indexed in rest["events"]] == [3]
    assert (await http.get("/events", params={"since": "soon"})).status_code == 400
    assert (await http.get("/events", params={"limit": 0})).status_code == 400


async def test_models_say_whether_they_are_ready(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    models = {model["id"]: model for model in listing["data"]}
    bundled = models[BUNDLED_MODEL_ID]
    assert (bundled["object"], bundled["owned_by"]) == ("model", "shoal")
    assert (bundled["placed"], bundled["ready"], bundled["status"]) == (True, True, "ready")
    unplaced = models[UNPLACED_MODEL_ID]
    assert (unplaced["placed"], unplaced["ready"]) == (False, False)
    assert "POST /instance" in unplaced["status"]
    one = await http.get(f"/v1/models/{BUNDLED_MODEL_ID}")
    assert one.json() == bundled
    missing = await http.get("/v1/models/org/no-such-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_place_and_delete_an_instance(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    body = {"model_id": BUNDLED_MODEL_ID, "sharding": "tensor", "node_ids": [TEST_NODE_ID]}
    placed = await http.post("/instance", json=body)
    assert placed.status_code == 200
    instance_id = placed.json()["instance_id"]
    command = fake_master.commands[-1]
    assert isinstance(command, PlaceInstance)
    assert (command.sharding, command.node_ids, command.node_count) == (
        "tensor",
        (TEST_NODE_ID,),
        None,
    )
    # Read-your-writes: the replica shows the instance once the placement returned.
    state = State.model_validate_json((await http.get("/state")).content)
    assert instance_id in state.instances
    deleted = await http.delete(f"/instance/{instance_id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"instance_id": instance_id, "deleted": True}
    state = State.model_validate_json((await http.get("/state")).content)
    assert instance_id not in state.instances


async def test_placement_errors(http: httpx.AsyncClient, fake_master: FakeMaster) -> None:
    unknown = await http.post("/instance", json={"model_id": "no-such-model"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "unknown model 'no-such-model'"
    bad = await http.post("/instance", json={"model_id": BUNDLED_MODEL_ID, "sharding": "diagonal"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "sharding"
    missing = await http.delete("/instance/inst-nowhere")
    assert missing.status_code == 404
    await fake_master.stop_answering_commands()
    no_master = await http.post("/instance", json={"model_id": BUNDLED_MODEL_ID})
    assert no_master.status_code == 503
    assert no_master.json()["error"]["code"] == "no_master"


async def test_previews_list_every_candidate(http: httpx.AsyncClient) -> None:
    response = await http.get("/instance/previews", params={"model_id": BUNDLED_MODEL_ID})
    assert response.status_code == 200
    previews = response.json()["previews"]
    assert {(p["sharding"], p["node_count"]) for p in previews} == {
        ("pipeline", 1),
        ("tensor", 1),
    }
    assert all(p["valid"] for p in previews)
    unknown = await http.get("/instance/previews", params={"model_id": "nope"})
    assert unknown.status_code == 404
