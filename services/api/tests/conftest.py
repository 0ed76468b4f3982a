"""Fixtures: a real nats-server with a fake master, and the API served over real HTTP."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from shoal_api.app import create_app
from shoal_api.context import ApiContext, ApiTimeouts
from shoal_api.nats_cluster import NatsCluster
from shoal_api.testing import (
    BUNDLED_MODEL_ID,
    TEST_INSTANCE_ID,
    TEST_NODE_ID,
    TEST_RUNNER_ID,
    WORKER_START_SECONDS_IN_TESTS,
    FakeMaster,
    cards_for_tests,
    node_settings,
    ready_cluster,
    serving,
)
from shoal_shared.bus import Bus
from shoal_shared.follower import StateFollower
from shoal_shared.settings import NodeSettings
from shoal_shared.testing import running_broker

# Short, so that the timeout test is quick; long enough that a disconnect is noticed first.
CHUNK_TIMEOUT_SECONDS = 3.0


@pytest.fixture
def settings(tmp_path: Path) -> NodeSettings:
    return node_settings(tmp_path)


@pytest.fixture
async def fake_master(settings: NodeSettings) -> AsyncIterator[FakeMaster]:
    cards = cards_for_tests()
    async with running_broker(settings, TEST_NODE_ID):
        bus = await Bus.connect(settings.nats_url, name="fake-master", deadline_seconds=20)
        master = FakeMaster(bus, TEST_NODE_ID, cards)
        try:
            card = cards[BUNDLED_MODEL_ID]
            await master.start(ready_cluster(TEST_NODE_ID, card, TEST_INSTANCE_ID, TEST_RUNNER_ID))
            yield master
        finally:
            await master.stop()
            await bus.close()


@pytest.fixture
async def api_context(settings: NodeSettings, fake_master: FakeMaster) -> AsyncIterator[ApiContext]:
    bus = await Bus.connect(settings.nats_url, name="api-under-test")
    follower = StateFollower(bus, TEST_NODE_ID)
    context = ApiContext(
        NatsCluster(bus, follower, TEST_NODE_ID, WORKER_START_SECONDS_IN_TESTS),
        cards_for_tests(),
        ApiTimeouts(command_seconds=1, chunk_seconds=CHUNK_TIMEOUT_SECONDS),
    )
    try:
        await follower.start()
        last_index = fake_master.state.last_index
        await follower.wait_for(lambda state: state.last_index >= last_index, timeout=10)
        yield context
    finally:
        await follower.stop()
        await context.background.drain(5)
        await bus.close()


@pytest.fixture
async def api_url(api_context: ApiContext) -> AsyncIterator[str]:
    def end_open_streams() -> None:
        api_context.abort_sessions("the test API is stopping")

    async with serving(create_app(api_context), on_stop=end_open_streams) as url:
        yield url


@pytest.fixture
async def http(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_url, timeout=15) as client:
        yield client


@pytest.fixture
async def client(api_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=15
    ) as client:
        yield client
