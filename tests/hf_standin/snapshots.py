"""Repos on disk, as the Hub stand-in serves them.

A repo is a plain directory `<root>/<org>/<name>/`. It has one revision: "main", whose commit
sha is a hash of its file list and contents. Files named like weights (`*.safetensors`, ...)
are LFS files: their ETag is the sha256 of the content. No `X-Xet-*` header is ever sent, so
`huggingface_hub` downloads over plain HTTP.

A repo is private when `<root>/.hub-standin.json` says so: `{"private": {"org/name": "token"}}`
(see `repos.mark_private`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

SETTINGS_FILE: Final = ".hub-standin.json"
MAIN_REVISION: Final = "main"
LFS_SUFFIXES: Final = frozenset(
    {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz"}
)
CHUNK_BYTES: Final = 1 << 20
"""How much of a file is read (to hash it, or to send it) at a time."""
_SKIPPED_DIRECTORIES: Final = frozenset({".git", ".cache"})


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
        while chunk := stream.read(CHUNK_BYTES):
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
    sha256: str | None = None
    pointer_size: int | None = None
    if is_lfs_path(relative):
        sha256 = _file_sha256(path)
        pointer = lfs_pointer(sha256, size)
        blob_id = git_blob_sha1(pointer)
        pointer_size = len(pointer)
    else:
        blob_id = git_blob_sha1(path.read_bytes())
    info = RepoFileInfo(
        path=relative,
        size=size,
        blob_id=blob_id,
        sha256=sha256,
        pointer_size=pointer_size,
        safetensors=summary[0] if summary else None,
        safetensors_format=summary[1] if summary else None,
    )
    with _hash_cache_lock:
        _hash_cache[key] = info
    return info


def walk_files(directory: Path) -> Iterator[tuple[Path, str]]:
    """The files of a repo directory, with their repo paths, in a stable order."""
    for current, subdirectories, names in os.walk(directory, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        for name in sorted(names):
            path = Path(current) / name
            if path.is_file():
                yield path, path.relative_to(directory).as_posix()


def scan_repo(directory: Path, repo_id: str) -> RepoSnapshot:
    files: dict[str, RepoFileInfo] = {}
    newest = 0.0
    for path, relative in walk_files(directory):
        stat = path.stat()
        files[relative] = _describe_file(path, relative, stat.st_size, stat.st_mtime_ns)
        newest = max(newest, stat.st_mtime)
    listing = "\n".join(f"{path} {info.blob_id}" for path, info in sorted(files.items()))
    sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    return RepoSnapshot(repo_id, directory, sha, files, newest or time.time())


def valid_segment(segment: str) -> bool:
    return (
        bool(segment) and segment not in {".", ".."} and "/" not in segment and "\\" not in segment
    )


def valid_repo_path(path: str) -> bool:
    return bool(path) and all(valid_segment(part) for part in path.split("/"))


def read_settings(root: Path) -> dict[str, Any]:
    path = root / SETTINGS_FILE
    try:
        return cast(dict[str, Any], json.loads(path.read_text()))
    except FileNotFoundError:
        return {}


def private_repos(root: Path) -> dict[str, str]:
    """The private repos under `root`, with the token each accepts."""
    return cast(dict[str, str], read_settings(root).get("private", {}))
