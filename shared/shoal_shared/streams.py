"""The JetStream streams of the event log and how to append to them."""

import asyncio
import logging
import secrets
from typing import Final

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError

from shoal_shared import nats_typed, subjects
from shoal_shared.bus import Bus
from shoal_shared.events import Event, LocalEnvelope
from shoal_shared.ids import NodeId

logger = logging.getLogger(__name__)

PUBLISH_ATTEMPTS: Final = 20


def global_stream_config(node_id: NodeId) -> StreamConfig:
    return StreamConfig(
        name=subjects.GLOBAL_EVENTS_STREAM,
        subjects=[f"{subjects.global_events(node_id)}.>"],
        storage=StorageType.FILE,
        duplicate_window=120,
    )


def local_stream_config(node_id: NodeId) -> StreamConfig:
    return StreamConfig(
        name=subjects.LOCAL_EVENTS_STREAM,
        subjects=[subjects.local_events(node_id)],
        storage=StorageType.FILE,
        duplicate_window=120,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to this config. Idempotent."""
    try:
        await nats_typed.add_stream(js)(config)
    except BadRequestError:
        # Error 10058: the stream exists with another config (an older version's).
        await nats_typed.update_stream(js)(config)


async def publish_with_retry(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
) -> int:
    """Publish until acknowledged. The Nats-Msg-Id header makes retries safe: a publish that
    timed out during a reconnect may have been stored, and its retry is then a duplicate."""
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            ack = await js.publish(subject, payload, headers=headers, timeout=2)
        except (NatsTimeoutError, NoStreamResponseError) as error:
            logger.warning("publish to %s failed (%s), retrying", subject, error)
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
            continue
        return ack.seq
    raise ConnectionError(f"JetStream did not acknowledge a publish to {subject}")


async def append_local_event(bus: Bus, node_id: NodeId, event: Event) -> int:
    """Append to this node's local stream, in its own domain; the master indexes it."""
    envelope = LocalEnvelope(node_id=node_id, event=event)
    return await publish_with_retry(
        bus.jetstream(domain=node_id),
        subjects.local_events(node_id),
        envelope.model_dump_json().encode(),
        {"Nats-Msg-Id": f"{node_id}.{secrets.token_hex(12)}"},
    )
