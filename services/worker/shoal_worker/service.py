"""The worker process: telemetry, model files, and the runners of this node's shards."""

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final, final

from shoal_shared.bus import Bus
from shoal_shared.events import IndexedEvent, ModelAdded, NodeTelemetryUpdated
from shoal_shared.follower import StateFollower
from shoal_shared.ids import ModelId, NodeId, RunnerId
from shoal_shared.instances import Instance
from shoal_shared.model_card import ModelCard, all_cards
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings
from shoal_shared.state import State
from shoal_shared.telemetry import NodeTelemetry

from shoal_worker.downloads.hub import HubAccess
from shoal_worker.downloads.local_models import imported_cards
from shoal_worker.downloads.manager import DownloadFailedError, DownloadManager
from shoal_worker.downloads.store import ModelStore
from shoal_worker.event_sink import LocalEventSink
from shoal_worker.models.default_model import DEFAULT_MODEL_ID, ensure_default_model
from shoal_worker.plan import CancelTaskOnRunner, DispatchTask, StartRunner, StopRunner, plan
from shoal_worker.runner_supervisor import ModelUnavailableError, SupervisedRunner
from shoal_worker.telemetry import read_telemetry, worth_reporting

logger = logging.getLogger(__name__)

TELEMETRY_INTERVAL_SECONDS: Final = 5.0
TELEMETRY_HEARTBEAT_SECONDS: Final = 60.0


def peers_beyond_loopback(settings: NodeSettings) -> bool:
    """Whether ring peers reach this node over a LAN; all-loopback `--peers` means one host."""
    hosts = [peer.rsplit(":", 1)[0] for peer in settings.peers.split(",") if peer.strip()]
    return not hosts or any(
        host not in ("localhost", "::1") and not host.startswith("127.") for host in hosts
    )


@final
class Worker:
    def __init__(
        self,
        bus: Bus,
        node_id: NodeId,
        settings: NodeSettings,
        follower: StateFollower,
        events: LocalEventSink,
    ) -> None:
        self._bus = bus
        self._node_id = node_id
        self._settings = settings
        self._follower = follower
        self._events = events
        self._runners: dict[RunnerId, SupervisedRunner] = {}
        self._dirty = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._announced_term = 0
        self._telemetry_due = asyncio.Event()
        self._hub_access = HubAccess.from_environment(settings.offline)
        self._store = ModelStore(
            settings.models_dir, settings.read_only_model_dirs, self._hub_access
        )
        self._imported: dict[ModelId, ModelCard] = {}
        self._downloads = DownloadManager(
            bus, node_id, self._store, events.emit, self._cards, self._model_in_use
        )

    def _cards(self) -> dict[ModelId, ModelCard]:
        return {**all_cards(self._follower.state.added_models), **self._imported}

    def _model_in_use(self, model_id: ModelId) -> bool:
        return any(runner.instance.model_id == model_id for runner in self._runners.values())

    async def run(self) -> None:
        self._follower.add_listener(self._on_state_change)
        await self._refresh_imports()
        await self._downloads.start()
        self._dirty.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._report_telemetry())
                group.create_task(self._reconcile_forever())
        finally:
            await self._downloads.stop()
            for runner in list(self._runners.values()):
                await runner.stop()

    def _on_state_change(self, state: State, _event: IndexedEvent | None) -> None:
        if state.term != self._announced_term:
            # A new master (or a new term of this one): re-announce telemetry and runners,
            # so that its state is current even if it missed something while it took over.
            self._announced_term = state.term
            self._telemetry_due.set()
            for runner in self._runners.values():
                runner.reannounce()
            for card in self._imported.values():
                self._events.emit(ModelAdded(card=card))
            self._downloads.reannounce()
        self._dirty.set()

    async def _report_telemetry(self) -> None:
        loop = asyncio.get_running_loop()
        reported: NodeTelemetry | None = None
        reported_at = 0.0
        while True:
            current = await asyncio.to_thread(
                read_telemetry,
                peers_beyond_loopback(self._settings),
                self._settings.models_dir,
                not self._hub_access.offline,
            )
            stale = loop.time() - reported_at > TELEMETRY_HEARTBEAT_SECONDS
            if stale or self._telemetry_due.is_set() or worth_reporting(reported, current):
                self._telemetry_due.clear()
                self._events.emit(NodeTelemetryUpdated(node_id=self._node_id, telemetry=current))
                reported, reported_at = current, loop.time()
            await self._refresh_imports()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._telemetry_due.wait(), TELEMETRY_INTERVAL_SECONDS)

    async def _refresh_imports(self) -> None:
        """Pick up models `shoal models import` converted on this node, also while running."""
        found = await asyncio.to_thread(imported_cards, self._settings.models_dir)
        for model_id, (card, _directory) in found.items():
            if self._imported.get(model_id) != card:
                self._imported[model_id] = card
                self._events.emit(ModelAdded(card=card))
                await self._downloads.announce(card)

    async def _reconcile_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._reconcile(self._follower.state)

    async def _reconcile(self, state: State) -> None:
        local = {runner_id: runner.view for runner_id, runner in self._runners.items()}
        for action in plan(state, self._node_id, local):
            match action:
                case StartRunner():
                    runner = SupervisedRunner(
                        self._bus,
                        self._node_id,
                        action.instance,
                        action.shard,
                        self._resolve_model,
                        self._events,
                        self._dirty.set,
                    )
                    self._runners[action.shard.runner_id] = runner
                    runner.start()
                    logger.info(
                        "starting runner %s for %s",
                        action.shard.runner_id,
                        action.instance.model_id,
                    )
                case StopRunner():
                    runner = self._runners.pop(action.runner_id)
                    logger.info("stopping runner %s", action.runner_id)
                    await runner.stop()
                case DispatchTask():
                    await self._runners[action.runner_id].dispatch(action.task)
                case CancelTaskOnRunner():
                    await self._runners[action.runner_id].cancel(action.task_id)

    async def _resolve_model(self, instance: Instance) -> Path:
        """The model directory for this node's shard, downloading what it lacks first."""
        if instance.model_id == DEFAULT_MODEL_ID:
            # One conversion at a time: two runners of the bundled model must not race.
            async with self._model_lock:
                return await asyncio.to_thread(ensure_default_model, self._settings.models_dir)
        card = self._cards().get(instance.model_id)
        shard = instance.shard_on(self._node_id)
        if card is None or shard is None:
            raise ModelUnavailableError(f"model {instance.model_id} is unknown on {self._node_id}")
        try:
            local = await self._downloads.ensure(card, shard.start_layer, shard.end_layer)
        except DownloadFailedError as error:
            raise ModelUnavailableError(str(error)) from error
        return local.path


async def run_worker(settings: NodeSettings) -> None:
    node_id = load_or_create_node_id(settings.home)
    bus = await Bus.connect(settings.nats_url, name=f"worker-{node_id}")
    events = LocalEventSink(bus, node_id)
    events.start()
    follower = StateFollower(bus, node_id)
    await follower.start()
    try:
        await Worker(bus, node_id, settings, follower, events).run()
    finally:
        await events.stop()
        await follower.stop()
        with contextlib.suppress(Exception):
            await bus.close()
