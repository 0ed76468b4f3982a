"""What the active master does with a command: pure, given state and fresh ids.

Returns the events to append and the reply to send; the caller does the I/O.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import assert_never

from shoal_shared.commands import (
    CancelTask,
    Command,
    CommandAccepted,
    CommandRejected,
    CommandReply,
    DeleteInstance,
    PlaceInstance,
    RejectionCode,
    SubmitTask,
)
from shoal_shared.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    NodeDiscovered,
    NodeLost,
    TaskCancelRequested,
    TaskCreated,
)
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId
from shoal_shared.instances import Instance
from shoal_shared.model_card import ModelCard
from shoal_shared.runner_status import accepts_tasks
from shoal_shared.state import State

from shoal_master.placement import Layout, choose_layout, instance_from_layout, ring_addresses


class Decision(FrozenModel):
    events: tuple[Event, ...]
    reply: CommandReply


class FreshIds(FrozenModel):
    """Ids a decision may hand out; drawn by the caller so that deciding stays pure."""

    instance_id: InstanceId
    runner_ids: tuple[RunnerId, ...]


def _rejected(command: Command, code: RejectionCode, reason: str) -> Decision:
    return Decision(
        events=(),
        reply=CommandRejected(command_id=command.command_id, code=code, reason=reason),
    )


def _accepted(command: Command, events: Sequence[Event], created_id: str | None = None) -> Decision:
    return Decision(
        events=tuple(events),
        reply=CommandAccepted(command_id=command.command_id, created_id=created_id),
    )


def instance_is_ready(state: State, instance_id: InstanceId) -> bool:
    instance = state.instances.get(instance_id)
    if instance is None:
        return False
    statuses = [state.runners.get(shard.runner_id) for shard in instance.shards]
    return all(runner is not None and accepts_tasks(runner.status) for runner in statuses)


def decide(
    state: State,
    command: Command,
    cards: Mapping[ModelId, ModelCard],
    fresh: FreshIds,
) -> Decision:
    match command:
        case PlaceInstance():
            card = cards.get(command.model_id) or state.added_models.get(command.model_id)
            if card is None:
                return _rejected(command, "not_found", f"unknown model {command.model_id!r}")
            layout = choose_layout(
                card,
                state.nodes,
                command.sharding,
                command.node_ids,
                command.node_count,
                state.downloads,
            )
            if not isinstance(layout, Layout):
                return _rejected(
                    command, "invalid", f"cannot place {card.model_id}: {layout.reason}"
                )
            addresses = ring_addresses(layout, state.nodes, state.instances.values())
            instance = instance_from_layout(
                layout, card, fresh.instance_id, fresh.runner_ids, addresses
            )
            return _accepted(command, [InstanceCreated(instance=instance)], instance.instance_id)
        case DeleteInstance():
            if command.instance_id not in state.instances:
                return _rejected(command, "not_found", f"no instance {command.instance_id!r}")
            return _accepted(command, [InstanceDeleted(instance_id=command.instance_id)])
        case SubmitTask():
            task = command.task
            if task.task_id in state.tasks:
                return _accepted(command, [], task.task_id)
            if task.instance_id not in state.instances:
                return _rejected(command, "not_found", f"no instance {task.instance_id!r}")
            if not instance_is_ready(state, task.instance_id):
                return _rejected(
                    command, "unavailable", f"instance {task.instance_id} is not ready yet"
                )
            return _accepted(command, [TaskCreated(task=task)], task.task_id)
        case CancelTask():
            if command.task_id not in state.tasks:
                # Already finished (or never existed): nothing left to cancel.
                return _accepted(command, [])
            return _accepted(command, [TaskCancelRequested(task_id=command.task_id)])
        case _:
            assert_never(command)


def instances_touching(state: State, node_id: NodeId) -> tuple[Instance, ...]:
    """Instances with a shard on the node: they cannot run without it and are placed again."""
    return tuple(
        instance
        for instance in state.instances.values()
        if any(shard.node_id == node_id for shard in instance.shards)
    )


def membership_changes(
    state: State, own_node_id: NodeId, live_peers: Iterable[NodeId]
) -> tuple[Event, ...]:
    """Events that bring state's members in line with what the election hears."""
    live = {own_node_id, *live_peers}
    known = state.members | set(state.nodes)
    discovered = [NodeDiscovered(node_id=node_id) for node_id in sorted(live - state.members)]
    lost = [NodeLost(node_id=node_id) for node_id in sorted(known - live)]
    return (*discovered, *lost)
