"""The active master against a real nats-server: it indexes, answers, and refuses stale terms."""

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_master.active import ActiveMaster
from shoal_master.log_store import SNAPSHOT_INTERVAL, GlobalLogStore
from shoal_shared.apply import StaleTermError
from shoal_shared.bus import Bus
from shoal_shared.commands import DeleteInstance, PlaceInstance
from shoal_shared.events import NodeTelemetryUpdated
from shoal_shared.follower import last_snapshot_sequence
from shoal_shared.ids import CommandId, InstanceId, NodeId
from shoal_shared.model_card import builtin_cards
from shoal_shared.settings import resolve_settings
from shoal_shared.state import State
from shoal_shared.streams import append_local_event
from shoal_shared.testing import MODEL, running_broker
from shoal_shared.testing import telemetry as sample_telemetry

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


async def test_snapshots_bound_what_a_reader_replays(bus: Bus) -> None:
    active = master(bus, 1, State())
    await active.start()
    telemetry = NodeTelemetryUpdated(node_id=NODE, telemetry=sample_telemetry())
    for _ in range(SNAPSHOT_INTERVAL + 20):
        await append_local_event(bus, NODE, telemetry)
    for _ in range(1200):  # the master indexes them within seconds
        if active.state.last_index >= SNAPSHOT_INTERVAL + 10:
            break
        await asyncio.sleep(0.05)
    await active.stop()
    # A reader starts at the newest snapshot, not at the stream's first message.
    start = await last_snapshot_sequence(bus, NODE)
    assert start > SNAPSHOT_INTERVAL
    assert await GlobalLogStore(bus, NODE).open() == active.state
