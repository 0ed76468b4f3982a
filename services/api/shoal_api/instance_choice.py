"""Which instance serves a request, and, when none can, what the client is waiting for."""

from collections import Counter
from typing import assert_never

from shoal_shared.downloads import (
    DownloadCompleted,
    DownloadFailed,
    DownloadOngoing,
    DownloadPending,
)
from shoal_shared.ids import InstanceId, ModelId, NodeId
from shoal_shared.instances import Instance
from shoal_shared.runner_status import (
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutDown,
    RunnerStatus,
    RunnerWarmingUp,
    accepts_tasks,
)
from shoal_shared.state import State


def instances_of(state: State, model_id: ModelId) -> list[Instance]:
    return sorted(
        (instance for instance in state.instances.values() if instance.model_id == model_id),
        key=lambda instance: instance.instance_id,
    )


def instance_is_ready(state: State, instance: Instance) -> bool:
    """Ready when every shard's runner accepts tasks: one missing rank stalls the pipeline."""
    for shard in instance.shards:
        runner = state.runners.get(shard.runner_id)
        if runner is None or not accepts_tasks(runner.status):
            return False
    return True


def choose_instance(state: State, model_id: ModelId) -> InstanceId | None:
    """The ready instance of the model with the fewest tasks in flight, or None."""
    ready = [
        instance for instance in instances_of(state, model_id) if instance_is_ready(state, instance)
    ]
    if not ready:
        return None
    load = Counter(task.instance_id for task in state.tasks.values())
    chosen = min(ready, key=lambda instance: (load[instance.instance_id], instance.instance_id))
    return chosen.instance_id


def describe_status(status: RunnerStatus | None, node_id: NodeId) -> str:
    match status:
        case None:
            return f"waiting for its runner on node {node_id} to start"
        case RunnerIdle():
            return f"starting on node {node_id}"
        case RunnerConnecting():
            return f"connecting its runners on node {node_id}"
        case RunnerLoading():
            return (
                f"loading (layers {status.layers_loaded}/{status.layers_total}) on node {node_id}"
            )
        case RunnerLoaded():
            return f"loaded on node {node_id}, about to warm up"
        case RunnerWarmingUp():
            return f"warming up on node {node_id}"
        case RunnerReady():
            return f"ready on node {node_id}"
        case RunnerRunning():
            return f"running {status.active_tasks} task(s) on node {node_id}"
        case RunnerFailed():
            return f"failed on node {node_id}: {status.reason}"
        case RunnerShutDown():
            return f"shut down on node {node_id}"
        case _:
            assert_never(status)


def describe_download(state: State, instance: Instance, node_id: NodeId) -> str | None:
    """The shard's files on their way to the node, if that is what its runner waits for."""
    record = state.download(node_id, instance.model_id)
    if record is None:
        return None
    match record.status:
        case DownloadPending():
            return f"about to download its files on node {node_id}"
        case DownloadOngoing():
            status = record.status
            percent = 100 * status.bytes_done / status.bytes_total if status.bytes_total else 0.0
            eta = f", about {status.eta_seconds:.0f} s left" if status.eta_seconds else ""
            return f"downloading its files on node {node_id} ({percent:.0f}%{eta})"
        case DownloadFailed():
            return f"could not download its files on node {node_id}: {record.status.reason}"
        case DownloadCompleted():
            return None
        case _:
            assert_never(record.status)


def describe_instance(state: State, instance: Instance) -> str:
    """What keeps the instance from serving, shard by shard (ready shards are left out)."""
    waiting: list[str] = []
    for shard in sorted(instance.shards, key=lambda shard: shard.rank):
        runner = state.runners.get(shard.runner_id)
        if runner is None or not accepts_tasks(runner.status):
            downloading = describe_download(state, instance, shard.node_id)
            waiting.append(
                downloading
                or describe_status(None if runner is None else runner.status, shard.node_id)
            )
    return "; ".join(waiting) if waiting else "ready"


def not_placed_message(model_id: ModelId) -> str:
    return (
        f"no instance of model {model_id} is placed: "
        f'POST /instance with {{"model_id": "{model_id}"}} to place one'
    )


def not_ready_message(state: State, model_id: ModelId) -> str:
    instances = instances_of(state, model_id)
    if not instances:
        return not_placed_message(model_id)
    details = "; ".join(describe_instance(state, instance) for instance in instances)
    return f"model {model_id} is not ready yet: it is {details}"
