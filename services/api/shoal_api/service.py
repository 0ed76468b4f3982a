"""`shoal api`: the node's HTTP front door, served by uvicorn until cancelled."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Generator
from typing import Final, final

import uvicorn
from fastapi import FastAPI
from shoal_shared.bus import Bus
from shoal_shared.follower import StateFollower
from shoal_shared.model_card import builtin_cards
from shoal_shared.node_identity import load_or_create_node_id
from shoal_shared.settings import NodeSettings

from shoal_api.app import create_app
from shoal_api.context import ApiContext
from shoal_api.nats_cluster import NatsCluster

logger = logging.getLogger(__name__)

# Streams still open at shutdown get this long before uvicorn cancels them (which cancels
# their tasks on the cluster).
GRACEFUL_SHUTDOWN_SECONDS: Final = 5
BACKGROUND_DRAIN_SECONDS: Final = 5.0
# uvicorn's default.
LISTEN_BACKLOG: Final = 2048


class ApiStartupError(RuntimeError):
    pass


@final
class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the process that runs it: `shoal run` stops
    its services by cancelling them, and uvicorn's own handlers would take Ctrl-C away."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: uvicorn exits the process when it cannot bind,
    and a service should report the error to its caller instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        # Listening now lets clients connect (and wait in the backlog) before uvicorn starts.
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise ApiStartupError(f"cannot serve the API on {host}:{port}: {error}") from error
    return listener


async def serve(
    app: FastAPI, listener: socket.socket, on_stop: Callable[[], None] | None = None
) -> None:
    """Serve `app` on `listener` until cancelled, then shut down gracefully and re-raise.
    `on_stop` runs first on cancellation, to end long responses (streams) promptly."""
    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=str(host),
        port=int(port),
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        # asyncio.wait, unlike awaiting the task, does not cancel it when we are cancelled:
        # uvicorn then gets to finish open responses and close its connections.
        await asyncio.wait({serving})
    except asyncio.CancelledError:
        if on_stop is not None:
            on_stop()
        server.should_exit = True
        await asyncio.wait({serving})
        raise
    finally:
        listener.close()
    serving.result()


def _report_follower_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("the state follower failed to start: %s", error)


async def run_api(settings: NodeSettings) -> None:
    """Serve the node's API until cancelled. Raises ApiStartupError when the port is taken,
    BusConnectError when the node's NATS server never answers."""
    node_id = load_or_create_node_id(settings.home)
    # Bind first: a taken port is reported at once, not after the bus connected.
    listener = bind_socket(settings.api_host, settings.api_port)
    try:
        bus = await Bus.connect(settings.nats_url, name=f"api-{node_id}")
    except BaseException:
        listener.close()
        raise
    follower = StateFollower(bus, node_id)
    context = ApiContext(NatsCluster(bus, follower, node_id), builtin_cards())
    # The follower waits for the election in the background so that /healthz answers
    # "starting" (503) meanwhile instead of the port staying closed.
    following = asyncio.create_task(follower.start(), name="api-follower-start")
    following.add_done_callback(_report_follower_failure)
    try:
        logger.info("api of node %s on %s:%d", node_id, settings.api_host, settings.api_port)
        await serve(
            create_app(context),
            listener,
            on_stop=lambda: context.abort_sessions("this node's API is shutting down"),
        )
    finally:
        following.cancel()
        await asyncio.wait({following})
        await follower.stop()
        await context.background.drain(BACKGROUND_DRAIN_SECONDS)
        await bus.close()
