"""A node's model files: found in read-only directories, or fetched into its own.

Own files live in `<models>/hub/<org>/<name>/` (what mlx-lm loads), each recorded in a
manifest once its content matched the hub's hash: a file not in the manifest is never loaded.
Read-only directories (`<dir>/<org>/<name>`, `<dir>/<name>` or a Hugging Face cache) are used
as they are and never written.
"""

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast, final

from shoal_shared.model_card import ModelCard

from shoal_worker.downloads.hub import (
    HubAccess,
    HubError,
    RemoteFile,
    RepoListing,
    TransferHook,
    fetch_file,
    list_repo,
    partial_path,
)
from shoal_worker.downloads.progress import DownloadProgress
from shoal_worker.downloads.shard_files import (
    INDEX_FILE,
    files_for_shard,
    is_weight_file,
    layers_present,
)

logger = logging.getLogger(__name__)

MANIFEST: Final = Path(".cache") / "shoal-verified.json"
INTEGRITY_ATTEMPTS: Final = 3
_HASH_BLOCK: Final = 8 * 1024 * 1024


@dataclass(frozen=True)
class LocalModel:
    path: Path
    read_only: bool
    start_layer: int
    end_layer: int
    bytes_total: int


def local_model_dir(models_dir: Path, model_id: str) -> Path:
    """Where `shoal models import` puts a converted model."""
    return models_dir / "local" / model_id


def free_disk_bytes(path: Path) -> int:
    existing = path
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def content_digest(path: Path, remote: RemoteFile) -> tuple[str, str] | None:
    """(what the hub says, what the file is): sha256 for LFS files, the git blob id else."""
    if remote.sha256 is not None:
        digest = hashlib.sha256()
        expected = remote.sha256
    elif remote.git_blob_id is not None:
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"blob {path.stat().st_size}\0".encode())
        expected = remote.git_blob_id
    else:
        return None
    with path.open("rb") as content:
        while block := content.read(_HASH_BLOCK):
            digest.update(block)
    return expected, digest.hexdigest()


def _read_weight_map(directory: Path) -> dict[str, str] | None:
    index = directory / INDEX_FILE
    if not index.is_file():
        return None
    raw = cast("dict[str, object]", json.loads(index.read_text()))
    return cast("dict[str, str]", raw.get("weight_map", {}))


