from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.state import State
from shoal_shared.tasks import ChatMessage, ChatTask, SamplingParameters
from shoal_worker.plan import (
    CancelTaskOnRunner,
    DispatchTask,
    LocalRunner,
    StartRunner,
    StopRunner,
    plan,
)

HERE = NodeId("node-here")
ELSEWHERE = NodeId("node-elsewhere")


def instance(name: str, node_ids: tuple[NodeId, ...]) -> Instance:
    shards = tuple(
        ShardAssignment(
            runner_id=RunnerId(f"{name}-runner-{rank}"),
            node_id=node_id,
            rank=rank,
            start_layer=rank * 10,
            end_layer=rank * 10 + 10,
        )
        for rank, node_id in enumerate(node_ids)
    )
    return Instance(
        instance_id=InstanceId(name),
        model_id=ModelId("m"),
        sharding="pipeline",
        layer_count=10 * len(node_ids),
        shards=shards,
    )


def task(task_id: str, instance_id: str) -> ChatTask:
    return ChatTask(
        task_id=TaskId(task_id),
        instance_id=InstanceId(instance_id),
        model_id=ModelId("m"),
        messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParameters(),
        requester_node_id=HERE,
    )


def local(
    runner_id: str,
    instance_id: str,
    dispatched: frozenset[str] = frozenset(),
    cancelled: frozenset[str] = frozenset(),
) -> LocalRunner:
    return LocalRunner(
        runner_id=RunnerId(runner_id),
        instance_id=InstanceId(instance_id),
        dispatched=frozenset(TaskId(t) for t in dispatched),
        cancelled=frozenset(TaskId(t) for t in cancelled),
    )


def test_starts_runners_only_for_shards_on_this_node() -> None:
    mine = instance("a", (HERE,))
    split = instance("b", (ELSEWHERE, HERE))
    theirs = instance("c", (ELSEWHERE,))
    state = State(instances={i.instance_id: i for i in (mine, split, theirs)})
    actions = plan(state, HERE, {})
    started = {action.shard.runner_id for action in actions if isinstance(action, StartRunner)}
    assert started == {RunnerId("a-runner-0"), RunnerId("b-runner-1")}
    assert len(actions) == 2


def test_stops_runners_of_deleted_instances() -> None:
    actions = plan(State(), HERE, {RunnerId("gone"): local("gone", "x")})
    assert actions == (StopRunner(runner_id=RunnerId("gone")),)


def test_dispatches_each_task_once_and_cancels_once() -> None:
    mine = instance("a", (HERE,))
    first, second = task("t1", "a"), task("t2", "a")
    state = State(
        instances={mine.instance_id: mine},
        tasks={first.task_id: first, second.task_id: second},
        cancelling=frozenset({first.task_id}),
    )
    runner_id = RunnerId("a-runner-0")
    actions = plan(state, HERE, {runner_id: local("a-runner-0", "a", frozenset({"t1"}))})
    assert len(actions) == 2
    assert CancelTaskOnRunner(runner_id=runner_id, task_id=first.task_id) in actions
    assert DispatchTask(runner_id=runner_id, task=second) in actions
    settled = plan(
        state,
        HERE,
        {runner_id: local("a-runner-0", "a", frozenset({"t1", "t2"}), frozenset({"t1"}))},
    )
    assert settled == ()


def test_tasks_finished_locally_are_not_dispatched_again() -> None:
    mine = instance("a", (HERE,))
    done = task("t1", "a")
    state = State(instances={mine.instance_id: mine}, tasks={done.task_id: done})
    runner_id = RunnerId("a-runner-0")
    assert plan(state, HERE, {runner_id: local("a-runner-0", "a")}, {done.task_id}) == ()
