"""The runner subprocess: `python -m shoal_worker.runner.main --socket-fd N --spec JSON`.

The worker spawns it (never forks it) with one end of a socketpair. A reader thread turns
incoming lines into engine calls; the main thread loads the model and generates, since MLX
work belongs on one thread. Writes from both threads go through one lock so lines never
interleave. The runner exits on Shutdown or as soon as the socket closes, which is what
happens when the worker dies: there are no orphan runners holding a model in memory.

With world_size > 1 the runner first joins its ring group (status `connecting`), then loads
its shard. Every failure of the group (a neighbour that never comes, a peer lost or stalled
mid-generation) ends the runner with a `failed` status and exit code 1: the worker restarts
groups as a whole, and a rank must never wait forever.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, final

from shoal_shared.runner_status import RunnerConnecting, RunnerFailed, RunnerShutDown

from shoal_worker.runner.distributed import RingFormationError, join_ring, spec_problem
from shoal_worker.runner.engine import GenerationEngine, LoadInterruptedError
from shoal_worker.runner.lockstep import GroupBrokenError, RingLockstep, Watchdog
from shoal_worker.runner.mlx_bindings import LoadedModel, load_lazily, read_model_config
from shoal_worker.runner.pipeline import load_pipeline_shard, pipeline_problem
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
from shoal_worker.runner.tensor import load_tensor_shard, tensor_problem

logger = logging.getLogger("shoal_worker.runner")

_EXIT_FAILED: Final = 1


@final
class WorkerConnection:
    """The runner's end of the socketpair: locked line writes, a reader thread for commands."""

    def __init__(self, connection: socket.socket) -> None:
        self._socket = connection
        self._write_lock = threading.Lock()
        self._closed = False
        # Set on Shutdown or end of stream: lets waits outside the engine (joining the ring
        # group) give up early.
        self.stopping = threading.Event()

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
            self.stopping.set()
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
                self.stopping.set()
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


def model_problem(spec: RunnerSpec) -> str | None:
    """Why this model cannot be sharded as the spec asks, before any peer is waited for."""
    if spec.world_size == 1:
        return None
    try:
        config = read_model_config(Path(spec.model_dir))
    except (OSError, ValueError) as error:
        return f"cannot read the model's config.json: {error}"
    if spec.sharding == "tensor":
        return tensor_problem(config, spec.world_size)
    return pipeline_problem(config)


def fail(connection: WorkerConnection, reason: str) -> int:
    logger.error("runner failed: %s", reason)
    connection.send(StatusUpdate(status=RunnerFailed(reason=reason)))
    return _EXIT_FAILED


def fail_and_exit_now(connection: WorkerConnection, reason: str) -> None:
    """For the watchdog: the main thread is stuck in MLX, so exit from under it."""
    fail(connection, reason)
    logging.shutdown()
    os._exit(_EXIT_FAILED)


def join_group(
    spec: RunnerSpec, connection: WorkerConnection
) -> tuple[RingLockstep, Callable[[Path], LoadedModel]]:
    """Form the ring group; the lockstep for the engine and the loader of this rank's shard."""
    connection.send(StatusUpdate(status=RunnerConnecting()))
    group = join_ring(spec, abort=connection.stopping)
    logger.info("rank %d of %d joined the ring group", group.rank(), group.size())
    watchdog = Watchdog(functools.partial(fail_and_exit_now, connection))
    lockstep = RingLockstep(
        group,
        watchdog,
        step_timeout_s=spec.step_timeout_s,
        peer_load_timeout_s=spec.peer_load_timeout_s,
    )
    if spec.sharding == "tensor":
        return lockstep, functools.partial(load_tensor_shard, group=group)
    loader = functools.partial(
        load_pipeline_shard, start_layer=spec.start_layer, end_layer=spec.end_layer, group=group
    )
    return lockstep, loader


def run(spec: RunnerSpec, connection: WorkerConnection) -> int:
    engine = GenerationEngine(connection.send)
    # Reading from the start: a Shutdown may come while the runner waits for its group, and
    # requests that arrive before the model is ready wait in the engine's queue.
    reader = threading.Thread(
        target=connection.read_commands_into, args=(engine,), name="worker-reader", daemon=True
    )
    reader.start()
    problem = spec_problem(spec) or model_problem(spec)
    if problem is not None:
        return fail(connection, problem)
    loader: Callable[[Path], LoadedModel] = load_lazily
    if spec.world_size > 1:
        try:
            lockstep, loader = join_group(spec, connection)
        except RingFormationError as error:
            if connection.stopping.is_set():
                connection.send(StatusUpdate(status=RunnerShutDown()))
                return 0
            return fail(connection, f"could not join the ring group: {error}")
        engine.join_group(lockstep)
    try:
        engine.load(Path(spec.model_dir), loader)
    except LoadInterruptedError:
        logger.info("runner %s stopped while loading", spec.runner_id)
        connection.send(StatusUpdate(status=RunnerShutDown()))
        return 0
    except GroupBrokenError as error:
        return fail(connection, str(error))
    except Exception as error:
        logger.exception("runner %s could not load %s", spec.runner_id, spec.model_dir)
        return fail(connection, f"loading failed: {error}")
    try:
        engine.serve_forever()
    except GroupBrokenError as error:
        return fail(connection, str(error))
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
