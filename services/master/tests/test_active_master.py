"""The active master against a real nats-server: it indexes, answers, and refuses stale terms."""

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_master.active import ActiveMaster
from shoal_master.log_store import GlobalLogStore
from shoal_shared.apply import StaleTermError
from shoal_shared.bus import Bus
from shoal_shared.commands import DeleteInstance, PlaceInstance
from shoal_shared.ids import CommandId, InstanceId, NodeId
from shoal_shared.model_card import builtin_cards
from shoal_shared.settings import resolve_settings
from shoal_shared.state import State
from shoal_shared.testing import MODEL, running_broker

NODE = NodeId("node-test-master")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def no_peers() -> tuple[NodeId, ...]:
    return ()


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    settings = resolve_settings(
        {
            "home": tmp_path,
            "nats_port": free_port(),
            "leaf_port": free_port(),
            "bind_host": "127.0.0.1",
        },
        environment={},
    )
    async with running_broker(settings, NODE):
        connected = await Bus.connect(settings.nats_url, name="test", deadline_seconds=20)
        yield connected
        await connected.close()


def master(bus: Bus, term: int, state: State) -> ActiveMaster:
    return ActiveMaster(bus, NODE, term, state, builtin_cards(), None, no_peers)


async def test_a_master_with_an_old_term_cannot_append(bus: Bus) -> None:
    newer = master(bus, 2, State())
    await newer.start()
    await newer.stop()
    logged = await GlobalLogStore(bus, NODE).open()
    assert logged.term == 2

    stale = master(bus, 1, State())
    with pytest.raises(StaleTermError, match="older than the log's term 2"):
        await stale.start()
    await stale.stop()
    assert await GlobalLogStore(bus, NODE).open() == logged


async def test_a_new_term_continues_the_log(bus: Bus) -> None:
    first = master(bus, 1, State())
    await first.start()
    place = PlaceInstance(command_id=CommandId("c-1"), model_id=MODEL, node_ids=(NODE,))
    reply = await first.handle_command(place)
    assert reply.outcome == "rejected"  # no telemetry from this node yet: nothing to place on
    await first.stop()

    second = master(bus, 2, State())
    await second.start()
    assert second.state.term == 2
    missing = DeleteInstance(command_id=CommandId("c-2"), instance_id=InstanceId("inst-x"))
    assert (await second.handle_command(missing)).outcome == "rejected"
    await second.stop()
