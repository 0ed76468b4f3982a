from functools import reduce

import pytest
from shoal_shared.apply import EventOutOfOrderError, StaleTermError, apply
from shoal_shared.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    LocalOrigin,
    MasterElected,
    NodeTelemetryUpdated,
    RunnerStatusChanged,
    TaskCancelRequested,
    TaskCreated,
    TaskFinished,
)
from shoal_shared.ids import InstanceId, RunnerId, TaskId
from shoal_shared.runner_status import RunnerFailed, RunnerLoading, RunnerReady, RunnerShutDown
from shoal_shared.state import State
from shoal_shared.testing import INSTANCE, NODE_A, RUNNER, chat_task, indexed, instance, telemetry


def fold(events: list[Event], term: int = 1) -> State:
    return reduce(
        apply, [indexed(index, event, term) for index, event in enumerate(events)], State()
    )


def ready(runner_id: RunnerId = RUNNER, instance_id: InstanceId = INSTANCE) -> Event:
    return RunnerStatusChanged(
        runner_id=runner_id, instance_id=instance_id, node_id=NODE_A, status=RunnerReady()
    )


def test_master_elected_sets_master_and_term() -> None:
    state = apply(State(), indexed(0, MasterElected(master_node_id=NODE_A, term=3), term=3))
    assert state.master_node_id == NODE_A
    assert state.term == 3
    assert state.last_index == 0


def test_events_must_come_in_index_order() -> None:
    state = fold([MasterElected(master_node_id=NODE_A, term=1)])
    with pytest.raises(EventOutOfOrderError):
        apply(state, indexed(5, NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry())))
    with pytest.raises(EventOutOfOrderError):
        apply(state, indexed(0, NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry())))


def test_event_of_an_older_term_is_rejected() -> None:
    state = fold([MasterElected(master_node_id=NODE_A, term=2)], term=2)
    stale = indexed(1, NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry()), term=1)
    with pytest.raises(StaleTermError):
        apply(state, stale)


def test_telemetry_replaces_the_node_entry() -> None:
    state = fold(
        [
            NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry(available_gb=8)),
            NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry(available_gb=4)),
        ]
    )
    assert state.nodes[NODE_A].telemetry.memory_available_bytes == 4_000_000_000


def test_runner_status_follows_the_instance() -> None:
    state = fold([InstanceCreated(instance=instance()), ready()])
    assert isinstance(state.runners[RUNNER].status, RunnerReady)
    loading = RunnerStatusChanged(
        runner_id=RUNNER,
        instance_id=INSTANCE,
        node_id=NODE_A,
        status=RunnerLoading(layers_loaded=3, layers_total=30),
    )
    state = apply(state, indexed(2, loading))
    assert state.runners[RUNNER].status == RunnerLoading(layers_loaded=3, layers_total=30)


def test_deleting_an_instance_removes_its_runners_and_tasks() -> None:
    task = chat_task()
    state = fold(
        [
            InstanceCreated(instance=instance()),
            ready(),
            TaskCreated(task=task),
            TaskCancelRequested(task_id=task.task_id),
            InstanceDeleted(instance_id=INSTANCE),
        ]
    )
    assert state.instances == {}
    assert state.runners == {}
    assert state.tasks == {}
    assert state.cancelling == frozenset()


def test_a_late_runner_report_does_not_resurrect_a_deleted_instance() -> None:
    state = fold(
        [
            InstanceCreated(instance=instance()),
            InstanceDeleted(instance_id=INSTANCE),
            ready(),
            RunnerStatusChanged(
                runner_id=RUNNER,
                instance_id=INSTANCE,
                node_id=NODE_A,
                status=RunnerFailed(reason="late"),
            ),
        ]
    )
    assert state.runners == {}
    assert state.instances == {}


def test_a_runner_that_shut_down_leaves_state() -> None:
    shut_down = RunnerStatusChanged(
        runner_id=RUNNER, instance_id=INSTANCE, node_id=NODE_A, status=RunnerShutDown()
    )
    state = fold([InstanceCreated(instance=instance()), ready(), shut_down])
    assert state.runners == {}


def test_tasks_leave_state_when_finished() -> None:
    task = chat_task()
    created = fold([InstanceCreated(instance=instance()), ready(), TaskCreated(task=task)])
    assert task.task_id in created.tasks
    cancelling = apply(created, indexed(3, TaskCancelRequested(task_id=task.task_id)))
    assert cancelling.cancelling == {task.task_id}
    finished = apply(
        cancelling, indexed(4, TaskFinished(task_id=task.task_id, outcome="cancelled"))
    )
    assert finished.tasks == {}
    assert finished.cancelling == frozenset()


def test_tasks_for_unknown_instances_and_cancels_of_unknown_tasks_are_ignored() -> None:
    state = fold(
        [
            TaskCreated(task=chat_task(instance_id=InstanceId("inst-gone"))),
            TaskCancelRequested(task_id=TaskId("task-unknown")),
        ]
    )
    assert state.tasks == {}
    assert state.cancelling == frozenset()


def test_local_origin_is_recorded_per_node() -> None:
    event = NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry())
    state = apply(State(), indexed(0, event, origin=LocalOrigin(node_id=NODE_A, sequence=12)))
    assert state.local_sequences == {NODE_A: 12}


def test_apply_does_not_modify_its_input() -> None:
    before = fold([InstanceCreated(instance=instance())])
    snapshot = before.model_dump_json()
    apply(before, indexed(1, ready()))
    assert before.model_dump_json() == snapshot


def test_state_survives_a_json_round_trip() -> None:
    task = chat_task()
    state = fold(
        [
            MasterElected(master_node_id=NODE_A, term=1),
            NodeTelemetryUpdated(node_id=NODE_A, telemetry=telemetry()),
            InstanceCreated(instance=instance()),
            ready(),
            TaskCreated(task=task),
            TaskCancelRequested(task_id=task.task_id),
        ]
    )
    assert State.model_validate_json(state.model_dump_json()) == state


def test_indexed_event_round_trips_through_json() -> None:
    original = IndexedEvent(
        index=4,
        term=2,
        event=TaskCreated(task=chat_task()),
        origin=LocalOrigin(node_id=NODE_A, sequence=9),
    )
    assert IndexedEvent.model_validate_json(original.model_dump_json()) == original
