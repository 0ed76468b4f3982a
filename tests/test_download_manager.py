"""The worker's download manager: commands over NATS, progress events at most about once a
second, cancel and delete, against the Hugging Face stand-in."""

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import pytest
from pydantic import TypeAdapter
from shoal_api.testing import node_settings
from shoal_shared import subjects
from shoal_shared.bus import Bus
from shoal_shared.download_commands import (
    CancelDownload,
    DeleteDownload,
    DownloadCommandReply,
    StartDownload,
)
from shoal_shared.downloads import DownloadCompleted, DownloadFailed, DownloadOngoing
from shoal_shared.events import DownloadRemoved, DownloadUpdated, Event
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard
from shoal_shared.settings import NodeSettings
from shoal_shared.testing import running_broker
from shoal_worker.downloads.added_model import card_from_hub
from shoal_worker.downloads.hub import HubAccess
from shoal_worker.downloads.manager import DownloadManager
from shoal_worker.downloads.store import ModelStore

from .hf_standin import HubStandIn, StandardRepos

NODE = NodeId("node-downloads")
REPLIES: TypeAdapter[DownloadCommandReply] = TypeAdapter(DownloadCommandReply)
MIB = 1 << 20


@dataclass(frozen=True)
class Emitted:
    at: float
    event: Event


@pytest.fixture(autouse=True)
def hub_not_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def slow_hub(standin_repos: StandardRepos) -> Iterator[HubStandIn]:
    # About four seconds for half of the model: several progress ticks.
    with HubStandIn(standin_repos.root, bytes_per_second=16 * MIB) as hub:
        yield hub


@dataclass
class Setup:
    bus: Bus
    manager: DownloadManager
    emitted: list[Emitted]
    card: ModelCard


@pytest.fixture
async def setup(
    tmp_path: Path, slow_hub: HubStandIn, standin_repos: StandardRepos
) -> AsyncIterator[Setup]:
    settings: NodeSettings = node_settings(tmp_path)
    access = HubAccess(endpoint=slow_hub.url, token=None, offline=False)
    card = await asyncio.to_thread(card_from_hub, access, standin_repos.split)
    emitted: list[Emitted] = []
    async with running_broker(settings, NODE):
        bus = await Bus.connect(settings.nats_url, name="downloads-test", deadline_seconds=20)
        manager = DownloadManager(
            bus,
            NODE,
            ModelStore(settings.models_dir, (), access),
            lambda event: emitted.append(Emitted(time.monotonic(), event)),
            lambda: {card.model_id: card},
            lambda _model_id: False,
        )
        await manager.start()
        try:
            yield Setup(bus, manager, emitted, card)
        finally:
            await manager.stop()
            await bus.close()


async def send(setup: Setup, command: StartDownload | CancelDownload | DeleteDownload) -> object:
    return await setup.bus.request(subjects.downloads(NODE), command, REPLIES, timeout=10)


def updates(setup: Setup) -> list[tuple[float, DownloadUpdated]]:
    return [
        (item.at, item.event) for item in setup.emitted if isinstance(item.event, DownloadUpdated)
    ]


async def wait_for(description: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {description}"
        await asyncio.sleep(0.05)


async def test_a_download_reports_pending_then_ongoing_about_once_a_second_then_completed(
    setup: Setup,
) -> None:
    reply = await send(setup, StartDownload(model_id=setup.card.model_id, end_layer=15))
    assert getattr(reply, "outcome", None) == "accepted", reply
    await wait_for(
        "completion",
        lambda: any(isinstance(u.download.status, DownloadCompleted) for _, u in updates(setup)),
    )
    statuses = [update.download.status for _, update in updates(setup)]
    assert statuses[0].status == "pending"
    assert statuses[-1].status == "completed"
    ongoing = [
        (at, u) for at, u in updates(setup) if isinstance(u.download.status, DownloadOngoing)
    ]
    assert len(ongoing) >= 2
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(ongoing)]
    assert min(gaps) >= 0.9
    done = [
        u.download.status.bytes_done
        for _, u in ongoing
        if isinstance(u.download.status, DownloadOngoing)
    ]
    assert done == sorted(done)
    last = ongoing[-1][1].download.status
    assert isinstance(last, DownloadOngoing)
    assert last.files
    assert last.bytes_per_second > 0


async def test_cancel_then_delete(setup: Setup) -> None:
    model_id = setup.card.model_id
    nothing = await send(setup, CancelDownload(model_id=model_id))
    assert getattr(nothing, "code", None) == "not_found"
    await send(setup, StartDownload(model_id=model_id))
    await wait_for(
        "bytes to flow",
        lambda: any(isinstance(u.download.status, DownloadOngoing) for _, u in updates(setup)),
    )
    cancelled = await send(setup, CancelDownload(model_id=model_id))
    assert getattr(cancelled, "outcome", None) == "accepted"
    await wait_for(
        "the cancel to land",
        lambda: any(isinstance(u.download.status, DownloadFailed) for _, u in updates(setup)),
    )
    failed = updates(setup)[-1][1].download.status
    assert isinstance(failed, DownloadFailed)
    assert failed.reason == "cancelled"
    deleted = await send(setup, DeleteDownload(model_id=model_id))
    assert getattr(deleted, "outcome", None) == "accepted", deleted
    assert isinstance(setup.emitted[-1].event, DownloadRemoved)
    unknown = await send(setup, StartDownload(model_id=ModelId("org/unknown")))
    assert getattr(unknown, "code", None) == "not_found"
