"""What the Hub stand-in's handlers share (`HubState`): the repos, the faults, the request log.

The log records each request before its response goes out, and counts body bytes just before
each write: once a client has read a response, the log already shows it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, final

from .faults import Fault
from .snapshots import RepoSnapshot, private_repos, scan_repo, valid_segment, walk_files


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
class Exchange:
    """A request being answered; what the log keeps of it (`to_record`)."""

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
        self._log: list[Exchange] = []
        self._next_seq = 0
        self._snapshots: dict[str, tuple[tuple[tuple[str, int, int], ...], RepoSnapshot]] = {}

    # Repos

    def snapshot(self, repo_id: str) -> RepoSnapshot | None:
        org, _, name = repo_id.partition("/")
        if not (valid_segment(org) and valid_segment(name)):
            return None
        directory = self.root / org / name
        if not directory.is_dir():
            return None
        signature: list[tuple[str, int, int]] = []
        for path, relative in walk_files(directory):
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
        private = private_repos(self.root)
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

    def begin(self, exchange: Exchange) -> None:
        """Log an exchange, before its response goes out: a client that has its answer finds it
        in the log. Byte counts are then raised before each write (`count_bytes`)."""
        if exchange.control or exchange.seq:
            return
        with self._lock:
            self._next_seq += 1
            exchange.seq = self._next_seq
            exchange.started = time.time()
            self._log.append(exchange)

    def count_bytes(self, exchange: Exchange, sent: int, complete: bool) -> None:
        with self._lock:
            exchange.body_bytes += sent
            exchange.complete = complete

    def mark_broken(self, exchange: Exchange) -> None:
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
