from shoal_master.decisions import FreshIds, decide
from shoal_shared.commands import (
    CancelTask,
    CommandAccepted,
    CommandRejected,
    DeleteInstance,
    PlaceInstance,
    SubmitTask,
)
from shoal_shared.events import InstanceCreated, InstanceDeleted, TaskCancelRequested, TaskCreated
from shoal_shared.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.model_card import builtin_cards
from shoal_shared.runner_status import RunnerLoading, RunnerReady, RunnerStatus
from shoal_shared.state import NodeInfo, RunnerInfo, State
from shoal_shared.tasks import ChatMessage, ChatTask, SamplingParameters
from shoal_shared.telemetry import NodeTelemetry

CARDS = builtin_cards()
NODE = NodeId("node-a")
INSTANCE = InstanceId("inst-1")
RUNNER = RunnerId("runner-1")
FRESH = FreshIds(instance_id=InstanceId("inst-new"), runner_ids=(RunnerId("runner-new"),))
TASK = ChatTask(
    task_id=TaskId("task-1"),
    instance_id=INSTANCE,
    model_id=ModelId("smollm2-135m"),
    messages=(ChatMessage(role="user", content="hi"),),
    sampling=SamplingParameters(),
    requester_node_id=NODE,
)


def state_with(status: RunnerStatus | None = None) -> State:
    telemetry = NodeTelemetry(
        hostname="a",
        platform="Linux",
        chip="c",
        backend="cpu",
        cpu_cores=2,
        memory_total_bytes=int(16e9),
        memory_available_bytes=int(8e9),
    )
    state = State(nodes={NODE: NodeInfo(node_id=NODE, telemetry=telemetry)})
    if status is None:
        return state
    instance = Instance(
        instance_id=INSTANCE,
        model_id=ModelId("smollm2-135m"),
        sharding="pipeline",
        layer_count=30,
        shards=(
            ShardAssignment(runner_id=RUNNER, node_id=NODE, rank=0, start_layer=0, end_layer=30),
        ),
    )
    runner = RunnerInfo(runner_id=RUNNER, instance_id=INSTANCE, node_id=NODE, status=status)
    return state.model_copy(update={"instances": {INSTANCE: instance}, "runners": {RUNNER: runner}})


def test_place_creates_an_instance_with_fresh_ids() -> None:
    command = PlaceInstance(command_id=CommandId("c"), model_id=ModelId("smollm2-135m"))
    decision = decide(state_with(), command, CARDS, FRESH)
    assert decision.reply == CommandAccepted(command_id=CommandId("c"), created_id="inst-new")
    (event,) = decision.events
    assert isinstance(event, InstanceCreated)
    assert event.instance.shards[0].runner_id == RunnerId("runner-new")


def test_place_of_an_unknown_model_is_not_found() -> None:
    command = PlaceInstance(command_id=CommandId("c"), model_id=ModelId("gpt-17"))
    decision = decide(state_with(), command, CARDS, FRESH)
    assert isinstance(decision.reply, CommandRejected)
    assert decision.reply.code == "not_found"
    assert decision.events == ()


def test_place_that_cannot_fit_is_invalid_with_the_reason() -> None:
    command = PlaceInstance(
        command_id=CommandId("c"), model_id=ModelId("smollm2-135m"), sharding="tensor", node_count=2
    )
    decision = decide(state_with(), command, CARDS, FRESH)
    assert isinstance(decision.reply, CommandRejected)
    assert "2 nodes asked for, 1 in the cluster" in decision.reply.reason


def test_delete() -> None:
    command = DeleteInstance(command_id=CommandId("c"), instance_id=INSTANCE)
    decision = decide(state_with(RunnerReady()), command, CARDS, FRESH)
    assert decision.events == (InstanceDeleted(instance_id=INSTANCE),)
    missing = decide(state_with(), command, CARDS, FRESH)
    assert isinstance(missing.reply, CommandRejected)
    assert missing.reply.code == "not_found"


def test_submit_needs_a_ready_instance() -> None:
    command = SubmitTask(command_id=CommandId("c"), task=TASK)
    accepted = decide(state_with(RunnerReady()), command, CARDS, FRESH)
    assert accepted.events == (TaskCreated(task=TASK),)
    loading = decide(
        state_with(RunnerLoading(layers_loaded=1, layers_total=30)), command, CARDS, FRESH
    )
    assert isinstance(loading.reply, CommandRejected)
    assert loading.reply.code == "unavailable"
    absent = decide(state_with(), command, CARDS, FRESH)
    assert isinstance(absent.reply, CommandRejected)
    assert absent.reply.code == "not_found"


def test_submitting_the_same_task_twice_appends_it_once() -> None:
    state = state_with(RunnerReady())
    state = state.model_copy(update={"tasks": {TASK.task_id: TASK}})
    decision = decide(state, SubmitTask(command_id=CommandId("c"), task=TASK), CARDS, FRESH)
    assert decision.events == ()
    assert isinstance(decision.reply, CommandAccepted)


def test_cancel() -> None:
    state = state_with(RunnerReady()).model_copy(update={"tasks": {TASK.task_id: TASK}})
    command = CancelTask(command_id=CommandId("c"), task_id=TASK.task_id)
    assert decide(state, command, CARDS, FRESH).events == (
        TaskCancelRequested(task_id=TASK.task_id),
    )
    finished = decide(state_with(RunnerReady()), command, CARDS, FRESH)
    assert finished.events == ()
    assert isinstance(finished.reply, CommandAccepted)
