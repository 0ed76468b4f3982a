"""The Hugging Face hub through `huggingface_hub`: list a repository, fetch one file.

`huggingface_hub` resolves files and moves their bytes (Range requests, 429 waits, resuming
a cleanly closed body within one call); around it this module keeps partial files across
calls (so a cancel, a reset connection or a restart resumes), retries 429/5xx with backoff
(honouring Retry-After) and broken connections, reports progress and stops on cancel (through
the `tqdm_class` hook), and words errors so they say what to do.
"""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Protocol, Self, TypeVar, cast, final

import httpx2
import huggingface_hub
from huggingface_hub import HfApi, file_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import HfFileMetadata

RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
MAX_ATTEMPTS: Final = 6
MAX_BACKOFF_SECONDS: Final = 30.0

Result = TypeVar("Result")


class HubError(RuntimeError):
    """A download problem, worded for the person who has to fix it."""


class DownloadCancelledError(HubError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    # LFS files: the sha256 of the content. Plain git files: None (see git_blob_id).
    sha256: str | None
    git_blob_id: str | None


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str
    files: tuple[RemoteFile, ...]

    def file(self, path: str) -> RemoteFile | None:
        return next((remote for remote in self.files if remote.path == path), None)


@dataclass(frozen=True)
class HubAccess:
    """Where the hub is and who we are: `HF_ENDPOINT` and `HF_TOKEN` unless given."""

    endpoint: str
    token: str | None
    offline: bool

    @classmethod
    def from_environment(cls, offline: bool) -> "HubAccess":
        hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
        return cls(
            endpoint=os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co",
            token=os.environ.get("HF_TOKEN") or None,
            offline=offline or hub_offline,
        )


def _status_of(error: BaseException) -> tuple[int, str | None] | None:
    """The HTTP status (and Retry-After) behind an error, looking through its causes:
    `hf_hub_download` reports a failed metadata call as a LocalEntryNotFoundError."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, HfHubHTTPError):
            response = current.response
            return response.status_code, response.headers.get("Retry-After")
        current = current.__cause__
    return None


def retry_delay(attempt: int, retry_after: str | None) -> float:
    """Seconds to wait before attempt `attempt + 1`: Retry-After when the server says, else
    exponential backoff from one second."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), MAX_BACKOFF_SECONDS * 4)
    return min(2.0 ** (attempt - 1), MAX_BACKOFF_SECONDS)


def explain(error: BaseException, access: HubAccess, repo: str) -> HubError:
    """One clear sentence for a failed hub call."""
    status = _status_of(error)
    code = status[0] if status is not None else None
    if code == 401 or isinstance(error, GatedRepoError):
        token_state = "HF_TOKEN is set but was refused" if access.token else "HF_TOKEN is not set"
        return HubError(
            f"{access.endpoint} refused {repo} (401 Unauthorized): it is private or gated, and "
            f"{token_state}; set HF_TOKEN to a token that may read it"
        )
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo} has no such revision on {access.endpoint}")
    if isinstance(error, RemoteEntryNotFoundError):
        return HubError(f"{repo} on {access.endpoint} lacks a file: {error}")
    if isinstance(error, RepositoryNotFoundError) or code == 404:
        return HubError(f"no model repository {repo} on {access.endpoint}")
    if code is not None:
        return HubError(f"{access.endpoint} answered {code} for {repo} after {MAX_ATTEMPTS} tries")
    return HubError(f"cannot reach {access.endpoint} for {repo}: {error}")


