"""The Hub stand-in's HTTP server: `StandInServer`, and its request handler.

Hub requests (see `hub_api`) go through, in order: the rate_limit faults, the token check, the
repo and revision lookup. Errors are answered the way the Hub answers them (see
`hf_raise_for_status`):

    missing repo           404 X-Error-Code: RepoNotFound      -> RepositoryNotFoundError
    missing revision       404 X-Error-Code: RevisionNotFound  -> RevisionNotFoundError
    missing file           404 X-Error-Code: EntryNotFound     -> RemoteEntryNotFoundError
    private, no token      401 X-Error-Code: RepoNotFound      -> RepositoryNotFoundError (401)
    private, wrong token   401 X-Error-Message: Invalid credentials in Authorization header
                                                               -> HfHubHTTPError (401)

File bodies (`/resolve`) are where the drop and corrupt faults act (see `faults`).

Control endpoints (never logged, never faulted): `GET /_standin/log`, `DELETE /_standin/log`,
`GET|POST|DELETE /_standin/faults`, `DELETE /_standin/faults/{id}`, `GET /_standin/health`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from .faults import Fault
from .hub_api import match_route, model_info, paths_info, requested_range, tree_entries, truthy
from .snapshots import CHUNK_BYTES, MAIN_REVISION, RepoSnapshot, private_repos, valid_repo_path
from .state import Exchange, HubState

INVALID_CREDENTIALS: Final = "Invalid credentials in Authorization header"
_IDLE_CONNECTION_SECONDS: Final = 60.0


class StandInServer(ThreadingHTTPServer):
    """Serves a `HubState`; keeps its live connections, to cut them when it stops."""

    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], state: HubState, verbose: bool) -> None:
        self.state = state
        self.verbose = verbose
        self.live: set[socket.socket] = set()
        self.to_reset: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def shutdown_request(self, request: Any) -> None:
        connection = cast(socket.socket, request)
        with self.live_lock:
            reset = connection in self.to_reset
            self.to_reset.discard(connection)
        if reset:
            # No FIN first: closing with SO_LINGER 0 sends an RST.
            self.close_request(connection)
        else:
            super().shutdown_request(connection)

    def cut_live_connections(self) -> None:
        with self.live_lock:
            connections = list(self.live)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_CONNECTION_SECONDS

    @property
    def hub(self) -> StandInServer:
        return cast(StandInServer, self.server)

    @property
    def state(self) -> HubState:
        return self.hub.state

    def setup(self) -> None:
        super().setup()
        with self.hub.live_lock:
            self.hub.live.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.hub.live_lock:
            self.hub.live.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.hub.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # Plumbing

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        exchange = Exchange(
            method=method,
            path=split.path,
            query=split.query,
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization") is not None,
        )
        try:
            body = self._read_body()
            if split.path.startswith("/_standin/"):
                exchange.control = True
                self._control(exchange, body)
            else:
                self._hub(exchange, parse_qs(split.query), body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.state.mark_broken(exchange)
            self.close_connection = True
        except Exception:
            # A bug in the stand-in: answer 500 if nothing went out yet; the traceback is printed.
            self.close_connection = True
            if exchange.status == 0:
                self._error(exchange, 500, "Hub stand-in error")
            raise
        finally:
            self.state.begin(exchange)  # no-op unless it broke before answering

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _respond(
        self,
        exchange: Exchange,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        exchange.status = status
        self.state.begin(exchange)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if exchange.method != "HEAD" and body:
            self.state.count_bytes(exchange, len(body), complete=True)
            self.wfile.write(body)

    def _json(
        self,
        exchange: Exchange,
        value: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._respond(exchange, status, json.dumps(value).encode(), headers)

    def _error(
        self,
        exchange: Exchange,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code is not None:
            extra["X-Error-Code"] = code
        self._json(exchange, {"error": message}, status, extra)

    # Control

    def _control(self, exchange: Exchange, body: bytes) -> None:
        path = exchange.path.rstrip("/")
        method = exchange.method
        try:
            if path == "/_standin/health" and method == "GET":
                self._json(exchange, {"ok": True, "root": str(self.state.root)})
            elif path == "/_standin/log" and method == "GET":
                self._json(exchange, self.state.log_json())
            elif path == "/_standin/log" and method == "DELETE":
                self.state.clear_log()
                self._json(exchange, {"ok": True})
            elif path == "/_standin/faults" and method == "GET":
                self._json(exchange, [fault.to_json() for fault in self.state.faults()])
            elif path == "/_standin/faults" and method == "POST":
                data: Any = json.loads(body or b"null")
                items = cast(list[Any], data) if isinstance(data, list) else [data]
                faults = [Fault.from_json(cast(dict[str, Any], item)) for item in items]
                self._json(exchange, {"ids": [self.state.inject(fault) for fault in faults]})
            elif path == "/_standin/faults" and method == "DELETE":
                self.state.clear_faults()
                self._json(exchange, {"ok": True})
            elif path.startswith("/_standin/faults/") and method == "DELETE":
                removed = self.state.remove_fault(int(path.rsplit("/", 1)[1]))
                self._json(exchange, {"removed": removed})
            else:
                self._error(exchange, 404, f"no control endpoint {method} {path}")
        except (ValueError, TypeError, AttributeError) as error:
            self._error(exchange, 400, f"bad control request: {error}")

    # The Hub

    def _hub(self, exchange: Exchange, query: Mapping[str, list[str]], body: bytes) -> None:
        method = exchange.method
        route = match_route(method, exchange.path)
        if route is None:
            if exchange.path.startswith("/api/"):
                self._error(exchange, 404, "Repository not found", "RepoNotFound")
            else:
                self._error(exchange, 404, f"no such endpoint {method} {exchange.path}")
            return
        repo_id = route.repo_id
        exchange.repo = repo_id
        if route.name == "resolve":
            exchange.filename = route.path

        limited = self.state.take_rate_limit(repo_id, exchange.filename, method)
        if limited is not None:
            exchange.fault = "rate_limit"
            self._error(
                exchange,
                429,
                "You have been rate-limited by the Hub stand-in",
                headers={"Retry-After": str(limited.retry_after)},
            )
            return

        snapshot = self.state.snapshot(repo_id)
        problem = self.state.check_token(
            repo_id, exchange.filename, method, self.headers.get("Authorization")
        )
        if problem is not None:
            exchange.fault = "unauthorized"
            if problem == "missing":
                self._error(exchange, 401, "Repository not found", "RepoNotFound")
            else:
                self._error(exchange, 401, INVALID_CREDENTIALS)
            return
        if snapshot is None:
            self._error(exchange, 404, "Repository not found", "RepoNotFound")
            return
        if route.revision not in (MAIN_REVISION, snapshot.sha):
            self._error(
                exchange,
                404,
                f"Invalid rev id: {route.revision}",
                "RevisionNotFound",
            )
            return
        if route.name == "model":
            private = snapshot.repo_id in private_repos(self.state.root)
            info = model_info(snapshot, private=private, blobs=truthy(query, "blobs"))
            self._json(exchange, info)
        elif route.name == "tree":
            folder = route.path.strip("/")
            entries = tree_entries(snapshot, folder, recursive=truthy(query, "recursive"))
            if entries is None:
                self._error(exchange, 404, f"Path {folder} not found in the repo", "EntryNotFound")
            else:
                self._json(exchange, entries)
        elif route.name == "paths-info":
            content_type = self.headers.get("Content-Type") or ""
            self._json(exchange, paths_info(snapshot, body, content_type))
        else:
            self._resolve(exchange, snapshot, route.path)

    def _resolve(self, exchange: Exchange, snapshot: RepoSnapshot, path: str) -> None:
        commit = {"X-Repo-Commit": snapshot.sha}
        info = snapshot.files.get(path) if valid_repo_path(path) else None
        if info is None:
            self._error(exchange, 404, "Entry not found", "EntryNotFound", commit)
            return
        size = info.size
        headers = {**commit, "ETag": f'"{info.etag}"', "Accept-Ranges": "bytes"}
        if info.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{info.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end = 0, size - 1
        status = 200
        requested = self.headers.get("Range")
        if requested is not None and exchange.method == "GET":
            asked = requested_range(requested, size)
            if asked is not None:
                start, end = asked
                if start > end or start >= size:
                    self._error(
                        exchange,
                        416,
                        "Requested range not satisfiable",
                        headers={**headers, "Content-Range": f"bytes */{size}"},
                    )
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        drop: Fault | None = None
        corrupt_at: int | None = None
        if exchange.method == "GET":
            drop, corrupt_at = self.state.take_body_faults(
                snapshot.repo_id, path, start, length, size
            )
        faults = [
            name for name, fault in (("corrupt", corrupt_at), ("drop", drop)) if fault is not None
        ]
        exchange.fault = "+".join(faults) or None
        exchange.status = status
        exchange.complete = exchange.method == "HEAD" or length == 0
        self.state.begin(exchange)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if exchange.method == "HEAD":
            return
        limit = drop.after_bytes if drop is not None else length
        sent = 0
        with (snapshot.directory / path).open("rb") as stream:
            stream.seek(start)
            while sent < limit:
                chunk = stream.read(min(CHUNK_BYTES, limit - sent))
                if not chunk:
                    break
                position = start + sent
                if corrupt_at is not None and position <= corrupt_at < position + len(chunk):
                    flipped = bytearray(chunk)
                    flipped[corrupt_at - position] ^= 0xFF
                    chunk = bytes(flipped)
                sent += len(chunk)
                self.state.count_bytes(exchange, len(chunk), complete=sent == length)
                self.wfile.write(chunk)
                if self.state.bytes_per_second:
                    time.sleep(len(chunk) / self.state.bytes_per_second)
        if sent < length:
            self.state.mark_broken(exchange)
            self.close_connection = True
            if drop is not None and drop.reset:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                with self.hub.live_lock:
                    self.hub.to_reset.add(self.connection)
