"""Server-sent events: each event is written the moment its generator yields it."""

from collections.abc import AsyncGenerator
from typing import Final, final

from starlette.responses import StreamingResponse
from starlette.types import Send

DONE: Final = b"data: [DONE]\n\n"

_HEADERS: Final = {
    "Cache-Control": "no-cache",
    # Keep reverse proxies (nginx) from buffering the stream.
    "X-Accel-Buffering": "no",
}


def sse_data(json_text: str) -> bytes:
    # JSON text never contains a raw newline, so one `data:` line carries the whole event.
    return b"data: " + json_text.encode() + b"\n\n"


@final
class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator when the response ends, however
    it ends. Starlette cancels the generator when it notices a disconnect (ASGI < 2.4) but
    only stops iterating on a failed write (ASGI 2.4); closing it here runs the generator's
    `finally` (which cancels the task) promptly in both cases."""

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_HEADERS)
        self._events = events

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # Closing a generator that already finished is a no-op; the generators' `finally`
            # blocks never await, so this cannot be interrupted by a pending cancellation.
            await self._events.aclose()
