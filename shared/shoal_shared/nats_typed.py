"""Fully typed views of the few nats-py calls whose signatures leave parts unknown
(`**options`), so the rest of the code type-checks strictly without ignores."""

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo

ErrorCallback = Callable[[Exception], Coroutine[Any, Any, None]]


class _Connect(Protocol):
    def __call__(
        self,
        servers: str,
        *,
        name: str,
        connect_timeout: float,
        allow_reconnect: bool,
        max_reconnect_attempts: int,
        reconnect_time_wait: float,
        ping_interval: float,
        max_outstanding_pings: int,
        error_cb: ErrorCallback,
        user: str | None = None,
        password: str | None = None,
    ) -> Awaitable[Client]: ...


class _JetStream(Protocol):
    def __call__(self, *, domain: str | None = None, timeout: float = 5) -> JetStreamContext: ...


class _Subscribe(Protocol):
    def __call__(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> Awaitable[Subscription]: ...


class _StreamChange(Protocol):
    def __call__(self, config: StreamConfig) -> Awaitable[StreamInfo]: ...


connect = cast(_Connect, nats.connect)


def jetstream(client: Client) -> _JetStream:
    return cast(_JetStream, client.jetstream)


def subscribe(client: Client) -> _Subscribe:
    return cast(_Subscribe, client.subscribe)


def add_stream(js: JetStreamContext) -> _StreamChange:
    return cast(_StreamChange, js.add_stream)


def update_stream(js: JetStreamContext) -> _StreamChange:
    return cast(_StreamChange, js.update_stream)