def with_retries(
    call: Callable[[], Result],
    *,
    cancelled: threading.Event | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Run `call`, again after 429/5xx answers (Retry-After honoured) or a broken
    connection, up to MAX_ATTEMPTS."""
    attempt = 1
    while True:
        try:
            return call()
        except (HfHubHTTPError, LocalEntryNotFoundError) as error:
            status = _status_of(error)
            if status is None or status[0] not in RETRY_STATUSES or attempt >= MAX_ATTEMPTS:
                raise
            delay = retry_delay(attempt, status[1])
        except httpx2.TransportError:
            # huggingface_hub resumes a body cut by a clean close itself, but not one cut by a
            # reset: the next attempt resumes from the `.incomplete` file.
            if attempt >= MAX_ATTEMPTS:
                raise
            delay = retry_delay(attempt, None)
        attempt += 1
        if cancelled is not None:
            if cancelled.wait(delay):
                raise DownloadCancelledError("cancelled")
        else:
            sleep(delay)


def list_repo(access: HubAccess, repo: str) -> RepoListing:
    api = HfApi(endpoint=access.endpoint, token=access.token or False)
    try:
        info = with_retries(lambda: api.model_info(repo, files_metadata=True))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx2.TransportError) as error:
        raise explain(error, access, repo) from error
    files: list[RemoteFile] = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        files.append(
            RemoteFile(
                path=sibling.rfilename,
                size=(lfs.size if lfs is not None else sibling.size) or 0,
                sha256=lfs.sha256 if lfs is not None else None,
                git_blob_id=sibling.blob_id,
            )
        )
    if info.sha is None:
        raise HubError(f"{access.endpoint} gave no revision for {repo}")
    return RepoListing(repo=repo, revision=info.sha, files=tuple(files))


class _HttpGet(Protocol):
    """`huggingface_hub`'s `http_get` as this module calls it (its own signature leaves the
    progress class's type unknown to a strict checker)."""

    def __call__(
        self,
        url: str,
        temp_file: BinaryIO,
        *,
        resume_size: int,
        headers: dict[str, str],
        expected_size: int | None,
        displayed_filename: str,
        tqdm_class: Callable[..., object],
    ) -> None: ...


class _FileMetadata(Protocol):
    def __call__(
        self, url: str, *, token: str | bool, endpoint: str, retry_on_errors: bool
    ) -> HfFileMetadata: ...


class _Headers(Protocol):
    def __call__(self, *, token: str | bool) -> dict[str, str]: ...


_http_get = cast(_HttpGet, file_download.http_get)
# Looked up by name: their signatures name an untyped `dict`, which a strict checker reports
# on any attribute access; the Protocols above say how they are called here.
_get_file_metadata = cast(_FileMetadata, vars(file_download)["get_hf_file_metadata"])
_build_headers = cast(_Headers, vars(file_download)["build_hf_headers"])


def partial_path(local_dir: Path, path: str) -> Path:
    """Where the bytes of an unfinished transfer wait to be resumed (across cancels, broken
    connections and restarts: huggingface_hub's own temporary file does not survive them)."""
    return local_dir / ".cache" / "shoal-partial" / f"{path}.part"


@final
class TransferHook:
    """What one file's transfer reports to, and whether it should stop."""

    def __init__(
        self,
        on_start: Callable[[int, int], None],
        on_bytes: Callable[[int], None],
        cancelled: threading.Event,
    ) -> None:
        self.on_start = on_start
        self.on_bytes = on_bytes
        self.cancelled = cancelled


def _progress_class(hook: TransferHook) -> Callable[..., object]:
    """Stands in for tqdm (huggingface_hub makes a bar with `cls(total=, initial=, ...)` and
    calls `update`): feeds `hook`, and raising in `update` stops the transfer while its
    `.incomplete` file stays, so the next attempt resumes."""

    @final
    class _Progress:
        def __init__(self, **options: Any) -> None:
            initial = cast("int | None", options.get("initial")) or 0
            total = cast("int | None", options.get("total")) or 0
            hook.on_start(initial, total)

        def __enter__(self) -> Self:
            return self

        def __exit__(
            self,
            kind: type[BaseException] | None,
            error: BaseException | None,
            traceback: TracebackType | None,
        ) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            if hook.cancelled.is_set():
                raise DownloadCancelledError("cancelled")
            hook.on_bytes(int(n or 0))

        def close(self) -> None:
            return None

    return _Progress


def fetch_file(
    access: HubAccess,
    listing: RepoListing,
    path: str,
    local_dir: Path,
    *,
    hook: TransferHook,
    force: bool = False,
) -> Path:
    """Fetch one file of the listing's revision into `local_dir`, resuming a partial one.

    huggingface_hub resolves the file (`get_hf_file_metadata`: redirects, size, ETag) and
    moves the bytes (`http_get`: Range requests, 429 waits, resumes within one call); the
    partial file is ours, so that a later call resumes where an earlier one stopped.
    """
    destination = local_dir / path
    partial = partial_path(local_dir, path)
    url = huggingface_hub.hf_hub_url(
        listing.repo, path, revision=listing.revision, endpoint=access.endpoint
    )
    token: str | bool = access.token or False

    def download() -> None:
        metadata = _get_file_metadata(
            url, token=token, endpoint=access.endpoint, retry_on_errors=True
        )
        partial.parent.mkdir(parents=True, exist_ok=True)
        if force:
            partial.unlink(missing_ok=True)
        resume = partial.stat().st_size if partial.exists() else 0
        if metadata.size is not None and resume > metadata.size:
            partial.unlink()
            resume = 0
        headers = _build_headers(token=token)
        location = metadata.location
        if not location.startswith(access.endpoint):
            # Redirected to a CDN: the token is for the hub only.
            headers.pop("authorization", None)
        with partial.open("ab") as content:
            _http_get(
                location,
                content,
                resume_size=resume,
                headers=headers,
                expected_size=metadata.size,
                displayed_filename=path,
                tqdm_class=_progress_class(hook),
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(destination)

    try:
        with_retries(download, cancelled=hook.cancelled)
    except DownloadCancelledError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx2.TransportError) as error:
        raise explain(error, access, listing.repo) from error
    return destination
