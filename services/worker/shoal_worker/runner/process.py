"""The worker's handle to one runner subprocess, and the environment runners start with."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final, final

from shoal_worker.runner.protocol import (
    RunnerMessage,
    RunnerSpec,
    Shutdown,
    WorkerMessage,
    decode_runner_message,
    encode_message,
)

logger = logging.getLogger(__name__)

# A line is one message; a generous limit, since a runner only sends small ones.
_LINE_LIMIT_BYTES: Final = 16 * 1024 * 1024
_OPENBLAS_SONAME: Final = "libopenblas.so.0"


class RunnerNotStartedError(RuntimeError):
    pass


class RunnerConnectionError(ConnectionError):
    """The runner's socket is closed: the runner exited or is exiting."""


@final
class RunnerProcess:
    """One runner subprocess and the socketpair it talks over."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(
        self, spec: RunnerSpec, *, environment: Mapping[str, str] | None = None
    ) -> None:
        """Spawn the runner; its status updates then arrive through `messages()`."""
        if self._process is not None:
            raise RuntimeError("this RunnerProcess was already started")
        worker_end, runner_end = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal_worker.runner.main",
                "--socket-fd",
                str(runner_end.fileno()),
                "--spec",
                spec.model_dump_json(),
                stdin=subprocess.DEVNULL,
                # Libraries print to stdout at will; keep that out of the worker's stdout.
                stdout=sys.stderr.fileno() if _has_file_descriptor(sys.stderr) else None,
                pass_fds=(runner_end.fileno(),),
                env=dict(runner_environment() if environment is None else environment),
                # Same session, so a terminal's hang-up reaches runners along with the worker.
                start_new_session=False,
            )
        except BaseException:
            worker_end.close()
            raise
        finally:
            # The child holds its own copy; ours must go, or the runner's end never sees EOF.
            runner_end.close()
        self._reader, self._writer = await asyncio.open_unix_connection(
            sock=worker_end, limit=_LINE_LIMIT_BYTES
        )

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative signal numbers for a killed runner (-9 for SIGKILL)."""
        return None if self._process is None else self._process.returncode

    async def send(self, message: WorkerMessage) -> None:
        writer = self._writer
        if writer is None:
            raise RunnerNotStartedError("the runner was not started")
        if writer.is_closing():
            raise RunnerConnectionError("the runner's socket is closed")
        try:
            writer.write(encode_message(message))
            await writer.drain()
        except (ConnectionError, OSError) as error:
            raise RunnerConnectionError(f"the runner's socket closed: {error}") from error

    async def messages(self) -> AsyncIterator[RunnerMessage]:
        """Messages from the runner in order; ends when its socket closes (it exited)."""
        reader = self._reader
        if reader is None:
            raise RunnerNotStartedError("the runner was not started")
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, OSError):
                return
            if not line:
                return
            try:
                yield decode_runner_message(line)
            except ValueError:
                logger.exception("runner %s sent a malformed message: %r", self.pid, line[:200])

    async def wait(self) -> int:
        return await self._started().wait()

    def kill(self) -> None:
        """SIGKILL, for a runner that is stuck (e.g. a hung distributed op)."""
        self._signal(signal.SIGKILL)

    async def stop(self, timeout: float = 5.0) -> int:
        """Ask politely (Shutdown), then SIGTERM, then SIGKILL; each step waits `timeout`."""
        process = self._started()
        if process.returncode is None:
            with contextlib.suppress(RunnerConnectionError):
                await self.send(Shutdown())
            for escalate in (lambda: self._signal(signal.SIGTERM), self.kill):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
                    break
                logger.warning("runner %s did not stop within %.1f s", process.pid, timeout)
                escalate()
        returncode = await process.wait()
        await self._close_socket()
        return returncode

    def _signal(self, signal_number: signal.Signals) -> None:
        process = self._started()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal_number)

    async def _close_socket(self) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def _started(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RunnerNotStartedError("the runner was not started")
        return self._process


def _has_file_descriptor(stream: object) -> bool:
    try:
        fileno = getattr(stream, "fileno", None)
        return callable(fileno) and isinstance(fileno(), int)
    except (OSError, ValueError):
        return False


def runner_environment() -> dict[str, str]:
    """The environment for runner subprocesses.

    On Linux without an MLX GPU backend, MLX's CPU wheel bundles a slow reference BLAS; with
    the system's OpenBLAS preloaded, float32 prefill is about 25x faster (DESIGN §7).
    """
    environment = dict(os.environ)
    if sys.platform != "linux" or _mlx_gpu_backend_installed():
        return environment
    openblas = find_openblas()
    if openblas is None:
        return environment
    preloaded = [entry for entry in environment.get("LD_PRELOAD", "").split(":") if entry]
    if str(openblas) not in preloaded:
        environment["LD_PRELOAD"] = ":".join([str(openblas), *preloaded])
    return environment


@functools.cache
def find_openblas() -> Path | None:
    """The system's pthread OpenBLAS, or None (with one warning per worker process)."""
    candidates = [
        Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/{_OPENBLAS_SONAME}")
    ]
    candidates.extend(_ldconfig_openblas_paths())
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    logger.warning(
        "no system OpenBLAS found: runners will decode slower on the CPU "
        "(install it with: apt-get install libopenblas0-pthread)"
    )
    return None


def _ldconfig_openblas_paths() -> list[Path]:
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # Lines look like: "\tlibopenblas.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libopenblas.so.0"
    return [
        Path(line.rsplit("=>", 1)[1].strip())
        for line in listing.splitlines()
        if line.strip().startswith(_OPENBLAS_SONAME) and "=>" in line
    ]


@functools.cache
def _mlx_gpu_backend_installed() -> bool:
    """Whether MLX's CUDA backend is installed (`mlx[cuda]` pulls in an `mlx-cuda-*` wheel)."""
    return any(
        (distribution.metadata["Name"] or "").lower().replace("_", "-").startswith("mlx-cuda")
        for distribution in importlib.metadata.distributions()
    )
