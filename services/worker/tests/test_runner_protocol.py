"""The worker <-> runner wire format: one JSON object per line, strict and tagged."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from shoal_shared.chunks import Usage
from shoal_shared.ids import RunnerId, TaskId
from shoal_shared.runner_status import RunnerLoading
from shoal_shared.tasks import ChatMessage, SamplingParameters
from shoal_worker.runner.protocol import (
    Cancel,
    Generate,
    RunnerMessage,
    RunnerSpec,
    Shutdown,
    StatusUpdate,
    TaskDone,
    TaskFailed,
    TokenOutput,
    WorkerMessage,
    decode_runner_message,
    decode_worker_message,
    encode_message,
)

TASK = TaskId("task-1")


@pytest.mark.parametrize(
    "message",
    [
        Generate(
            task_id=TASK,
            messages=(ChatMessage(role="user", content="line one\nline two"),),
            sampling=SamplingParameters(temperature=0.0, max_tokens=8, stop=("\n\n",), seed=3),
        ),
        Cancel(task_id=TASK),
        Shutdown(),
    ],
)
def test_worker_messages_round_trip_as_single_lines(message: WorkerMessage) -> None:
    line = encode_message(message)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_worker_message(line) == message


@pytest.mark.parametrize(
    "message",
    [
        StatusUpdate(status=RunnerLoading(layers_loaded=3, layers_total=30)),
        TokenOutput(task_id=TASK, text=" Paris\n", token_ids=(7042, 198)),
        TaskDone(
            task_id=TASK, finish_reason="length", usage=Usage(prompt_tokens=9, completion_tokens=4)
        ),
        TaskFailed(task_id=TASK, message="the prompt is too long"),
    ],
)
def test_runner_messages_round_trip_as_single_lines(message: RunnerMessage) -> None:
    line = encode_message(message)
    assert line.count(b"\n") == 1
    assert decode_runner_message(line) == message


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValidationError):
        decode_runner_message(b'{"kind": "telemetry"}\n')


def test_runner_spec_round_trips() -> None:
    spec = RunnerSpec(
        runner_id=RunnerId("runner-1"),
        model_dir="/models/smollm2",
        start_layer=0,
        end_layer=30,
        layer_count=30,
    )
    assert RunnerSpec.model_validate_json(spec.model_dump_json()) == spec
    assert (spec.rank, spec.world_size) == (0, 1)
