"""The worker's plan: which runners this node should have, and what to tell them. Pure."""

from collections.abc import Mapping, Set

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.state import State
from shoal_shared.tasks import Task


class StartRunner(FrozenModel):
    instance: Instance
    shard: ShardAssignment


class StopRunner(FrozenModel):
    runner_id: RunnerId


class DispatchTask(FrozenModel):
    runner_id: RunnerId
    task: Task


class CancelTaskOnRunner(FrozenModel):
    runner_id: RunnerId
    task_id: TaskId


Action = StartRunner | StopRunner | DispatchTask | CancelTaskOnRunner


class LocalRunner(FrozenModel):
    """What the worker knows of a runner it supervises."""

    runner_id: RunnerId
    instance_id: InstanceId
    dispatched: frozenset[TaskId]
    cancelled: frozenset[TaskId]


def plan(
    state: State,
    node_id: NodeId,
    local_runners: Mapping[RunnerId, LocalRunner],
    finished: Set[TaskId] = frozenset(),
) -> tuple[Action, ...]:
    """`finished`: tasks this worker already finished whose end the log has not shown yet."""
    wanted = {
        shard.runner_id: (instance, shard)
        for instance in state.instances.values()
        if (shard := instance.shard_on(node_id)) is not None
    }
    actions: list[Action] = [
        StopRunner(runner_id=runner_id) for runner_id in local_runners if runner_id not in wanted
    ]
    for runner_id, (instance, shard) in wanted.items():
        local = local_runners.get(runner_id)
        if local is None:
            actions.append(StartRunner(instance=instance, shard=shard))
            continue
        for task in state.tasks.values():
            if task.instance_id != instance.instance_id or task.task_id in finished:
                continue
            if task.task_id not in local.dispatched:
                actions.append(DispatchTask(runner_id=runner_id, task=task))
            elif task.task_id in state.cancelling and task.task_id not in local.cancelled:
                actions.append(CancelTaskOnRunner(runner_id=runner_id, task_id=task.task_id))
    return tuple(actions)
