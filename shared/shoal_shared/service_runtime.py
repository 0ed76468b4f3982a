"""How every Shoal process starts: logging, signals, and a clean stop on SIGTERM/Ctrl-C."""

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shoal_shared.settings import NodeSettings

ServiceMain = Callable[[NodeSettings], Coroutine[Any, Any, None]]


def configure_logging(service: str, settings: NodeSettings) -> None:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(
        f"%(asctime)s {service:<8} %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
    )
    to_terminal = logging.StreamHandler(sys.stderr)
    to_file = logging.FileHandler(settings.logs_dir / f"{service}.log")
    root = logging.getLogger()
    root.handlers.clear()
    for handler in (to_terminal, to_file):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # nats-py logs every reconnect attempt at ERROR; the bus reports what matters.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(main)
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run_service(service: str, main: ServiceMain, settings: NodeSettings) -> None:
    configure_logging(service, settings)
    asyncio.run(_until_signalled(main(settings)))
