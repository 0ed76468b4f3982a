"""A local stand-in for the Hugging Face Hub, with fault injection.

Serves the endpoints `huggingface_hub` uses to find and download model files, for repos that
are plain directories `<root>/<org>/<name>/` on disk:

    GET  /api/models/{org}/{name}[/revision/{rev}]          model_info / repo_info
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]       list_repo_tree / list_repo_files
    POST /api/models/{org}/{name}/paths-info/{rev}          get_paths_info
    HEAD /{org}/{name}/resolve/{rev}/{path}                 get_hf_file_metadata
    GET  /{org}/{name}/resolve/{rev}/{path}                 http_get (Range: bytes=N- resumes)

A repo has one revision: "main", whose commit sha is a hash of its file list and contents. Files
named like weights (`*.safetensors`, ...) are LFS files: their ETag is the sha256 of the content.
No `X-Xet-*` header is ever sent, so `huggingface_hub` downloads over plain HTTP.

Errors are answered the way the Hub answers them (see `hf_raise_for_status`):

    missing repo           404 X-Error-Code: RepoNotFound      -> RepositoryNotFoundError
    missing revision       404 X-Error-Code: RevisionNotFound  -> RevisionNotFoundError
    missing file           404 X-Error-Code: EntryNotFound     -> RemoteEntryNotFoundError
    private, no token      401 X-Error-Code: RepoNotFound      -> RepositoryNotFoundError (401)
    private, wrong token   401 X-Error-Message: Invalid credentials in Authorization header
                                                               -> HfHubHTTPError (401)

Faults (`HubStandIn.inject`, or `POST /_standin/faults` with the same fields as JSON):

    drop          filename, after_bytes, reset=False   the body of a GET stops after `after_bytes`
                                                       bytes and the connection is closed (FIN;
                                                       with reset, an RST)
    corrupt       filename, offset=None                one byte of a GET body (at file offset
                                                       `offset`, default the middle) is flipped;
                                                       ETag and sha256 stay the real ones
    rate_limit    retry_after=1, filename/method opt.  429 with Retry-After
    unauthorized  token                                the repo (or every repo) needs
                                                       `Authorization: Bearer <token>`

Every fault takes `repo` (None: any repo) and `times` (how many times it fires; None: until it
is removed). drop/corrupt fire only on GETs whose body they actually cut or change.

What `huggingface_hub` 2.4 does with them (see tests/test_hf_standin.py):

    drop (FIN)    http_get resumes with `Range: bytes=N-`, where N is what it had written: it
                  writes in 10 MiB chunks (DOWNLOAD_CHUNK_SIZE), so a cut inside the first chunk
                  starts the file again (a second 200), and at most 10 MiB are sent twice
    drop (reset)  not retried: httpx2.ReadError (connection reset) comes out of hf_hub_download
    corrupt       not detected: the file is written with the wrong bytes
    rate_limit    a GET of a file, the tree listing: retried after Retry-After + 1 s. A HEAD:
                  the first 429 is not retried, then hf_hub_download asks again with retries.
                  model_info: not retried (HfHubHTTPError 429)

The log records each request before its response goes out, and counts body bytes just before
each write: once a client has read a response, the log already shows it.

Control endpoints (never logged, never faulted): `GET /_standin/log`, `DELETE /_standin/log`,
`GET|POST|DELETE /_standin/faults`, `DELETE /_standin/faults/{id}`, `GET /_standin/health`.

A repo is private when `<root>/.hub-standin.json` says so: `{"private": {"org/name": "token"}}`
(see `repos.mark_private`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, Self, cast, final, get_args
from urllib.parse import parse_qs, unquote, urlsplit

SETTINGS_FILE: Final = ".hub-standin.json"
MAIN_REVISION: Final = "main"
LFS_SUFFIXES: Final = frozenset(
    {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz"}
)
INVALID_CREDENTIALS: Final = "Invalid credentials in Authorization header"
_CHUNK_BYTES: Final = 1 << 20
_SKIPPED_DIRECTORIES: Final = frozenset({".git", ".cache"})
_IDLE_CONNECTION_SECONDS: Final = 60.0

FaultKind = Literal["drop", "corrupt", "rate_limit", "unauthorized"]
FAULT_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)


# --------------------------------------------------------------------------------------------
# Repos on disk


@dataclass(frozen=True)
class RepoFileInfo:
    """One file of a repo, as the Hub describes it."""

    path: str
    size: int
    blob_id: str
    """Git object id: sha1 of the blob, or of the LFS pointer for an LFS file."""
    sha256: str | None
    """Sha256 of the content, for LFS files only."""
    pointer_size: int | None
    safetensors: Mapping[str, int] | None
    """Parameter count by dtype, for a `.safetensors` file."""
    safetensors_format: str | None

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.blob_id

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.blob_id,
            "size": self.size,
            "path": self.path,
        }
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self) -> dict[str, Any]:
        sibling: dict[str, Any] = {
            "rfilename": self.path,
            "size": self.size,
            "blobId": self.blob_id,
        }
        if self.sha256 is not None:
            sibling["lfs"] = {
                "sha256": self.sha256,
                "size": self.size,
                "pointerSize": self.pointer_size,
            }
        return sibling


@dataclass(frozen=True)
class RepoSnapshot:
    """A repo directory as served at one moment."""

    repo_id: str
    directory: Path
    sha: str
    files: Mapping[str, RepoFileInfo]
    last_modified: float

    def directories(self) -> set[str]:
        found: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                found.add("/".join(parts[:depth]))
        return found

    def tree_id(self, directory: str) -> str:
        prefix = f"{directory}/"
        lines = [
            f"{path} {info.blob_id}" for path, info in self.files.items() if path.startswith(prefix)
        ]
        return hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()

    def directory_entry(self, directory: str) -> dict[str, Any]:
        return {"type": "directory", "oid": self.tree_id(directory), "size": 0, "path": directory}


def is_lfs_path(path: str) -> bool:
    return Path(path).suffix.lower() in LFS_SUFFIXES


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_summary(path: Path) -> tuple[dict[str, int], str | None] | None:
    """Parameter counts by dtype, and the `format` metadata, from a safetensors header."""
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > 100 * 1024 * 1024:
                return None
            header = cast(dict[str, Any], json.loads(stream.read(length)))
    except (OSError, ValueError, struct.error):
        return None
    counts: dict[str, int] = {}
    file_format: str | None = None
    for name, value in header.items():
        if name == "__metadata__":
            metadata = cast(dict[str, str], value)
            file_format = metadata.get("format")
            continue
        tensor = cast(dict[str, Any], value)
        elements = 1
        for dimension in cast(list[int], tensor["shape"]):
            elements *= dimension
        dtype = cast(str, tensor["dtype"])
        counts[dtype] = counts.get(dtype, 0) + elements
    return counts, file_format


_hash_cache: dict[tuple[str, int, int], RepoFileInfo] = {}
_hash_cache_lock = threading.Lock()


def _describe_file(path: Path, relative: str, size: int, mtime_ns: int) -> RepoFileInfo:
    key = (str(path), size, mtime_ns)
    with _hash_cache_lock:
        cached = _hash_cache.get(key)
    if cached is not None and cached.path == relative:
        return cached
    summary = _safetensors_summary(path) if path.suffix == ".safetensors" else None
    if is_lfs_path(relative):
        sha256 = _file_sha256(path)
        pointer = lfs_pointer(sha256, size)
        info = RepoFileInfo(
            path=relative,
            size=size,
            blob_id=git_blob_sha1(pointer),
            sha256=sha256,
            pointer_size=len(pointer),
            safetensors=summary[0] if summary else None,
            safetensors_format=summary[1] if summary else None,
        )
    else:
        info = RepoFileInfo(
            path=relative,
            size=size,
            blob_id=git_blob_sha1(path.read_bytes()),
            sha256=None,
            pointer_size=None,
            safetensors=summary[0] if summary else None,
            safetensors_format=summary[1] if summary else None,
        )
    with _hash_cache_lock:
        _hash_cache[key] = info
    return info


def _walk_files(directory: Path) -> Iterator[tuple[Path, str]]:
    for current, subdirectories, names in os.walk(directory, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        for name in sorted(names):
            path = Path(current) / name
            if path.is_file():
                yield path, path.relative_to(directory).as_posix()


def scan_repo(directory: Path, repo_id: str) -> RepoSnapshot:
    files: dict[str, RepoFileInfo] = {}
    newest = 0.0
    for path, relative in _walk_files(directory):
        stat = path.stat()
        files[relative] = _describe_file(path, relative, stat.st_size, stat.st_mtime_ns)
        newest = max(newest, stat.st_mtime)
    listing = "\n".join(f"{path} {info.blob_id}" for path, info in sorted(files.items()))
    sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    return RepoSnapshot(repo_id, directory, sha, files, newest or time.time())


def _valid_segment(segment: str) -> bool:
    return (
        bool(segment) and segment not in {".", ".."} and "/" not in segment and "\\" not in segment
    )


def _valid_repo_path(path: str) -> bool:
    return bool(path) and all(_valid_segment(part) for part in path.split("/"))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def read_settings(root: Path) -> dict[str, Any]:
    path = root / SETTINGS_FILE
    try:
        return cast(dict[str, Any], json.loads(path.read_text()))
    except FileNotFoundError:
        return {}


# --------------------------------------------------------------------------------------------
# Faults and the request log


@dataclass
class Fault:
    """One injected fault. See the module docstring for what each kind does."""

    kind: FaultKind
    repo: str | None = None
    filename: str | None = None
    method: str | None = None
    times: int | None = 1
    after_bytes: int = 0
    reset: bool = False
    offset: int | None = None
    retry_after: int = 1
    token: str | None = None
    id: int = 0
    fired: int = 0

    def validate(self) -> Self:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.kind in ("drop", "corrupt") and self.filename is None:
            raise ValueError(f"a {self.kind} fault needs a filename")
        if self.kind == "unauthorized" and not self.token:
            raise ValueError("an unauthorized fault needs the token to accept")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None: until removed)")
        if self.after_bytes < 0 or self.retry_after < 0 or (self.offset or 0) < 0:
            raise ValueError("after_bytes, retry_after and offset cannot be negative")
        if self.method is not None:
            self.method = self.method.upper()
        return self

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """A fault from its JSON fields (`id` and `fired` are kept but reassigned on injection)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("a fault needs a kind")
        return cls(**dict(data)).validate()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matches(self, repo: str | None, filename: str | None, method: str) -> bool:
        return (
            (self.repo is None or self.repo == repo)
            and (self.filename is None or self.filename == filename)
            and (self.method is None or self.method == method)
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request the stand-in answered (control requests excluded)."""

    seq: int
    time: float
    method: str
    path: str
    query: str
    repo: str | None
    filename: str | None
    """The repo file, for /resolve requests."""
    range: str | None
    authorization: bool
    status: int
    body_bytes: int
    """Bytes of body handed to the socket, counted just before each write, so a client that
    has read them finds them counted. A write the peer broke still counts (up to 1 MiB)."""
    complete: bool
    """Whether the whole announced body was handed to the socket."""
    fault: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestRecord:
        return cls(**dict(data))


@dataclass
class _Exchange:
    method: str
    path: str
    query: str
    range: str | None
    authorization: bool
    repo: str | None = None
    filename: str | None = None
    status: int = 0
    body_bytes: int = 0
    complete: bool = True
    fault: str | None = None
    control: bool = False
    seq: int = 0
    started: float = 0.0

    def to_record(self) -> RequestRecord:
        return RequestRecord(
            seq=self.seq,
            time=self.started,
            method=self.method,
            path=self.path,
            query=self.query,
            repo=self.repo,
            filename=self.filename,
            range=self.range,
            authorization=self.authorization,
            status=self.status,
            body_bytes=self.body_bytes,
            complete=self.complete,
            fault=self.fault,
        )


def bytes_sent_in(records: Sequence[RequestRecord], repo: str, filename: str) -> int:
    return sum(
        record.body_bytes
        for record in records
        if record.method == "GET" and record.repo == repo and record.filename == filename
    )


@final
class HubState:
    """What the handlers share: the root, the faults, the request log."""

    def __init__(self, root: Path, bytes_per_second: int | None = None) -> None:
        self.root = root
        # A bandwidth cap on file bodies, so that a download lasts long enough to watch.
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._next_fault_id = 1
        self._log: list[_Exchange] = []
        self._next_seq = 0
        self._snapshots: dict[str, tuple[tuple[tuple[str, int, int], ...], RepoSnapshot]] = {}

    # Repos

    def snapshot(self, repo_id: str) -> RepoSnapshot | None:
        org, _, name = repo_id.partition("/")
        if not (_valid_segment(org) and _valid_segment(name)):
            return None
        directory = self.root / org / name
        if not directory.is_dir():
            return None
        signature: list[tuple[str, int, int]] = []
        for path, relative in _walk_files(directory):
            stat = path.stat()
            signature.append((relative, stat.st_size, stat.st_mtime_ns))
        key = tuple(signature)
        with self._lock:
            cached = self._snapshots.get(repo_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        snapshot = scan_repo(directory, repo_id)
        with self._lock:
            self._snapshots[repo_id] = (key, snapshot)
        return snapshot

    # Faults

    def inject(self, fault: Fault) -> int:
        fault.validate()
        with self._lock:
            fault.fired = 0
            fault.id = self._next_fault_id
            self._next_fault_id += 1
            self._faults.append(fault)
            return fault.id

    def remove_fault(self, fault_id: int) -> bool:
        with self._lock:
            before = len(self._faults)
            self._faults = [fault for fault in self._faults if fault.id != fault_id]
            return len(self._faults) != before

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return [dataclasses.replace(fault) for fault in self._faults]

    def _fire(self, fault: Fault) -> None:
        fault.fired += 1
        if fault.times is not None:
            fault.times -= 1
            if fault.times == 0:
                self._faults.remove(fault)

    def take_rate_limit(self, repo: str | None, filename: str | None, method: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == "rate_limit" and fault.matches(repo, filename, method):
                    self._fire(fault)
                    return dataclasses.replace(fault)
        return None

    def check_token(
        self, repo: str, filename: str | None, method: str, header: str | None
    ) -> str | None:
        """None if the request may go on; else what is wrong: "missing" or "invalid"."""
        accepted: set[str] = set()
        private = cast(dict[str, str], read_settings(self.root).get("private", {}))
        if repo in private:
            accepted.add(private[repo])
        with self._lock:
            matching = [
                fault
                for fault in self._faults
                if fault.kind == "unauthorized" and fault.matches(repo, filename, method)
            ]
            accepted.update(cast(str, fault.token) for fault in matching)
            if not accepted:
                return None
            presented = header.removeprefix("Bearer ").strip() if header else None
            if presented in accepted:
                return None
            for fault in matching:
                self._fire(fault)
        return "missing" if presented is None else "invalid"

    def take_body_faults(
        self, repo: str, filename: str, start: int, length: int, file_size: int
    ) -> tuple[Fault | None, int | None]:
        """The drop, and the file offset to corrupt, for a GET body of `length` from `start`."""
        drop: Fault | None = None
        corrupt_at: int | None = None
        with self._lock:
            for fault in list(self._faults):
                if not fault.matches(repo, filename, "GET"):
                    continue
                if fault.kind == "drop" and drop is None and fault.after_bytes < length:
                    self._fire(fault)
                    drop = dataclasses.replace(fault)
                elif fault.kind == "corrupt" and corrupt_at is None:
                    offset = fault.offset if fault.offset is not None else file_size // 2
                    if start <= offset < start + length:
                        self._fire(fault)
                        corrupt_at = offset
        return drop, corrupt_at

    # Log

    def begin(self, exchange: _Exchange) -> None:
        """Log an exchange, before its response goes out: a client that has its answer finds it
        in the log. Byte counts are then raised before each write (`count_bytes`)."""
        if exchange.control or exchange.seq:
            return
        with self._lock:
            self._next_seq += 1
            exchange.seq = self._next_seq
            exchange.started = time.time()
            self._log.append(exchange)

    def count_bytes(self, exchange: _Exchange, sent: int, complete: bool) -> None:
        with self._lock:
            exchange.body_bytes += sent
            exchange.complete = complete

    def mark_broken(self, exchange: _Exchange) -> None:
        with self._lock:
            exchange.complete = False

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return [exchange.to_record() for exchange in self._log]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def log_json(self) -> dict[str, Any]:
        records = self.requests()
        totals: dict[str, dict[str, int]] = {}
        for record in records:
            if record.method == "GET" and record.repo is not None and record.filename is not None:
                per_repo = totals.setdefault(record.repo, {})
                per_repo[record.filename] = per_repo.get(record.filename, 0) + record.body_bytes
        return {
            "requests": [dataclasses.asdict(record) for record in records],
            "bytes_sent": totals,
        }


# --------------------------------------------------------------------------------------------
# HTTP


_MODEL_API = re.compile(
    r"^/api/models/(?P<org>[^/]+)/(?P<name>[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$"
)
_TREE_API = re.compile(
    r"^/api/models/(?P<org>[^/]+)/(?P<name>[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"
)
_PATHS_INFO_API = re.compile(
    r"^/api/models/(?P<org>[^/]+)/(?P<name>[^/]+)/paths-info/(?P<rev>[^/]+)$"
)
_RESOLVE = re.compile(r"^/(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def _truthy(values: Mapping[str, list[str]], name: str) -> bool:
    return any(value.lower() in {"1", "true", "yes"} for value in values.get(name, []))


class _Server(ThreadingHTTPServer):
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
    def hub(self) -> _Server:
        return cast(_Server, self.server)

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
        exchange = _Exchange(
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
        exchange: _Exchange,
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
        exchange: _Exchange,
        value: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._respond(exchange, status, json.dumps(value).encode(), headers)

    def _error(
        self,
        exchange: _Exchange,
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

    def _control(self, exchange: _Exchange, body: bytes) -> None:
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

    def _hub(self, exchange: _Exchange, query: Mapping[str, list[str]], body: bytes) -> None:
        method = exchange.method
        route: tuple[str, re.Match[str]] | None = None
        for name, pattern, methods in (
            ("resolve", _RESOLVE, ("GET", "HEAD")),
            ("tree", _TREE_API, ("GET",)),
            ("paths-info", _PATHS_INFO_API, ("POST",)),
            ("model", _MODEL_API, ("GET",)),
        ):
            match = pattern.match(exchange.path)
            if match is not None and method in methods:
                route = (name, match)
                break
        if route is None:
            if exchange.path.startswith("/api/"):
                self._error(exchange, 404, "Repository not found", "RepoNotFound")
            else:
                self._error(exchange, 404, f"no such endpoint {method} {exchange.path}")
            return
        name, match = route
        repo_id = f"{unquote(match['org'])}/{unquote(match['name'])}"
        exchange.repo = repo_id
        revision = unquote(match["rev"]) if match["rev"] else MAIN_REVISION
        path = unquote(match.groupdict().get("path") or "")
        if name == "resolve":
            exchange.filename = path

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
        if revision not in (MAIN_REVISION, snapshot.sha):
            self._error(
                exchange,
                404,
                f"Invalid rev id: {revision}",
                "RevisionNotFound",
            )
            return
        if name == "model":
            self._model_info(exchange, snapshot, _truthy(query, "blobs"))
        elif name == "tree":
            self._tree(exchange, snapshot, path.strip("/"), _truthy(query, "recursive"))
        elif name == "paths-info":
            self._paths_info(exchange, snapshot, body)
        else:
            self._resolve(exchange, snapshot, path)

    def _model_info(self, exchange: _Exchange, snapshot: RepoSnapshot, blobs: bool) -> None:
        org = snapshot.repo_id.split("/")[0]
        settings = read_settings(self.state.root)
        private = snapshot.repo_id in cast(dict[str, str], settings.get("private", {}))
        files = sorted(snapshot.files.values(), key=lambda info: info.path)
        siblings = [info.sibling() if blobs else {"rfilename": info.path} for info in files]
        info: dict[str, Any] = {
            "_id": snapshot.sha[:24],
            "id": snapshot.repo_id,
            "modelId": snapshot.repo_id,
            "author": org,
            "sha": snapshot.sha,
            "lastModified": _iso(snapshot.last_modified),
            "createdAt": _iso(snapshot.last_modified),
            "private": private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(file.size for file in files),
        }
        config = self._config(snapshot)
        tags: list[str] = []
        if config is not None:
            info["config"] = {
                key: config[key] for key in ("architectures", "model_type") if key in config
            }
            if isinstance(config.get("model_type"), str):
                tags.append(cast(str, config["model_type"]))
        parameters: dict[str, int] = {}
        formats: set[str] = set()
        for file in files:
            if file.safetensors is not None:
                for dtype, count in file.safetensors.items():
                    parameters[dtype] = parameters.get(dtype, 0) + count
            if file.safetensors_format is not None:
                formats.add(file.safetensors_format)
        if parameters:
            tags.append("safetensors")
            info["safetensors"] = {"parameters": parameters, "total": sum(parameters.values())}
        if "mlx" in formats:
            tags.append("mlx")
            info["library_name"] = "mlx"
        info["tags"] = tags
        self._json(exchange, info)

    @staticmethod
    def _config(snapshot: RepoSnapshot) -> dict[str, Any] | None:
        if "config.json" not in snapshot.files:
            return None
        try:
            loaded: Any = json.loads((snapshot.directory / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return cast(dict[str, Any], loaded) if isinstance(loaded, dict) else None

    def _tree(
        self, exchange: _Exchange, snapshot: RepoSnapshot, folder: str, recursive: bool
    ) -> None:
        directories = snapshot.directories()
        if folder and folder not in directories:
            self._error(exchange, 404, f"Path {folder} not found in the repo", "EntryNotFound")
            return
        prefix = f"{folder}/" if folder else ""
        entries: list[dict[str, Any]] = []
        for directory in sorted(directories):
            rest = directory.removeprefix(prefix)
            if directory.startswith(prefix) and rest and (recursive or "/" not in rest):
                entries.append(snapshot.directory_entry(directory))
        for path, info in sorted(snapshot.files.items()):
            rest = path.removeprefix(prefix)
            if path.startswith(prefix) and (recursive or "/" not in rest):
                entries.append(info.tree_entry())
        self._json(exchange, entries)

    def _paths_info(self, exchange: _Exchange, snapshot: RepoSnapshot, body: bytes) -> None:
        paths: list[str]
        content_type = self.headers.get("Content-Type") or ""
        if "json" in content_type:
            data = cast(dict[str, Any], json.loads(body or b"{}"))
            raw = data.get("paths", [])
            paths = [raw] if isinstance(raw, str) else cast(list[str], raw)
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        directories = snapshot.directories()
        entries: list[dict[str, Any]] = []
        for path in paths:
            path = path.strip("/")
            if path in snapshot.files:
                entries.append(snapshot.files[path].tree_entry())
            elif path in directories:
                entries.append(snapshot.directory_entry(path))
        self._json(exchange, entries)

    def _resolve(self, exchange: _Exchange, snapshot: RepoSnapshot, path: str) -> None:
        commit = {"X-Repo-Commit": snapshot.sha}
        info = snapshot.files.get(path) if _valid_repo_path(path) else None
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
            parsed = _RANGE.match(requested)
            if parsed is not None and (parsed[1] or parsed[2]):
                if parsed[1]:
                    start = int(parsed[1])
                    end = min(int(parsed[2]), size - 1) if parsed[2] else size - 1
                else:
                    start = max(size - int(parsed[2]), 0)
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
                chunk = stream.read(min(_CHUNK_BYTES, limit - sent))
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


# --------------------------------------------------------------------------------------------
# In-process use


@final
class HubStandIn:
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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = _Server(self._address, self.state, self._verbose)
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        return int(self._server.server_address[1])

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


# --------------------------------------------------------------------------------------------
# Out-of-process use


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


PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


@final
class StandInProcess:
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
