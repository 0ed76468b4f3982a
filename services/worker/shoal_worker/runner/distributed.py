"""Forming the `mx.distributed` ring group that the runners of one instance share.

MLX's ring backend connects each rank to its two neighbours (rank r accepts from r-1 and
connects to r+1, modulo the group size) on the "ip:port" addresses of a JSON hostfile named by
`MLX_HOSTFILE`, with its own rank in `MLX_RANK`. `mx.distributed.init` holds the GIL while it
waits, and waits forever for a neighbour that never comes, so no thread of ours could report
anything meanwhile (DESIGN §7). Hence a rendezvous in Python first, on the very same ports:
each rank listens on its own address, connects to its right neighbour, and both sides check
each other's hello (same group, expected rank, contiguous layers) under a deadline that ends
in a clear failure. Each side closes its sockets before MLX binds the ports, and only then
does the rank call into MLX, which finds every neighbour present. For the sliver of time in
which a neighbour could still die between the two, `faulthandler` (a C thread that needs no
GIL) ends the process if the MLX handshake outlives its deadline.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast, final

import mlx.core as mx

from shoal_worker.runner.protocol import RunnerSpec

logger = logging.getLogger(__name__)

# MLX retries its own connects for about 15 s (5 attempts, doubling from 1 s): once the
# rendezvous saw every neighbour, the MLX handshake gets that long plus a margin.
_MLX_INIT_TIMEOUT_S: Final = 30.0
_CONNECT_RETRY_S: Final = 0.2
# How often the accepting thread looks up from accept() to see whether it should give up.
_ACCEPT_POLL_S: Final = 0.2
# A connection that says nothing for this long is not a peer (they speak at once).
_HELLO_READ_TIMEOUT_S: Final = 5.0
_MAX_HELLO_BYTES: Final = 4096


class RingFormationError(Exception):
    """The ring group could not be formed; the message says why, for the failed status."""


def spec_problem(spec: RunnerSpec) -> str | None:
    """Why a spec cannot be served, judged from the spec alone, or None."""
    if spec.rank >= spec.world_size:
        return f"rank {spec.rank} is out of range for world_size {spec.world_size}"
    if not spec.start_layer < spec.end_layer <= spec.layer_count:
        return (
            f"the layer range [{spec.start_layer}, {spec.end_layer}) does not fit"
            f" {spec.layer_count} layers"
        )
    full_range = spec.start_layer == 0 and spec.end_layer == spec.layer_count
    if spec.world_size == 1:
        return None if full_range else "a single runner must hold every layer"
    if len(spec.ring_hosts) != spec.world_size:
        return (
            f"ring_hosts lists {len(spec.ring_hosts)} addresses for world_size"
            f" {spec.world_size}: a sharded runner is not supported without one ring"
            " address per rank"
        )
    for address in spec.ring_hosts:
        if _split_address(address) is None:
            return f"ring host {address!r} is not of the form ip:port"
    if spec.sharding == "tensor" and not full_range:
        return "tensor sharding gives every rank every layer, but this rank has a partial range"
    return None


def group_fingerprint(spec: RunnerSpec) -> str:
    """What every rank of one group agrees on: a peer with another value is someone else's."""
    identity = [spec.sharding, spec.world_size, spec.layer_count, list(spec.ring_hosts)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def join_ring(spec: RunnerSpec, *, abort: threading.Event | None = None) -> mx.distributed.Group:
    """Rendezvous with the neighbours, then form the MLX ring group; RingFormationError if not.

    Setting `abort` (the worker said Shutdown) ends the wait for neighbours early.
    """
    deadline = time.monotonic() + spec.connect_timeout_s
    _rendezvous(spec, deadline, abort or threading.Event())
    hostfile = _write_hostfile(spec.ring_hosts)
    # MLX reads both from the environment during init; this process is the runner of one
    # rank, so setting them process-wide is exactly their scope.
    os.environ["MLX_HOSTFILE"] = str(hostfile)
    os.environ["MLX_RANK"] = str(spec.rank)
    logger.info("rank %d: neighbours present, forming the MLX ring", spec.rank)
    faulthandler.dump_traceback_later(_MLX_INIT_TIMEOUT_S, exit=True)
    try:
        # strict: without it a misconfigured rank silently becomes a group of one.
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as error:
        raise RingFormationError(f"MLX could not form the ring group: {error}") from error
    finally:
        faulthandler.cancel_dump_traceback_later()
        hostfile.unlink(missing_ok=True)
    if group.size() != spec.world_size or group.rank() != spec.rank:
        raise RingFormationError(
            f"MLX formed a group of {group.size()} with this process as rank {group.rank()},"
            f" not {spec.world_size} with rank {spec.rank}"
        )
    return group


def _write_hostfile(ring_hosts: tuple[str, ...]) -> Path:
    # One list of addresses per rank: MLX can use several connections per neighbour, but
    # one is what a runner needs.
    descriptor, name = tempfile.mkstemp(prefix="shoal-ring-", suffix=".json")
    with os.fdopen(descriptor, "w") as hostfile:
        json.dump([[address] for address in ring_hosts], hostfile)
    return Path(name)


def _split_address(address: str) -> tuple[str, int] | None:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _address(address: str) -> tuple[str, int]:
    split = _split_address(address)
    if split is None:
        raise RingFormationError(f"ring host {address!r} is not of the form ip:port")
    return split


@final
@dataclass(frozen=True, slots=True)
class _Hello:
    """What a rank tells its right neighbour, and checks about its left one."""

    fingerprint: str
    rank: int
    start_layer: int
    end_layer: int

    def encode(self) -> bytes:
        fields = [self.fingerprint, self.rank, self.start_layer, self.end_layer]
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> _Hello | None:
        try:
            fields = cast("object", json.loads(line))
        except ValueError:
            return None
        if not isinstance(fields, list) or len(cast("list[object]", fields)) != 4:
            return None
        fingerprint, rank, start_layer, end_layer = cast("list[object]", fields)
        if not isinstance(fingerprint, str):
            return None
        if not (isinstance(rank, int) and isinstance(start_layer, int)):
            return None
        if not isinstance(end_layer, int):
            return None
        return cls(fingerprint, rank, start_layer, end_layer)


def _rendezvous(spec: RunnerSpec, deadline: float, abort: threading.Event) -> None:
    right = (spec.rank + 1) % spec.world_size
    mine = _Hello(group_fingerprint(spec), spec.rank, spec.start_layer, spec.end_layer)
    try:
        listener = socket.create_server(_address(spec.ring_hosts[spec.rank]))
    except OSError as error:
        address = spec.ring_hosts[spec.rank]
        raise RingFormationError(f"cannot listen on ring address {address}: {error}") from error
    acceptor = _LeftNeighbourAcceptor(listener, spec, deadline, abort)
    thread = threading.Thread(target=acceptor.run, name="ring-rendezvous", daemon=True)
    thread.start()
    try:
        _greet_right_neighbour(spec.ring_hosts[right], right, mine, deadline, abort)
    except RingFormationError as error:
        acceptor.stop()
        if acceptor.rejected is None:
            raise
        # The left neighbour was turned away too: that says more than a timeout would.
        left = (spec.rank - 1) % spec.world_size
        raise RingFormationError(
            f"{error}; and rank {left} was turned away: {acceptor.rejected}"
        ) from error
    except BaseException:
        acceptor.stop()
        raise
    finally:
        # After a successful greeting, wait for the left neighbour until the deadline.
        thread.join(max(0.0, deadline - time.monotonic()) + 2 * _ACCEPT_POLL_S)
        listener.close()
    if acceptor.failure is not None:
        raise RingFormationError(acceptor.failure)
    if not acceptor.done:
        raise RingFormationError(f"rank {spec.rank} timed out waiting for its left neighbour")


def _greet_right_neighbour(
    address: str, right: int, mine: _Hello, deadline: float, abort: threading.Event
) -> None:
    """Connect (retrying until the deadline), say hello, and wait for the neighbour's ok.

    Its ok also means its listener is closed, so MLX can bind that port next.
    """
    last_error: OSError | None = None
    while (remaining := deadline - time.monotonic()) > 0:
        if abort.is_set():
            raise RingFormationError("stopped while waiting for the ring neighbours")
        try:
            with socket.create_connection(_address(address), timeout=remaining) as connection:
                connection.sendall(mine.encode())
                reply = _read_line(connection)
        except OSError as error:
            last_error = error
            abort.wait(min(_CONNECT_RETRY_S, max(0.0, deadline - time.monotonic())))
            continue
        if reply == b"ok":
            return
        if not reply:
            # Closed without a word (it timed out reading our hello, say): try again.
            abort.wait(min(_CONNECT_RETRY_S, max(0.0, deadline - time.monotonic())))
            continue
        raise RingFormationError(f"rank {right} at {address} refused this rank: {reply.decode()}")
    raise RingFormationError(
        f"rank {right} at {address} did not answer within the connect deadline"
        f" (last error: {last_error})"
    )


@final
class _LeftNeighbourAcceptor:
    """Accepts the left neighbour's hello on this rank's own ring address."""

    def __init__(
        self, listener: socket.socket, spec: RunnerSpec, deadline: float, abort: threading.Event
    ) -> None:
        self._listener = listener
        self._spec = spec
        self._deadline = deadline
        self._left = (spec.rank - 1) % spec.world_size
        self._abort = abort
        self._stopped = threading.Event()
        self.done = False
        self.failure: str | None = None
        # Why the last connection was turned away, if one was.
        self.rejected: str | None = None

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        # A stray or stale connection is turned away and the wait goes on: the right peer
        # may still come before the deadline.
        while (remaining := self._deadline - time.monotonic()) > 0:
            if self._stopped.is_set() or self._abort.is_set():
                return
            self._listener.settimeout(min(remaining, _ACCEPT_POLL_S))
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with connection:
                connection.settimeout(_HELLO_READ_TIMEOUT_S)
                try:
                    hello = _Hello.decode(_read_line(connection))
                except OSError:
                    continue
                rejected = self.rejected = self._problem_with(hello)
                # Close the listener before saying ok: MLX binds this port next. (Should the
                # ok not arrive, the neighbour times out and reports failed.)
                if rejected is None:
                    self._listener.close()
                    self.done = True
                with contextlib.suppress(OSError):
                    connection.sendall((rejected or "ok").encode() + b"\n")
                if self.done:
                    return
        left = self._spec.ring_hosts[self._left]
        self.failure = (
            f"rank {self._left} (at {left}) did not connect within the connect deadline"
            if self.rejected is None
            else f"no valid hello from rank {self._left} (at {left}): {self.rejected}"
        )

    def _problem_with(self, hello: _Hello | None) -> str | None:
        spec = self._spec
        if hello is None:
            return "malformed hello"
        if hello.fingerprint != group_fingerprint(spec):
            return "a peer of another group (sharding, world size, layers or hosts differ)"
        if hello.rank != self._left:
            return f"expected rank {self._left} as left neighbour, got rank {hello.rank}"
        if spec.sharding == "pipeline":
            # Around the ring the layer ranges must tile [0, layer_count) in rank order.
            expected_end = spec.start_layer if spec.rank > 0 else spec.layer_count
            if hello.end_layer != expected_end or (spec.rank == 0 and spec.start_layer != 0):
                return (
                    f"rank {hello.rank} holds layers [{hello.start_layer}, {hello.end_layer})"
                    f" and rank {spec.rank} [{spec.start_layer}, {spec.end_layer}):"
                    " the pipeline ranges are not contiguous"
                )
        return None


def _read_line(connection: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\n") and len(received) < _MAX_HELLO_BYTES:
        chunk = connection.recv(_MAX_HELLO_BYTES)
        if not chunk:
            break
        received += chunk
    return received.strip()
