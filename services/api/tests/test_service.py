"""`run_api`: serves on the node's port, reports "starting" until the node has a master,
and stops promptly and cleanly when cancelled."""

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest
from shoal_api.service import GRACEFUL_SHUTDOWN_SECONDS, ApiStartupError, bind_socket, run_api
from shoal_api.testing import (
    BUNDLED_MODEL_ID,
    FakeMaster,
    cards_for_tests,
    node_settings,
    ready_cluster,
    token_chunks,
)
from shoal_shared.bus import Bus
from shoal_shared.chunks import Chunk
from shoal_shared.ids import InstanceId, NodeId, RunnerId
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings
from shoal_shared.tasks import ChatTask
from shoal_shared.testing import running_broker


async def health(http: httpx.AsyncClient) -> httpx.Response:
    """GET /healthz, waiting for the server to accept connections."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await http.get("/healthz")
            except httpx.ConnectError:
                await asyncio.sleep(0.05)


async def wait_until_ready(http: httpx.AsyncClient) -> httpx.Response:
    async with asyncio.timeout(20):
        while True:  # the replica catches up with the log the master wrote
            response = await health(http)
            if response.status_code == 200:
                return response
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def fake_master_of(
    settings: NodeSettings, node_id: NodeId
) -> AsyncGenerator[FakeMaster, None]:
    bus = await Bus.connect(settings.nats_url, name="fake-master")
    cards = cards_for_tests()
    master = FakeMaster(bus, node_id, cards)
    card = cards[BUNDLED_MODEL_ID]
    try:
        await master.start(ready_cluster(node_id, card, InstanceId("inst-a"), RunnerId("r-a")))
        yield master
    finally:
        await master.stop()
        await bus.close()


async def stop(api: asyncio.Task[None]) -> None:
    api.cancel()
    with pytest.raises(asyncio.CancelledError):
        await api


async def test_run_api_serves_until_cancelled(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    node_id = load_or_create_node_id(settings.home)
    url = f"http://{settings.api_host}:{settings.api_port}"
    async with running_broker(settings, node_id), httpx.AsyncClient(base_url=url) as http:
        api = asyncio.create_task(run_api(settings))
        try:
            starting = await health(http)
            # No election has answered yet: the API is up but says it is not ready.
            assert starting.status_code == 503
            assert starting.json()["status"] == "starting"
            async with fake_master_of(settings, node_id):
                ready = await wait_until_ready(http)
                assert ready.json()["master_node_id"] == node_id
                models = (await http.get("/v1/models")).json()["data"]
                assert any(m["id"] == BUNDLED_MODEL_ID and m["ready"] for m in models)
        finally:
            await stop(api)
    # The listener is closed: the port can be bound again (SO_REUSEADDR, as the API does,
    # because the closed connections linger in TIME_WAIT).
    bind_socket(settings.api_host, settings.api_port).close()


def stalling_script(task: ChatTask) -> list[Chunk]:
    return token_chunks(task, ["a"])


async def test_stopping_ends_open_streams_and_cancels_their_tasks(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    node_id = load_or_create_node_id(settings.home)
    url = f"http://{settings.api_host}:{settings.api_port}"
    body = {"model": BUNDLED_MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        running_broker(settings, node_id),
        fake_master_of(settings, node_id) as master,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        master.script = stalling_script
        api = asyncio.create_task(run_api(settings))
        try:
            await wait_until_ready(http)
            async with http.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                lines = r.aiter_lines()
                async for line in lines:
                    if '"content":"a"' in line:
                        break
                # Promptly: the stream is ended, not waited for until uvicorn gives up on it.
                async with asyncio.timeout(GRACEFUL_SHUTDOWN_SECONDS / 2):
                    await stop(api)
                rest = [line async for line in lines if line]
        finally:
            if not api.done():
                await stop(api)
        [last] = rest
        error = json.loads(last.removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down"
        [task] = master.submitted()
        assert await asyncio.wait_for(master.cancelled.get(), 5) == task.task_id


async def test_a_taken_port_is_reported(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    with socket.socket() as taken:
        taken.bind((settings.api_host, settings.api_port))
        taken.listen()
        with pytest.raises(ApiStartupError, match=str(settings.api_port)):
            await run_api(settings)
