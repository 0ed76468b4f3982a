"""The Hub's API as the stand-in answers it: its routes, and the answers, built from a snapshot.

The endpoints `huggingface_hub` uses to find and download model files:

    GET  /api/models/{org}/{name}[/revision/{rev}]          model_info / repo_info
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]       list_repo_tree / list_repo_files
    POST /api/models/{org}/{name}/paths-info/{rev}          get_paths_info
    HEAD /{org}/{name}/resolve/{rev}/{path}                 get_hf_file_metadata
    GET  /{org}/{name}/resolve/{rev}/{path}                 http_get (Range: bytes=N- resumes)

Nothing here speaks HTTP: `handler` sends what these functions build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, unquote

from .snapshots import MAIN_REVISION, RepoSnapshot

RouteName = Literal["resolve", "tree", "paths-info", "model"]

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
_ROUTES: Final[tuple[tuple[RouteName, re.Pattern[str], tuple[str, ...]], ...]] = (
    ("resolve", _RESOLVE, ("GET", "HEAD")),
    ("tree", _TREE_API, ("GET",)),
    ("paths-info", _PATHS_INFO_API, ("POST",)),
    ("model", _MODEL_API, ("GET",)),
)
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Route:
    """A Hub request: which endpoint, for which repo, revision and path (unquoted)."""

    name: RouteName
    repo_id: str
    revision: str
    path: str
    """The repo path, for resolve and tree; "" otherwise."""


def match_route(method: str, path: str) -> Route | None:
    for name, pattern, methods in _ROUTES:
        match = pattern.match(path)
        if match is not None and method in methods:
            return Route(
                name=name,
                repo_id=f"{unquote(match['org'])}/{unquote(match['name'])}",
                revision=unquote(match["rev"]) if match["rev"] else MAIN_REVISION,
                path=unquote(match.groupdict().get("path") or ""),
            )
    return None


def truthy(values: Mapping[str, list[str]], name: str) -> bool:
    return any(value.lower() in {"1", "true", "yes"} for value in values.get(name, []))


def requested_range(header: str, size: int) -> tuple[int, int] | None:
    """The first and last byte a `Range: bytes=...` header asks of a file of `size` bytes (the
    last clipped to the file); None when it asks for no usable range (then it is ignored). The
    range cannot be satisfied when first > last or first >= size."""
    parsed = _RANGE.match(header)
    if parsed is None or not (parsed[1] or parsed[2]):
        return None
    if parsed[1]:
        start = int(parsed[1])
        end = min(int(parsed[2]), size - 1) if parsed[2] else size - 1
        return start, end
    return max(size - int(parsed[2]), 0), size - 1


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def repo_config(snapshot: RepoSnapshot) -> dict[str, Any] | None:
    """The repo's `config.json`, if it has a readable one."""
    if "config.json" not in snapshot.files:
        return None
    try:
        loaded: Any = json.loads((snapshot.directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cast(dict[str, Any], loaded) if isinstance(loaded, dict) else None


def model_info(snapshot: RepoSnapshot, *, private: bool, blobs: bool) -> dict[str, Any]:
    """The answer of `GET /api/models/{org}/{name}` (`?blobs=1`: siblings with sizes and ids)."""
    org = snapshot.repo_id.split("/")[0]
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
    config = repo_config(snapshot)
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
    return info


def tree_entries(
    snapshot: RepoSnapshot, folder: str, *, recursive: bool
) -> list[dict[str, Any]] | None:
    """The tree listing of `folder` ("": the top); None when the repo has no such folder."""
    directories = snapshot.directories()
    if folder and folder not in directories:
        return None
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
    return entries


def paths_info(snapshot: RepoSnapshot, body: bytes, content_type: str) -> list[dict[str, Any]]:
    """The answer of `POST .../paths-info/{rev}`, whose body (JSON or a form) names `paths`."""
    paths: list[str]
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
    return entries
