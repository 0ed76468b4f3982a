"""A small typed layer over nats-py: every payload is a pydantic model as JSON."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoServersError
from nats.js import JetStreamContext
from pydantic import BaseModel, TypeAdapter

from shoal_shared import nats_typed

logger = logging.getLogger(__name__)

Reply = TypeVar("Reply")
MessageHandler = Callable[[Msg], Awaitable[None]]

CONNECT_DEADLINE_SECONDS: Final = 60.0


class BusConnectError(ConnectionError):
    pass


@final
class Bus:
    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(
        cls, url: str, name: str, deadline_seconds: float = CONNECT_DEADLINE_SECONDS
    ) -> "Bus":
        """Connect, waiting for a broker that is still starting; then reconnect forever."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + deadline_seconds
        while True:
            try:
                client = await nats_typed.connect(
                    url,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=_log_error,
                )
            except (NoServersError, OSError, TimeoutError) as error:
                if loop.time() > give_up_at:
                    raise BusConnectError(f"no NATS server answered at {url}: {error}") from error
                await asyncio.sleep(0.2)
                continue
            return cls(client)

    def jetstream(self, domain: str | None = None, timeout: float = 5) -> JetStreamContext:
        return nats_typed.jetstream(self.client)(domain=domain, timeout=timeout)

    async def publish(self, subject: str, message: BaseModel) -> None:
        await self.client.publish(subject, message.model_dump_json().encode())

    async def request(
        self,
        subject: str,
        message: BaseModel,
        reply_type: TypeAdapter[Reply],
        timeout: float,
    ) -> Reply:
        response = await self.client.request(
            subject, message.model_dump_json().encode(), timeout=timeout
        )
        return reply_type.validate_json(response.data)

    async def subscribe(
        self, subject: str, handler: MessageHandler, queue: str = ""
    ) -> Subscription:
        return await nats_typed.subscribe(self.client)(subject, queue=queue, cb=handler)

    async def reply(self, message: Msg, response: BaseModel) -> None:
        if message.reply:
            await self.client.publish(message.reply, response.model_dump_json().encode())

    async def flush(self) -> None:
        await self.client.flush(timeout=5)

    async def close(self) -> None:
        if not self.client.is_closed:
            await self.client.drain()


async def _log_error(error: Exception) -> None:
    logger.debug("nats: %s", error)
