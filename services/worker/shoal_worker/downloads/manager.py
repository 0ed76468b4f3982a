"""The worker's downloads: one job at a time per model, progress as events (at most about
one per second), and the `shoal.downloads.<node>` commands."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Final, final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import TypeAdapter, ValidationError
from shoal_shared import subjects
from shoal_shared.bus import Bus
from shoal_shared.download_commands import (
    AddModel,
    CancelDownload,
    DeleteDownload,
    DownloadCommand,
    DownloadCommandAccepted,
    DownloadCommandRejected,
    StartDownload,
)
from shoal_shared.downloads import (
    Download,
    DownloadCompleted,
    DownloadFailed,
    DownloadPending,
    DownloadStatus,
)
from shoal_shared.events import DownloadRemoved, DownloadUpdated, Event, ModelAdded
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.model_card import ModelCard

from shoal_worker.downloads.added_model import card_from_hub
from shoal_worker.downloads.daemon_thread import in_daemon_thread
from shoal_worker.downloads.hub import DownloadCancelledError, HubError
from shoal_worker.downloads.progress import DownloadProgress
from shoal_worker.downloads.store import LocalModel, ModelStore

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS: Final = 1.0
_COMMANDS: Final[TypeAdapter[DownloadCommand]] = TypeAdapter(DownloadCommand)


class DownloadFailedError(RuntimeError):
    """A model's files could not be had; the message says why and what to do."""


@final
class _Job:
    def __init__(self, start_layer: int, end_layer: int) -> None:
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.cancelled = threading.Event()
        self.progress = DownloadProgress()


