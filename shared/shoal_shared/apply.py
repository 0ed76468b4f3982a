"""The pure fold: `apply(state, indexed_event) -> state`. No I/O, no clocks, no randomness."""

from collections.abc import Mapping
from typing import TypeVar, assert_never

from shoal_shared.downloads import Download, DownloadFailed, DownloadOngoing, DownloadPending
from shoal_shared.events import (
    DownloadRemoved,
    DownloadUpdated,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    ModelAdded,
    NodeDiscovered,
    NodeLost,
    NodeTelemetryUpdated,
    RunnerStatusChanged,
    TaskCancelRequested,
    TaskCreated,
    TaskFinished,
)
from shoal_shared.ids import ModelId, NodeId
from shoal_shared.runner_status import RunnerShutDown
from shoal_shared.state import NodeInfo, RunnerInfo, State


class EventOutOfOrderError(ValueError):
    """The event is not the one that follows the state's last index."""


class StaleTermError(ValueError):
    """The event belongs to a term older than the state's: a deposed master wrote it."""


_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


def _without(mapping: Mapping[_Key, _Value], key: _Key) -> dict[_Key, _Value]:
    return {existing: value for existing, value in mapping.items() if existing != key}


def _interrupted(download: Download) -> Download:
    """A download of a node that left cannot be going on: say so, keep finished records (the
    files are still on its disk when it comes back)."""
    if isinstance(download.status, DownloadOngoing | DownloadPending):
        reason = f"node {download.node_id} left the cluster during the download"
        return download.model_copy(update={"status": DownloadFailed(reason=reason)})
    return download


def _downloads_after_loss(state: State, node_id: NodeId) -> dict[NodeId, dict[ModelId, Download]]:
    lost = state.downloads.get(node_id)
    if lost is None:
        return state.downloads
    return {
        **state.downloads,
        node_id: {model_id: _interrupted(download) for model_id, download in lost.items()},
    }


def apply(state: State, indexed: IndexedEvent) -> State:
    if indexed.index != state.last_index + 1:
        raise EventOutOfOrderError(
            f"expected event index {state.last_index + 1}, got {indexed.index}"
        )
    if indexed.term < state.term:
        raise StaleTermError(f"event of term {indexed.term} after term {state.term}")
    folded = _apply_event(state, indexed)
    update: dict[str, object] = {"last_index": indexed.index, "term": indexed.term}
    if indexed.origin is not None:
        update["local_sequences"] = {
            **folded.local_sequences,
            indexed.origin.node_id: indexed.origin.sequence,
        }
    return folded.model_copy(update=update)


def _apply_event(state: State, indexed: IndexedEvent) -> State:
    event = indexed.event
    match event:
        case MasterElected():
            return state.model_copy(update={"master_node_id": event.master_node_id})
        case NodeDiscovered():
            return state.model_copy(update={"members": state.members | {event.node_id}})
        case NodeLost():
            return state.model_copy(
                update={
                    "members": state.members - {event.node_id},
                    "nodes": _without(state.nodes, event.node_id),
                    "downloads": _downloads_after_loss(state, event.node_id),
                    "runners": {
                        runner_id: runner
                        for runner_id, runner in state.runners.items()
                        if runner.node_id != event.node_id
                    },
                }
            )
        case NodeTelemetryUpdated():
            node = NodeInfo(node_id=event.node_id, telemetry=event.telemetry)
            return state.model_copy(update={"nodes": {**state.nodes, event.node_id: node}})
        case InstanceCreated():
            instance = event.instance
            return state.model_copy(
                update={"instances": {**state.instances, instance.instance_id: instance}}
            )
        case InstanceDeleted():
            return state.model_copy(
                update={
                    "instances": _without(state.instances, event.instance_id),
                    "runners": {
                        runner_id: runner
                        for runner_id, runner in state.runners.items()
                        if runner.instance_id != event.instance_id
                    },
                    "tasks": {
                        task_id: task
                        for task_id, task in state.tasks.items()
                        if task.instance_id != event.instance_id
                    },
                    "cancelling": frozenset(
                        task_id
                        for task_id in state.cancelling
                        if (task := state.tasks.get(task_id)) is not None
                        and task.instance_id != event.instance_id
                    ),
                }
            )
        case RunnerStatusChanged():
            # A late report from a runner of a deleted instance must not resurrect it, and a
            # runner that shut down is gone from state: state does not grow without bound.
            if event.instance_id not in state.instances or isinstance(event.status, RunnerShutDown):
                return state.model_copy(
                    update={"runners": _without(state.runners, event.runner_id)}
                )
            runner = RunnerInfo(
                runner_id=event.runner_id,
                instance_id=event.instance_id,
                node_id=event.node_id,
                status=event.status,
            )
            return state.model_copy(update={"runners": {**state.runners, event.runner_id: runner}})
        case TaskCreated():
            if event.task.instance_id not in state.instances:
                return state
            return state.model_copy(
                update={"tasks": {**state.tasks, event.task.task_id: event.task}}
            )
        case TaskCancelRequested():
            if event.task_id not in state.tasks:
                return state
            return state.model_copy(update={"cancelling": state.cancelling | {event.task_id}})
        case TaskFinished():
            return state.model_copy(
                update={
                    "tasks": _without(state.tasks, event.task_id),
                    "cancelling": state.cancelling - {event.task_id},
                }
            )
        case DownloadUpdated():
            download = event.download
            of_node = {**state.downloads.get(download.node_id, {}), download.model_id: download}
            return state.model_copy(
                update={"downloads": {**state.downloads, download.node_id: of_node}}
            )
        case DownloadRemoved():
            remaining = _without(state.downloads.get(event.node_id, {}), event.model_id)
            downloads = (
                {**state.downloads, event.node_id: remaining}
                if remaining
                else _without(state.downloads, event.node_id)
            )
            return state.model_copy(update={"downloads": downloads})
        case ModelAdded():
            card = event.card
            return state.model_copy(
                update={"added_models": {**state.added_models, card.model_id: card}}
            )
        case _:
            assert_never(event)