@final
class _Manifest:
    """Which files of an own model directory were verified, by size and modification time."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / MANIFEST
        self._entries: dict[str, dict[str, int]] = {}
        if self._path.is_file():
            raw = cast("dict[str, dict[str, dict[str, int]]]", json.loads(self._path.read_text()))
            self._entries = raw.get("files", {})
        self._directory = directory

    def verified(self, name: str) -> bool:
        entry = self._entries.get(name)
        path = self._directory / name
        if entry is None or not path.is_file():
            return False
        stat = path.stat()
        return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns

    def record(self, name: str) -> None:
        stat = (self._directory / name).stat()
        self._entries[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        partial = self._path.with_suffix(".partial")
        partial.write_text(json.dumps({"files": self._entries}))
        partial.replace(self._path)

    def names(self) -> tuple[str, ...]:
        return tuple(name for name in self._entries if self.verified(name))


def _candidate_dirs(root: Path, repo: str) -> Iterable[Path]:
    yield root / repo
    yield root / repo.rsplit("/", 1)[-1]
    snapshots = root / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        yield from sorted(snapshots.iterdir())


def _local_names(directory: Path) -> tuple[str, ...]:
    return tuple(entry.name for entry in directory.iterdir() if entry.is_file())


@final
class ModelStore:
    def __init__(
        self,
        models_dir: Path,
        read_only_dirs: Sequence[Path],
        access: HubAccess,
        free_disk: Callable[[Path], int] = free_disk_bytes,
    ) -> None:
        self._models_dir = models_dir
        self._read_only_dirs = tuple(read_only_dirs)
        self.access = access
        self._free_disk = free_disk

    def own_dir(self, card: ModelCard) -> Path:
        if card.source == "local":
            return local_model_dir(self._models_dir, card.model_id)
        return self._models_dir / "hub" / (card.hf_repo or card.model_id)

    def _verified_names(self, card: ModelCard, directory: Path) -> tuple[str, ...]:
        # An imported model was written here by Shoal itself, with no hub hash to check.
        if card.source == "local":
            return _local_names(directory)
        return _Manifest(directory).names()

    def _read_only_candidates(self, card: ModelCard) -> Iterable[Path]:
        for root in self._read_only_dirs:
            for directory in _candidate_dirs(root, card.hf_repo or card.model_id):
                if (directory / "config.json").is_file():
                    yield directory

    def find_local(self, card: ModelCard, start_layer: int, end_layer: int) -> LocalModel | None:
        """Files already on this node for the layers (read-only directories first)."""
        for directory in self._read_only_candidates(card):
            names = _local_names(directory)
            needed = files_for_shard(names, _read_weight_map(directory), start_layer, end_layer)
            if any(is_weight_file(name) for name in needed) and set(needed) <= set(names):
                return self._described(card, directory, names, True, start_layer)
        own = self.own_dir(card)
        if not (own / "config.json").is_file():
            return None
        verified = self._verified_names(card, own)
        needed = files_for_shard(_local_names(own), _read_weight_map(own), start_layer, end_layer)
        weights = [name for name in needed if is_weight_file(name)]
        if weights and set(needed) <= set(verified):
            return self._described(card, own, verified, False, start_layer)
        return None

    def scan(self, card: ModelCard) -> LocalModel | None:
        """What this node has of the model, if anything (for announcing it at start)."""
        for directory in (*self._read_only_candidates(card), self.own_dir(card)):
            if not (directory / "config.json").is_file():
                continue
            read_only = directory != self.own_dir(card)
            names = _local_names(directory) if read_only else self._verified_names(card, directory)
            described = self._described(card, directory, names, read_only, None)
            if described is not None:
                return described
        return None

    def _described(
        self,
        card: ModelCard,
        directory: Path,
        names: Iterable[str],
        read_only: bool,
        around: int | None,
    ) -> LocalModel | None:
        present = tuple(names)
        weight_map = _read_weight_map(directory)
        if weight_map is None:
            if not any(is_weight_file(name) for name in present):
                return None
            covered: tuple[int, int] | None = (0, card.layers)
        else:
            covered = layers_present(weight_map, present, card.layers, around)
        if covered is None:
            return None
        # Every file of the model, as a download's progress counts them (config, tokenizer
        # and weights): a finished download's total is the one its progress bar ran up to.
        size = sum(path.stat().st_size for path in (directory / name for name in present))
        return LocalModel(directory, read_only, covered[0], covered[1], size)

    def ensure(
        self,
        card: ModelCard,
        start_layer: int,
        end_layer: int,
        progress: DownloadProgress,
        cancelled: threading.Event,
    ) -> LocalModel:
        """The files of layers [start_layer, end_layer): found here, or fetched and verified."""
        found = self.find_local(card, start_layer, end_layer)
        if found is not None:
            return found
        layers = f"layers {start_layer}-{end_layer - 1} of {card.model_id}"
        if self.access.offline:
            looked = ", ".join(str(path) for path in (*self._read_only_dirs, self.own_dir(card)))
            raise HubError(
                f"offline (HF_HUB_OFFLINE / --offline) and the files of {layers} are not on "
                f"this node (looked in {looked})"
            )
        if card.source != "huggingface" or card.hf_repo is None:
            raise HubError(f"{card.model_id} has no hub repository and no files on this node")
        listing = list_repo(self.access, card.hf_repo)
        target = self.own_dir(card)
        target.mkdir(parents=True, exist_ok=True)
        manifest = _Manifest(target)
        weight_map: Mapping[str, str] | None = None
        if listing.file(INDEX_FILE) is not None:
            self._fetch_verified(listing, INDEX_FILE, target, manifest, progress, cancelled)
            weight_map = _read_weight_map(target)
        needed = files_for_shard(
            (remote.path for remote in listing.files), weight_map, start_layer, end_layer
        )
        remotes = {name: self._remote(listing, name) for name in needed}
        done = {name: remote.size for name, remote in remotes.items() if manifest.verified(name)}
        partial = {name: _partial_bytes(target, name) for name in remotes if name not in done}
        progress.plan({name: remote.size for name, remote in remotes.items()}, {**partial, **done})
        required = sum(remotes[name].size - partial[name] for name in partial)
        free = self._free_disk(target)
        if required > free:
            raise HubError(
                f"{layers} needs {required / 1e9:.2f} GB more in {target}, "
                f"only {free / 1e9:.2f} GB free there"
            )
        for name in sorted(partial, key=_fetch_order):
            self._fetch_verified(listing, name, target, manifest, progress, cancelled)
        found = self.find_local(card, start_layer, end_layer)
        if found is None:
            raise HubError(f"{card.model_id}: the fetched files do not hold {layers}")
        return found

    @staticmethod
    def _remote(listing: RepoListing, name: str) -> RemoteFile:
        remote = listing.file(name)
        if remote is None:
            raise HubError(f"{listing.repo} lists {name} in its index but has no such file")
        return remote

    def _fetch_verified(
        self,
        listing: RepoListing,
        name: str,
        target: Path,
        manifest: _Manifest,
        progress: DownloadProgress,
        cancelled: threading.Event,
    ) -> None:
        if manifest.verified(name):
            return
        remote = self._remote(listing, name)
        hook = TransferHook(
            on_start=lambda initial, total: progress.file_started(name, initial, total),
            on_bytes=lambda count: progress.add(name, count),
            cancelled=cancelled,
        )
        for attempt in range(1, INTEGRITY_ATTEMPTS + 1):
            # After a mismatch, fetch it anew: the partial and the bad file are both suspect.
            path = fetch_file(self.access, listing, name, target, hook=hook, force=attempt > 1)
            digests = content_digest(path, remote)
            if digests is None or digests[0] == digests[1]:
                manifest.record(name)
                progress.file_done(name)
                return
            logger.warning(
                "%s of %s failed its integrity check (hub %s, got %s): fetching it again",
                name,
                listing.repo,
                digests[0],
                digests[1],
            )
            path.unlink(missing_ok=True)
            progress.file_restarted(name)
        raise HubError(
            f"{name} of {listing.repo} failed its integrity check {INTEGRITY_ATTEMPTS} times"
        )

    def delete(self, card: ModelCard) -> bool:
        """Remove this node's own files of the model; read-only directories are left alone."""
        own = self.own_dir(card)
        if not own.exists():
            return False
        shutil.rmtree(own)
        return True


def _fetch_order(name: str) -> tuple[bool, bool, str]:
    """Weights first, config.json last: a directory with a config.json holds a whole fetch
    (a node that stopped midway is not taken for one with the files)."""
    return (name == "config.json", not is_weight_file(name), name)


def _partial_bytes(target: Path, name: str) -> int:
    """Bytes of an interrupted transfer that the next one resumes from."""
    partial = partial_path(target, name)
    return partial.stat().st_size if partial.is_file() else 0
