"""`shoal run`: one node as five separate processes, started in order, stopped in reverse.

A child that dies is started again (with backoff), so a crash of one service does not take the
node down; Ctrl-C or SIGTERM stops every child cleanly.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Final, final

from shoal_shared.settings import NodeSettings, settings_environment

logger = logging.getLogger("shoal.run")

SERVICE_ORDER: Final = ("broker", "election", "master", "worker", "api")
RESTART_BACKOFF_SECONDS: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_AFTER_SECONDS: Final = 30.0
STOP_GRACE_SECONDS: Final = 15.0


async def wait_for_port(port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        if loop.time() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f}s")
        await asyncio.sleep(0.05)


@final
class ChildService:
    def __init__(self, name: str, environment: dict[str, str]) -> None:
        self.name = name
        self._environment = environment
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal", self.name, env=self._environment
        )

    async def keep_running(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started_at = loop.time()
            if self.process is None or self.process.returncode is not None:
                await self.start()
            assert self.process is not None
            returncode = await self.process.wait()
            if self._stopping:
                return
            failures = 0 if loop.time() - started_at > STABLE_AFTER_SECONDS else failures + 1
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS)) - 1]
            logger.warning("%s exited with %s; restarting in %.1fs", self.name, returncode, delay)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_SECONDS)
        except TimeoutError:
            logger.warning("%s did not stop in %.0fs; killing it", self.name, STOP_GRACE_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers do: connections of a killed predecessor in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def run_node(settings: NodeSettings) -> None:
    listeners = (
        ("NATS", settings.bind_host, settings.nats_port),
        ("API", settings.api_host, settings.api_port),
    )
    for label, host, port in listeners:
        if not _port_is_free(host, port):
            raise SystemExit(f"shoal: the {label} port {port} is in use (another node running?)")
    environment = {**os.environ, **settings_environment(settings)}
    children = [ChildService(name, environment) for name in SERVICE_ORDER]
    keepers: list[asyncio.Task[None]] = []
    try:
        for child in children:
            await child.start()
            keepers.append(asyncio.create_task(child.keep_running()))
            if child.name == "broker":
                await wait_for_port(settings.nats_port, timeout=30)
        logger.info(
            "node running: API on http://%s:%d (Ctrl-C stops it)",
            "localhost" if settings.api_host in ("0.0.0.0", "127.0.0.1") else settings.api_host,
            settings.api_port,
        )
        await asyncio.gather(*keepers)
    finally:
        for child in reversed(children):
            await child.stop()
        for keeper in keepers:
            keeper.cancel()
