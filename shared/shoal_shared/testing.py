"""Small builders of valid shared objects, and a real broker, for the tests of every package."""

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from shoal_shared.broker import Broker
from shoal_shared.events import Event, IndexedEvent, LocalOrigin
from shoal_shared.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from shoal_shared.instances import Instance, ShardAssignment
from shoal_shared.settings import NodeSettings
from shoal_shared.tasks import ChatMessage, ChatTask, SamplingParameters
from shoal_shared.telemetry import NodeTelemetry

NODE_A = NodeId("node-a")
NODE_B = NodeId("node-b")
INSTANCE = InstanceId("inst-1")
RUNNER = RunnerId("runner-1")
MODEL = ModelId("smollm2-135m")


def telemetry(
    available_gb: float = 8.0,
    total_gb: float = 16.0,
    disk_gb: float = 0.0,
    can_download: bool = True,
) -> NodeTelemetry:
    return NodeTelemetry(
        hostname="host",
        platform="Linux x86_64",
        chip="test chip",
        backend="cpu",
        cpu_cores=4,
        memory_total_bytes=int(total_gb * 1e9),
        memory_available_bytes=int(available_gb * 1e9),
        disk_available_bytes=int(disk_gb * 1e9),
        can_download=can_download,
    )


def instance(
    instance_id: InstanceId = INSTANCE, node_id: NodeId = NODE_A, runner_id: RunnerId = RUNNER
) -> Instance:
    return Instance(
        instance_id=instance_id,
        model_id=MODEL,
        sharding="pipeline",
        layer_count=30,
        shards=(
            ShardAssignment(
                runner_id=runner_id, node_id=node_id, rank=0, start_layer=0, end_layer=30
            ),
        ),
    )


def chat_task(task_id: str = "task-1", instance_id: InstanceId = INSTANCE) -> ChatTask:
    return ChatTask(
        task_id=TaskId(task_id),
        instance_id=instance_id,
        model_id=MODEL,
        messages=(ChatMessage(role="user", content="What is the capital of France?"),),
        sampling=SamplingParameters(temperature=0.0, max_tokens=16, stop=("\n\n",), seed=7),
        requester_node_id=NODE_A,
    )


def indexed(
    index: int, event: Event, term: int = 1, origin: LocalOrigin | None = None
) -> IndexedEvent:
    return IndexedEvent(index=index, term=term, event=event, origin=origin)


@contextlib.asynccontextmanager
async def running_broker(settings: NodeSettings, node_id: NodeId) -> AsyncGenerator[None, None]:
    """A real nats-server (the node's broker) for the duration of the block."""
    broker = Broker(settings, node_id)
    running = asyncio.create_task(broker.run())
    try:
        yield
    finally:
        await broker.stop()
        await running