@final
class DownloadManager:
    def __init__(
        self,
        bus: Bus,
        node_id: NodeId,
        store: ModelStore,
        emit: Callable[[Event], None],
        cards: Callable[[], Mapping[ModelId, ModelCard]],
        in_use: Callable[[ModelId], bool],
    ) -> None:
        self._bus = bus
        self._node_id = node_id
        self._store = store
        self._emit = emit
        self._cards = cards
        self._in_use = in_use
        self._locks: dict[ModelId, asyncio.Lock] = {}
        self._jobs: dict[ModelId, _Job] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._subscription: Subscription | None = None
        # What this node last said about each model, re-sent to a new master.
        self._announced: dict[ModelId, Download] = {}

    async def start(self) -> None:
        self._subscription = await self._bus.subscribe(
            subjects.downloads(self._node_id), self._on_message
        )
        await self.announce_local_models()

    async def stop(self) -> None:
        for job in self._jobs.values():
            job.cancelled.set()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        for task in list(self._background):
            task.cancel()

    def reannounce(self) -> None:
        for download in self._announced.values():
            self._emit(DownloadUpdated(download=download))

    async def announce_local_models(self) -> None:
        """Say which models this node already has (found at start, with no network)."""
        for card in list(self._cards().values()):
            await self.announce(card)

    async def announce(self, card: ModelCard) -> None:
        """Say what this node has of one model."""
        if card.source == "bundled":
            return
        local = await asyncio.to_thread(self._store.scan, card)
        if local is not None:
            self._report(card, local.start_layer, local.end_layer, _completed(local))

    def _report(
        self, card: ModelCard, start_layer: int, end_layer: int, status: DownloadStatus
    ) -> None:
        download = Download(
            node_id=self._node_id,
            model_id=card.model_id,
            start_layer=start_layer,
            end_layer=end_layer,
            layer_count=card.layers,
            status=status,
        )
        self._announced[card.model_id] = download
        self._emit(DownloadUpdated(download=download))

    async def ensure(self, card: ModelCard, start_layer: int, end_layer: int) -> LocalModel:
        """The files of layers [start_layer, end_layer), downloading what is missing."""
        lock = self._locks.setdefault(card.model_id, asyncio.Lock())
        async with lock:
            found = await asyncio.to_thread(self._store.find_local, card, start_layer, end_layer)
            if found is not None:
                announced = self._announced.get(card.model_id)
                if announced is None or not announced.covers(start_layer, end_layer):
                    self._report(card, found.start_layer, found.end_layer, _completed(found))
                return found
            return await self._download(card, start_layer, end_layer)

    async def _download(self, card: ModelCard, start_layer: int, end_layer: int) -> LocalModel:
        job = _Job(start_layer, end_layer)
        self._jobs[card.model_id] = job
        self._report(card, start_layer, end_layer, DownloadPending())
        ticker = asyncio.create_task(self._tick(card, job))
        try:
            local = await in_daemon_thread(
                self._store.ensure, card, start_layer, end_layer, job.progress, job.cancelled
            )
        except DownloadCancelledError:
            self._report(card, start_layer, end_layer, DownloadFailed(reason="cancelled"))
            raise DownloadFailedError(f"the download of {card.model_id} was cancelled") from None
        except (HubError, OSError) as error:
            self._report(card, start_layer, end_layer, DownloadFailed(reason=str(error)))
            raise DownloadFailedError(str(error)) from error
        finally:
            # A task cancelled mid-download (the worker stopping) leaves its thread running:
            # this tells the thread to give up at its next chunk.
            job.cancelled.set()
            ticker.cancel()
            self._jobs.pop(card.model_id, None)
        logger.info(
            "%s layers %d-%d on disk: %d bytes fetched",
            card.model_id,
            start_layer,
            end_layer - 1,
            job.progress.fetched_bytes,
        )
        self._report(card, local.start_layer, local.end_layer, _completed(local))
        return local

    async def _tick(self, card: ModelCard, job: _Job) -> None:
        """An ongoing event at most every PROGRESS_INTERVAL_SECONDS, only when bytes moved."""
        last_done = -1
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
            snapshot = job.progress.snapshot()
            if snapshot.bytes_total and snapshot.bytes_done != last_done:
                last_done = snapshot.bytes_done
                self._report(card, job.start_layer, job.end_layer, snapshot)

    async def _on_message(self, message: Msg) -> None:
        try:
            command = _COMMANDS.validate_json(message.data)
        except ValidationError as error:
            first = error.errors()[0]
            reason = f"bad download command: {first['msg']} at {first['loc']}"
            await self._bus.reply(message, DownloadCommandRejected(code="invalid", reason=reason))
            return
        reply = await self.handle(command)
        await self._bus.reply(message, reply)

    async def handle(
        self, command: DownloadCommand
    ) -> DownloadCommandAccepted | DownloadCommandRejected:
        if isinstance(command, AddModel):
            return await self._add_model(command.model_id)
        card = self._cards().get(command.model_id)
        if card is None:
            return DownloadCommandRejected(
                code="not_found", reason=f"unknown model {command.model_id!r}"
            )
        match command:
            case StartDownload():
                return self._start(card, command)
            case CancelDownload():
                job = self._jobs.get(card.model_id)
                if job is None:
                    return DownloadCommandRejected(
                        code="not_found", reason=f"no download of {card.model_id} is running"
                    )
                job.cancelled.set()
                return DownloadCommandAccepted(detail=f"cancelling the download of {card.model_id}")
            case DeleteDownload():
                return await self._delete(card)

    def _start(
        self, card: ModelCard, command: StartDownload
    ) -> DownloadCommandAccepted | DownloadCommandRejected:
        if card.source == "bundled":
            return DownloadCommandAccepted(detail=f"{card.model_id} is bundled with Shoal")
        start_layer, end_layer = command.layer_range(card.layers)
        if not 0 <= start_layer < end_layer <= card.layers:
            return DownloadCommandRejected(
                code="invalid",
                reason=f"layers {start_layer}-{end_layer} do not fit {card.layers} layers",
            )
        if card.model_id in self._jobs:
            return DownloadCommandAccepted(detail=f"{card.model_id} is already downloading")
        task: asyncio.Task[object] = asyncio.create_task(
            self._background_download(card, start_layer, end_layer)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return DownloadCommandAccepted(
            detail=f"downloading layers {start_layer}-{end_layer - 1} of {card.model_id}"
        )

    async def _background_download(self, card: ModelCard, start_layer: int, end_layer: int) -> None:
        with contextlib.suppress(DownloadFailedError):
            await self.ensure(card, start_layer, end_layer)

    async def _delete(self, card: ModelCard) -> DownloadCommandAccepted | DownloadCommandRejected:
        if self._in_use(card.model_id):
            return DownloadCommandRejected(
                code="conflict",
                reason=f"{card.model_id} is loaded on this node: delete its instance first",
            )
        job = self._jobs.get(card.model_id)
        if job is not None:
            job.cancelled.set()
        lock = self._locks.setdefault(card.model_id, asyncio.Lock())
        async with lock:
            removed = await asyncio.to_thread(self._store.delete, card)
            remaining = await asyncio.to_thread(self._store.scan, card)
        if remaining is not None:
            # Only a read-only copy is left: the node still has the model, as before.
            self._report(card, remaining.start_layer, remaining.end_layer, _completed(remaining))
            if not removed:
                return DownloadCommandRejected(
                    code="conflict",
                    reason=f"{card.model_id} is in a read-only model directory "
                    f"({remaining.path}); Shoal never deletes there",
                )
            return DownloadCommandAccepted(
                detail=f"deleted this node's copy; a read-only copy remains at {remaining.path}"
            )
        self._announced.pop(card.model_id, None)
        self._emit(DownloadRemoved(node_id=self._node_id, model_id=card.model_id))
        if not removed:
            return DownloadCommandRejected(
                code="not_found", reason=f"{card.model_id} has no files on this node"
            )
        return DownloadCommandAccepted(detail=f"deleted {card.model_id} from this node")

    async def _add_model(
        self, model_id: ModelId
    ) -> DownloadCommandAccepted | DownloadCommandRejected:
        existing = self._cards().get(model_id)
        if existing is not None:
            return DownloadCommandAccepted(detail=f"{model_id} is already known", card=existing)
        try:
            card = await in_daemon_thread(card_from_hub, self._store.access, model_id)
        except HubError as error:
            return DownloadCommandRejected(code="invalid", reason=str(error))
        self._emit(ModelAdded(card=card))
        return DownloadCommandAccepted(detail=f"added {model_id}", card=card)


def _completed(local: LocalModel) -> DownloadCompleted:
    return DownloadCompleted(
        bytes_total=local.bytes_total, path=str(local.path), read_only=local.read_only
    )
