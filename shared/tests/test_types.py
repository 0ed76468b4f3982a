import pytest
from pydantic import TypeAdapter, ValidationError
from shoal_shared.chunks import Chunk, ErrorChunk, FinishChunk, TokenChunk, Usage
from shoal_shared.commands import (
    CancelTask,
    Command,
    CommandAccepted,
    CommandRejected,
    CommandReply,
    DeleteInstance,
    PlaceInstance,
    SubmitTask,
)
from shoal_shared.events import Event, MasterElected, RunnerStatusChanged
from shoal_shared.global_log import GLOBAL_LOG_ENTRY, LoggedEvent, LoggedSnapshot
from shoal_shared.ids import CommandId, ModelId, TaskId, is_subject_token, new_node_id
from shoal_shared.runner_status import RunnerFailed, RunnerLoading, RunnerStatus
from shoal_shared.state import State
from shoal_shared.tasks import SamplingParameters
from shoal_shared.testing import INSTANCE, NODE_A, RUNNER, chat_task, indexed

COMMANDS: list[Command] = [
    PlaceInstance(command_id=CommandId("c1"), model_id=ModelId("smollm2-135m")),
    PlaceInstance(
        command_id=CommandId("c2"),
        model_id=ModelId("smollm2-135m"),
        sharding="tensor",
        node_ids=(NODE_A,),
        node_count=1,
    ),
    DeleteInstance(command_id=CommandId("c3"), instance_id=INSTANCE),
    SubmitTask(command_id=CommandId("c4"), task=chat_task()),
    CancelTask(command_id=CommandId("c5"), task_id=TaskId("task-1")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.kind)
def test_commands_round_trip(command: Command) -> None:
    adapter: TypeAdapter[Command] = TypeAdapter(Command)
    assert adapter.validate_json(adapter.dump_json(command)) == command


def test_replies_round_trip() -> None:
    adapter: TypeAdapter[CommandReply] = TypeAdapter(CommandReply)
    for reply in (
        CommandAccepted(command_id=CommandId("c"), created_id="inst-1"),
        CommandRejected(command_id=CommandId("c"), code="unavailable", reason="loading"),
    ):
        assert adapter.validate_json(adapter.dump_json(reply)) == reply


def test_chunks_round_trip() -> None:
    adapter: TypeAdapter[Chunk] = TypeAdapter(Chunk)
    task_id = TaskId("task-1")
    for chunk in (
        TokenChunk(task_id=task_id, sequence=0, text="Par", token_ids=(1, 2)),
        FinishChunk(
            task_id=task_id,
            sequence=1,
            finish_reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=4),
        ),
        ErrorChunk(task_id=task_id, sequence=2, message="runner died"),
    ):
        assert adapter.validate_json(adapter.dump_json(chunk)) == chunk


def test_runner_statuses_are_tagged() -> None:
    adapter: TypeAdapter[RunnerStatus] = TypeAdapter(RunnerStatus)
    loading = adapter.validate_json('{"status": "loading", "layers_loaded": 2, "layers_total": 9}')
    assert loading == RunnerLoading(layers_loaded=2, layers_total=9)
    with pytest.raises(ValidationError):
        adapter.validate_json('{"status": "exploded"}')


def test_events_reject_unknown_fields_and_wrong_types() -> None:
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    with pytest.raises(ValidationError):
        adapter.validate_json(
            '{"kind": "master_elected", "master_node_id": "n", "term": 1, "x": 1}'
        )
    with pytest.raises(ValidationError):
        adapter.validate_json('{"kind": "master_elected", "master_node_id": "n", "term": "1"}')
    with pytest.raises(ValidationError):
        adapter.validate_json('{"kind": "master_elected", "master_node_id": "n", "term": 0}')


def test_models_are_frozen() -> None:
    event = MasterElected(master_node_id=NODE_A, term=1)
    with pytest.raises(ValidationError):
        event.__setattr__("term", 2)


def test_global_log_entries_round_trip() -> None:
    event = RunnerStatusChanged(
        runner_id=RUNNER, instance_id=INSTANCE, node_id=NODE_A, status=RunnerFailed(reason="x")
    )
    for entry in (
        LoggedEvent(event=indexed(0, event)),
        LoggedSnapshot(term=2, state=State(last_index=41, term=2)),
    ):
        assert GLOBAL_LOG_ENTRY.validate_json(entry.model_dump_json()) == entry


def test_sampling_parameters_are_bounded() -> None:
    with pytest.raises(ValidationError):
        SamplingParameters(temperature=-1.0)
    with pytest.raises(ValidationError):
        SamplingParameters(top_p=0.0)
    with pytest.raises(ValidationError):
        SamplingParameters(max_tokens=0)


def test_node_ids_are_subject_tokens() -> None:
    assert is_subject_token(new_node_id())
    assert not is_subject_token("a.b")
    assert not is_subject_token("a b")
    assert not is_subject_token("")
