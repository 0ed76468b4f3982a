"""`run_api`: serves on the node's port, reports "starting" until the node has a master,
and stops cleanly when cancelled."""

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from shoal_api.service import ApiStartupError, bind_socket, run_api
from shoal_api.testing import (
    BUNDLED_MODEL_ID,
    FakeMaster,
    cards_for_tests,
    node_settings,
    ready_cluster,
    running_broker,
)
from shoal_shared.bus import Bus
from shoal_shared.ids import InstanceId, RunnerId
from shoal_shared.node_identity import load_or_create_node_id


async def health(http: httpx.AsyncClient) -> httpx.Response:
    """GET /healthz, waiting for the server to accept connections."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await http.get("/healthz")
            except httpx.ConnectError:
                await asyncio.sleep(0.05)


async def test_run_api_serves_until_cancelled(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    node_id = load_or_create_node_id(settings.home)
    url = f"http://{settings.api_host}:{settings.api_port}"
    async with running_broker(settings, node_id), httpx.AsyncClient(base_url=url) as http:
        api = asyncio.create_task(run_api(settings))
        starting = await health(http)
        # No election has answered yet: the API is up but says it is not ready.
        assert starting.status_code == 503
        assert starting.json()["status"] == "starting"
        bus = await Bus.connect(settings.nats_url, name="fake-master")
        cards = cards_for_tests()
        master = FakeMaster(bus, node_id, cards)
        events = ready_cluster(
            node_id, cards[BUNDLED_MODEL_ID], InstanceId("inst-a"), RunnerId("runner-a")
        )
        try:
            await master.start(events)
            async with asyncio.timeout(20):
                while True:  # the replica catches up with the log just written
                    ready = await health(http)
                    if ready.status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            assert ready.json()["master_node_id"] == node_id
            models = (await http.get("/v1/models")).json()["data"]
            assert any(model["id"] == BUNDLED_MODEL_ID and model["ready"] for model in models)
        finally:
            api.cancel()
            with pytest.raises(asyncio.CancelledError):
                await api
            await master.stop()
            await bus.close()
    # The listener is closed: the port can be bound again (SO_REUSEADDR, as the API does,
    # because the closed connections linger in TIME_WAIT).
    bind_socket(settings.api_host, settings.api_port).close()


async def test_a_taken_port_is_reported(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    with socket.socket() as taken:
        taken.bind((settings.api_host, settings.api_port))
        taken.listen()
        with pytest.raises(ApiStartupError, match=str(settings.api_port)):
            await run_api(settings)
