"""Choosing a ready instance, and saying what is going on when none is ready."""

from shoal_api.instance_choice import choose_instance, not_ready_message
from shoal_shared.downloads import Download, DownloadFailed, DownloadOngoing, DownloadStatus
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.runner_status import (
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
)
from shoal_shared.state import RunnerInfo, State
from shoal_shared.tasks import ChatMessage, ChatTask, SamplingParameters

MODEL = ModelId("smollm2-135m")


def instance(name: str, nodes: tuple[str, ...]) -> Instance:
    return Instance(
        instance_id=InstanceId(name),
        model_id=MODEL,
        sharding="pipeline",
        layer_count=30,
        shards=tuple(
            ShardAssignment(
                runner_id=RunnerId(f"{name}-r{rank}"),
                node_id=NodeId(node),
                rank=rank,
                start_layer=rank * 10,
                end_layer=rank * 10 + 10,
            )
            for rank, node in enumerate(nodes)
        ),
    )


def with_runner(state: State, runner: str, node: str, status: RunnerStatus) -> State:
    instance_id = InstanceId(runner.rsplit("-", 1)[0])
    info = RunnerInfo(
        runner_id=RunnerId(runner), instance_id=instance_id, node_id=NodeId(node), status=status
    )
    return state.model_copy(update={"runners": {**state.runners, info.runner_id: info}})


def task_on(instance_id: str, number: int) -> ChatTask:
    return ChatTask(
        task_id=TaskId(f"task-{number}"),
        instance_id=InstanceId(instance_id),
        model_id=MODEL,
        messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParameters(),
        requester_node_id=NodeId("n1"),
    )


def test_no_instance_means_none_and_says_how_to_place_one() -> None:
    assert choose_instance(State(), MODEL) is None
    assert "POST /instance" in not_ready_message(State(), MODEL)


def test_an_instance_is_ready_only_when_every_shard_is() -> None:
    state = State(instances={InstanceId("a"): instance("a", ("n1", "n2"))})
    state = with_runner(state, "a-r0", "n1", RunnerReady())
    state = with_runner(state, "a-r1", "n2", RunnerLoading(layers_loaded=12, layers_total=30))
    assert choose_instance(state, MODEL) is None
    message = not_ready_message(state, MODEL)
    assert message == f"model {MODEL} is not ready yet: it is loading (layers 12/30) on node n2"
    state = with_runner(state, "a-r1", "n2", RunnerRunning(active_tasks=1))
    assert choose_instance(state, MODEL) == "a"


def test_a_missing_or_failed_runner_is_described() -> None:
    state = State(instances={InstanceId("a"): instance("a", ("n1", "n2"))})
    state = with_runner(state, "a-r0", "n1", RunnerFailed(reason="out of memory"))
    message = not_ready_message(state, MODEL)
    assert "failed on node n1: out of memory" in message
    assert "waiting for its runner on node n2" in message


def test_the_least_loaded_ready_instance_is_chosen() -> None:
    state = State(
        instances={
            InstanceId("a"): instance("a", ("n1",)),
            InstanceId("b"): instance("b", ("n2",)),
        },
        tasks={TaskId("task-1"): task_on("a", 1)},
    )
    state = with_runner(state, "a-r0", "n1", RunnerReady())
    state = with_runner(state, "b-r0", "n2", RunnerReady())
    assert choose_instance(state, MODEL) == "b"
    assert choose_instance(state, ModelId("other")) is None


def test_a_shard_waiting_for_its_files_says_how_far_the_download_is() -> None:
    def downloading(status: DownloadStatus) -> State:
        record = Download(
            node_id=NodeId("n2"),
            model_id=MODEL,
            start_layer=10,
            end_layer=20,
            layer_count=30,
            status=status,
        )
        state = State(
            instances={InstanceId("a"): instance("a", ("n1", "n2"))},
            downloads={NodeId("n2"): {MODEL: record}},
        )
        return with_runner(state, "a-r0", "n1", RunnerReady())

    ongoing = DownloadOngoing(
        bytes_done=25, bytes_total=100, bytes_per_second=5.0, eta_seconds=15.0
    )
    assert not_ready_message(downloading(ongoing), MODEL).endswith(
        "it is downloading its files on node n2 (25%, about 15 s left)"
    )
    failed = not_ready_message(downloading(DownloadFailed(reason="HF_TOKEN is not set")), MODEL)
    assert failed.endswith("could not download its files on node n2: HF_TOKEN is not set")
