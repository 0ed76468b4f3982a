"""The Hub stand-in out of process: `StandInProcess` runs `python -m tests.hf_standin` as a
child, and `HubControl` drives its control endpoints (faults, the request log) over HTTP."""

from __future__ import annotations

import contextlib
import json
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final, Self, cast, final

from .faults import Fault, FaultKind
from .lifecycle import Running
from .state import RequestRecord, bytes_sent_in

PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


@final
class HubControl:
    """The control endpoints of a stand-in running elsewhere (e.g. `python -m tests.hf_standin`)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(cast(IO[bytes], response).read())
        except urllib.error.HTTPError as error:
            with error:
                raise RuntimeError(
                    f"{method} {path}: {error.code} {error.read().decode()}"
                ) from None

    def health(self) -> bool:
        return bool(cast(dict[str, Any], self._call("GET", "/_standin/health")).get("ok"))

    def inject(self, kind: FaultKind, **params: Any) -> int:
        answer = cast(
            dict[str, list[int]], self._call("POST", "/_standin/faults", {"kind": kind, **params})
        )
        return answer["ids"][0]

    def faults(self) -> list[Fault]:
        items = cast(list[dict[str, Any]], self._call("GET", "/_standin/faults"))
        return [Fault(**item) for item in items]

    def clear_faults(self) -> None:
        self._call("DELETE", "/_standin/faults")

    def remove_fault(self, fault_id: int) -> bool:
        return bool(
            cast(dict[str, Any], self._call("DELETE", f"/_standin/faults/{fault_id}"))["removed"]
        )

    def requests(self) -> list[RequestRecord]:
        log = cast(dict[str, Any], self._call("GET", "/_standin/log"))
        return [
            RequestRecord.from_json(item) for item in cast(list[dict[str, Any]], log["requests"])
        ]

    def bytes_sent(self, repo: str, filename: str) -> int:
        return bytes_sent_in(self.requests(), repo, filename)

    def clear_log(self) -> None:
        self._call("DELETE", "/_standin/log")


@final
class StandInProcess(Running):
    """`python -m tests.hf_standin` as a child process; `wrap` can prefix the command
    (e.g. `Host.command` to run it inside a network namespace)."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        wrap: Callable[[list[str]], list[str]] | None = None,
        ready_timeout: float = 30.0,
        bytes_per_second: int | None = None,
    ) -> None:
        self.root = root
        self._bytes_per_second = bytes_per_second
        self.host = host
        self.port = port
        self._wrap = wrap
        self._ready_timeout = ready_timeout
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> Self:
        argv = [
            sys.executable, "-m", "tests.hf_standin",
            "--root", str(self.root), "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        if self._bytes_per_second:
            argv += ["--bytes-per-second", str(self._bytes_per_second)]
        command = self._wrap(argv) if self._wrap is not None else argv
        self.process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        stdout = cast(IO[str], self.process.stdout)
        deadline = time.monotonic() + self._ready_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the Hub stand-in process did not come up")
            readable, _, _ = select.select([stdout], [], [], min(remaining, 0.5))
            if readable:
                line = stdout.readline()
                if line:
                    self.url = cast(dict[str, str], json.loads(line))["url"]
                    return self

    def control(self) -> HubControl:
        return HubControl(self.url)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
