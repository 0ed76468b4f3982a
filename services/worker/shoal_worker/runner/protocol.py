"""Messages between a worker and its runner subprocess.

They travel as newline-delimited JSON over a Unix socketpair rather than over the runner's
stdout, because MLX, mlx-lm and transformers print to stdout whenever they like.
"""

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter
from shoal_shared.chunks import FinishReason, Usage
from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import RunnerId, TaskId
from shoal_shared.runner_status import RunnerStatus
from shoal_shared.tasks import ChatMessage, SamplingParameters

Sharding = Literal["pipeline", "tensor"]


class RunnerSpec(FrozenModel):
    """What a runner serves: handed to the subprocess as JSON on its command line.

    With world_size > 1 the runners of one instance form an `mx.distributed` ring group:
    `ring_hosts` holds one "ip:port" per rank, in rank order, identical on every rank.
    Pipeline sharding gives each rank a contiguous layer range (rank 0 the first layers);
    tensor sharding gives every rank all layers, a 1/world_size slice of each.
    """

    runner_id: RunnerId
    model_dir: str
    rank: int = Field(default=0, ge=0)
    world_size: int = Field(default=1, ge=1)
    # The half-open layer range [start_layer, end_layer) this rank holds, out of layer_count.
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1)
    layer_count: int = Field(ge=1)
    sharding: Sharding = "pipeline"
    ring_hosts: tuple[str, ...] = ()
    # How long a rank waits for its ring neighbours to show up before it reports failed.
    connect_timeout_s: float = Field(default=60.0, gt=0)
    # How long a loaded rank waits for the slowest rank of its group to finish loading.
    peer_load_timeout_s: float = Field(default=600.0, gt=0)
    # The longest a generation step may take before the rank declares its group stalled: a
    # stalled or half-dead peer otherwise blocks it forever. A step is one token, or one
    # prefill chunk of up to 2048 tokens, which takes minutes on a slow CPU.
    step_timeout_s: float = Field(default=300.0, gt=0)


# Worker -> runner.


class Generate(FrozenModel):
    kind: Literal["generate"] = "generate"
    task_id: TaskId
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParameters


class Cancel(FrozenModel):
    kind: Literal["cancel"] = "cancel"
    task_id: TaskId


class Shutdown(FrozenModel):
    kind: Literal["shutdown"] = "shutdown"


WorkerMessage = Annotated[Generate | Cancel | Shutdown, Field(discriminator="kind")]


# Runner -> worker.


class StatusUpdate(FrozenModel):
    kind: Literal["status"] = "status"
    status: RunnerStatus


class TokenOutput(FrozenModel):
    """Newly released text of a task and the ids of the tokens that produced it."""

    kind: Literal["token"] = "token"
    task_id: TaskId
    text: str
    token_ids: tuple[int, ...]


class TaskDone(FrozenModel):
    kind: Literal["done"] = "done"
    task_id: TaskId
    finish_reason: FinishReason
    usage: Usage


class TaskFailed(FrozenModel):
    kind: Literal["failed"] = "failed"
    task_id: TaskId
    message: str


RunnerMessage = Annotated[
    StatusUpdate | TokenOutput | TaskDone | TaskFailed, Field(discriminator="kind")
]

_WORKER_MESSAGE_ADAPTER: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerMessage)
_RUNNER_MESSAGE_ADAPTER: TypeAdapter[RunnerMessage] = TypeAdapter(RunnerMessage)


def encode_message(message: WorkerMessage | RunnerMessage) -> bytes:
    """One message as one line; JSON never contains a raw newline, so lines frame messages."""
    return message.model_dump_json().encode() + b"\n"


def decode_worker_message(line: bytes) -> WorkerMessage:
    return _WORKER_MESSAGE_ADAPTER.validate_json(line)


def decode_runner_message(line: bytes) -> RunnerMessage:
    return _RUNNER_MESSAGE_ADAPTER.validate_json(line)
