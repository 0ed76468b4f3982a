"""A local stand-in for the Hugging Face Hub, with fault injection: `HubStandIn`, in process.

It serves the endpoints `huggingface_hub` uses to find and download model files (`hub_api`),
for repos that are plain directories `<root>/<org>/<name>/` on disk (`snapshots`), answering
errors as the Hub does (`handler`), with faults injected on demand (`faults`) and a log of the
requests it answered (`state`). To run it in its own process: `process.StandInProcess`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Self, final

from .faults import Fault, FaultKind
from .handler import StandInServer
from .lifecycle import Running
from .snapshots import RepoSnapshot
from .state import HubState, RequestRecord, bytes_sent_in


@final
class HubStandIn(Running):
    """The stand-in, served from a background thread: `with HubStandIn(root) as hub: hub.url`."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
        bytes_per_second: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.state = HubState(self.root, bytes_per_second)
        self._address = (host, port)
        self._verbose = verbose
        self._server: StandInServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = StandInServer(self._address, self.state, self._verbose)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="hf-standin",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join()
        server.cut_live_connections()
        server.server_close()
        self._server = None
        self._thread = None

    def _running(self) -> StandInServer:
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        return self._server

    @property
    def host(self) -> str:
        return str(self._running().server_address[0])

    @property
    def port(self) -> int:
        return int(self._running().server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # Repos

    def snapshot(self, repo_id: str) -> RepoSnapshot:
        snapshot = self.state.snapshot(repo_id)
        if snapshot is None:
            raise KeyError(f"no repo {repo_id} under {self.root}")
        return snapshot

    def commit_sha(self, repo_id: str) -> str:
        return self.snapshot(repo_id).sha

    # Log

    @property
    def requests(self) -> list[RequestRecord]:
        return self.state.requests()

    def bytes_sent(self, repo: str, filename: str) -> int:
        """Body bytes written for GETs of that file, over all requests."""
        return bytes_sent_in(self.state.requests(), repo, filename)

    def clear_log(self) -> None:
        self.state.clear_log()

    # Faults

    def inject(self, kind: FaultKind, **params: Any) -> int:
        """Add a fault (fields of `Fault`); returns its id."""
        return self.state.inject(Fault.from_json({"kind": kind, **params}))

    def drop(
        self,
        filename: str,
        after_bytes: int,
        *,
        repo: str | None = None,
        times: int | None = 1,
        reset: bool = False,
    ) -> int:
        return self.inject(
            "drop", filename=filename, after_bytes=after_bytes, repo=repo, times=times, reset=reset
        )

    def corrupt(
        self,
        filename: str,
        *,
        offset: int | None = None,
        repo: str | None = None,
        times: int | None = 1,
    ) -> int:
        return self.inject("corrupt", filename=filename, offset=offset, repo=repo, times=times)

    def rate_limit(
        self,
        *,
        times: int | None = 1,
        retry_after: int = 1,
        repo: str | None = None,
        filename: str | None = None,
        method: str | None = None,
    ) -> int:
        return self.inject(
            "rate_limit",
            times=times,
            retry_after=retry_after,
            repo=repo,
            filename=filename,
            method=method,
        )

    def require_token(
        self, token: str, *, repo: str | None = None, times: int | None = None
    ) -> int:
        return self.inject("unauthorized", token=token, repo=repo, times=times)

    def remove_fault(self, fault_id: int) -> bool:
        return self.state.remove_fault(fault_id)

    def clear_faults(self) -> None:
        self.state.clear_faults()

    @property
    def faults(self) -> list[Fault]:
        return self.state.faults()
