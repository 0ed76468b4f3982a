"""The runner subprocess: `python -m shoal_worker.runner.main --socket-fd N --spec JSON`.

The worker spawns it (never forks it) with one end of a socketpair. A reader thread turns
incoming lines into engine calls; the main thread loads the model and generates, since MLX
work belongs on one thread. Writes from both threads go through one lock so lines never
interleave. The runner exits on Shutdown or as soon as the socket closes, which is what
happens when the worker dies: there are no orphan runners holding a model in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Final, final

from shoal_shared.runner_status import RunnerFailed, RunnerShutDown

from shoal_worker.runner.engine import GenerationEngine, LoadInterruptedError
from shoal_worker.runner.protocol import (
    Cancel,
    Generate,
    RunnerMessage,
    RunnerSpec,
    Shutdown,
    StatusUpdate,
    decode_worker_message,
    encode_message,
)

logger = logging.getLogger("shoal_worker.runner")

_EXIT_FAILED: Final = 1


@final
class WorkerConnection:
    """The runner's end of the socketpair: locked line writes, a reader thread for commands."""

    def __init__(self, connection: socket.socket) -> None:
        self._socket = connection
        self._write_lock = threading.Lock()
        self._closed = False

    def send(self, message: RunnerMessage) -> None:
        line = encode_message(message)
        with self._write_lock:
            if self._closed:
                return
            try:
                self._socket.sendall(line)
            except OSError:
                # The worker is gone; the reader sees the same and shuts the engine down.
                self._closed = True

    def read_commands_into(self, engine: GenerationEngine) -> None:
        """Dispatch each incoming message to the engine; shut it down at end of stream."""
        try:
            with self._socket.makefile("rb") as lines:
                for line in lines:
                    self._dispatch(engine, line)
        except OSError:
            pass
        finally:
            engine.request_shutdown()

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
        # Shutting down (not just closing) wakes the reader thread blocked in a read.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def _dispatch(self, engine: GenerationEngine, line: bytes) -> None:
        try:
            message = decode_worker_message(line)
        except ValueError:
            logger.exception("ignoring a malformed message from the worker: %r", line[:200])
            return
        match message:
            case Generate():
                engine.submit(message)
            case Cancel():
                engine.cancel(message.task_id)
            case Shutdown():
                engine.request_shutdown()


def log_blas_libraries() -> None:
    """Say which BLAS the process mapped: the CPU backend's speed hangs on it (DESIGN §7)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return  # not Linux: MLX uses Accelerate or Metal there
    libraries = sorted(
        {line.split()[-1] for line in maps.splitlines() if "blas" in line.rsplit("/", 1)[-1]}
    )
    logger.info("BLAS libraries mapped: %s", ", ".join(libraries) or "none")


def parse_arguments(argv: list[str]) -> tuple[int, RunnerSpec]:
    parser = argparse.ArgumentParser(prog="shoal_worker.runner.main")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--spec", required=True, help="the RunnerSpec as JSON")
    arguments = parser.parse_args(argv)
    socket_fd: int = arguments.socket_fd
    spec_json: str = arguments.spec
    return socket_fd, RunnerSpec.model_validate_json(spec_json)


def run(spec: RunnerSpec, connection: WorkerConnection) -> int:
    engine = GenerationEngine(connection.send)
    reader = threading.Thread(
        target=connection.read_commands_into, args=(engine,), name="worker-reader", daemon=True
    )
    reader.start()
    if spec.world_size != 1 or spec.start_layer != 0 or spec.end_layer != spec.layer_count:
        reason = "sharded runners (world_size > 1 or a partial layer range) are not supported yet"
        connection.send(StatusUpdate(status=RunnerFailed(reason=reason)))
        return _EXIT_FAILED
    try:
        engine.load(Path(spec.model_dir))
    except LoadInterruptedError:
        logger.info("runner %s stopped while loading", spec.runner_id)
        connection.send(StatusUpdate(status=RunnerShutDown()))
        return 0
    except Exception as error:
        logger.exception("runner %s could not load %s", spec.runner_id, spec.model_dir)
        connection.send(StatusUpdate(status=RunnerFailed(reason=f"loading failed: {error}")))
        return _EXIT_FAILED
    engine.serve_forever()
    connection.send(StatusUpdate(status=RunnerShutDown()))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s runner %(levelname)s %(message)s"
    )
    # The runner shares the worker's process group, so a terminal's Ctrl-C reaches it too;
    # the worker decides when its runners stop (Shutdown, or the socket closing).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    socket_fd, spec = parse_arguments(sys.argv[1:] if argv is None else argv)
    connection = WorkerConnection(socket.socket(fileno=socket_fd))
    log_blas_libraries()
    try:
        return run(spec, connection)
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(main())
