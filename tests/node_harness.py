"""Real nodes for cross-service tests: `shoal run` as a subprocess with its own home and ports."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import IO, Any, Final, final

import httpx
import psutil

READY_TIMEOUT_SECONDS: Final = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@final
class RunningNode:
    def __init__(self, home: Path, *extra_arguments: str, mdns: bool = False) -> None:
        self.home = home
        self.mdns = mdns
        self.api_port = free_port()
        self.nats_port = free_port()
        self.leaf_port = free_port()
        self._extra_arguments = extra_arguments
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "the node was not started"
        return self._process

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = (self.home / "node.out").open("ab")
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")
        }
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal",
                "run",
                "--home",
                str(self.home),
                "--api-host",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
                "--nats-port",
                str(self.nats_port),
                "--leaf-port",
                str(self.leaf_port),
                # Tests never send mDNS out of the host's real interfaces; multi-host tests
                # run nodes in their own network namespaces instead.
                *(() if self.mdns else ("--no-mdns",)),
                *self._extra_arguments,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            # Its own group, so a test's cleanup can reach every descendant.
            start_new_session=True,
        )

    def output(self) -> str:
        path = self.home / "node.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=timeout)

    def state(self) -> dict[str, Any]:
        response = self.get("/state")
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    def wait_until(
        self, description: str, timeout: float, check: Callable[["RunningNode"], bool]
    ) -> None:
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the node exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                if check(self):
                    return
            except (httpx.HTTPError, KeyError, ValueError) as error:
                last_error = repr(error)
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {description} ({last_error}):\n{self.tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        self.wait_until("a ready instance", timeout, lambda node: node.ready_runner_count() > 0)

    def ready_runner_count(self) -> int:
        runners: dict[str, Any] = self.state()["runners"]
        return sum(1 for runner in runners.values() if runner["status"]["status"] == "ready")

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    def find_descendant(self, needle: str) -> psutil.Process | None:
        for child in self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                if needle in " ".join(child.cmdline()):
                    return child
        return None

    def descendant(self, needle: str) -> psutil.Process:
        found = self.find_descendant(needle)
        assert found is not None, f"no process of this node runs {needle!r}"
        return found

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> int:
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Nothing of the node may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
        return process.returncode


@contextlib.contextmanager
def started_node(
    home: Path, *arguments: str, until: Callable[[RunningNode], None] = RunningNode.wait_ready
) -> Generator[RunningNode]:
    """A node started in `home`, handed over once `until` returns; it must stop cleanly."""
    running = RunningNode(home, *arguments)
    running.start()
    try:
        until(running)
        yield running
    finally:
        returncode = running.stop()
        assert returncode in (0, -signal.SIGTERM), running.tail()
