"""Blocking hub calls on daemon threads.

`asyncio.to_thread` runs on the loop's default executor, which `asyncio.run` and the
interpreter both join at exit: a worker told to stop while a hub request hangs would wait
out the request's timeouts and retries (~15 s) and be killed by the node. The hub calls keep
their partial files and resume, so abandoning one mid-request at exit loses nothing.
"""

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")


async def in_daemon_thread(
    function: Callable[_Parameters, _Result],
    *arguments: _Parameters.args,
    **keywords: _Parameters.kwargs,
) -> _Result:
    """`function(*arguments, **keywords)` on a thread the process does not wait for at exit.

    Cancelling the awaiting task does not stop the thread: pass the function a way to be told
    (a `threading.Event`) when it should give up early.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[_Result] = loop.create_future()

    def settle_with_result(result: _Result) -> None:
        if not outcome.done():
            outcome.set_result(result)

    def settle_with_error(error: Exception) -> None:
        if not outcome.done():
            outcome.set_exception(error)

    def report(settle: Callable[[], None]) -> None:
        # The loop is closed when nobody waits any more (the worker is exiting).
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                return

    def work() -> None:
        try:
            result = function(*arguments, **keywords)
        except Exception as error:  # handed to the awaiting task, which handles it
            # Bound now: Python unbinds `error` when the except block ends.
            report(functools.partial(settle_with_error, error))
        else:
            report(functools.partial(settle_with_result, result))

    name = getattr(function, "__qualname__", "hub call")
    threading.Thread(target=work, name=f"shoal-{name}", daemon=True).start()
    return await outcome
