"""The Hugging Face Hub stand-in, driven through the real `huggingface_hub` client."""

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelInfo, RepoFile
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .hf_standin import (
    INDEX_FILE,
    INVALID_CREDENTIALS,
    UNSUPPORTED_MODEL_TYPE,
    HubStandIn,
    StandardRepos,
    StandInProcess,
    repo_dir,
    shard_name,
)


class _HubDownload(Protocol):
    """`huggingface_hub.hf_hub_download` as called here (its signature has parts unknown to a
    strict checker)."""

    def __call__(
        self,
        repo_id: str,
        filename: str,
        *,
        local_dir: Path,
        cache_dir: Path,
        endpoint: str,
        token: str | bool,
    ) -> str: ...


class _SnapshotDownload(Protocol):
    def __call__(
        self, repo_id: str, *, local_dir: Path, cache_dir: Path, endpoint: str, token: str | bool
    ) -> str: ...


hf_hub_download = cast(_HubDownload, huggingface_hub.hf_hub_download)
snapshot_download = cast(_SnapshotDownload, huggingface_hub.snapshot_download)

SHARD_2 = shard_name(2, 4)
SHARDS = [shard_name(index, 4) for index in range(1, 5)]


def config_of(info: ModelInfo) -> dict[str, Any]:
    config: object = getattr(info, "config")  # noqa: B009 (ModelInfo.config is an untyped dict)
    assert isinstance(config, dict)
    return cast(dict[str, Any], config)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the internet: a connection anywhere but loopback fails."""
    # The stand-in is local: an HF_HUB_OFFLINE=1 in the environment must not block it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = str(cast(tuple[object, ...], address)[0]) if isinstance(address, tuple) else ""
        if self.family in (socket.AF_INET, socket.AF_INET6) and not ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test tried to reach {address}")
        connect(self, cast(tuple[Any, ...] | str, address))

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def hub(standin_repos: StandardRepos) -> Iterator[HubStandIn]:
    with HubStandIn(standin_repos.root) as running:
        yield running


def download(
    hub: HubStandIn, repo: str, filename: str, directory: Path, token: str | bool = False
) -> Path:
    return Path(
        hf_hub_download(
            repo,
            filename,
            local_dir=directory / "local",
            cache_dir=directory / "cache",
            endpoint=hub.url,
            token=token,
        )
    )


def test_model_info_lists_the_split_files_with_their_sha256(
    hub: HubStandIn, standin_repos: StandardRepos
) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info(standin_repos.split, files_metadata=True)
    directory = repo_dir(standin_repos.root, standin_repos.split)

    assert info.sha == hub.commit_sha(standin_repos.split)
    assert info.sha is not None
    assert len(info.sha) == 40
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    assert set(SHARDS) | {INDEX_FILE, "config.json", "tokenizer.json"} <= set(siblings)
    for shard in SHARDS:
        lfs = siblings[shard].lfs
        assert lfs is not None
        assert lfs.sha256 == sha256_of(directory / shard)
        assert lfs.size == siblings[shard].size == (directory / shard).stat().st_size
    assert siblings["config.json"].lfs is None
    assert config_of(info) == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert info.safetensors is not None
    assert info.safetensors.total > 0

    # Without blobs=true the Hub lists names only; by commit sha the answer is the same repo.
    plain = api.model_info(standin_repos.split, revision=info.sha)
    assert [sibling.size for sibling in plain.siblings or []] == [None] * len(siblings)
    assert sorted(api.list_repo_files(standin_repos.split)) == sorted(siblings)


def test_one_shard_and_the_index_download_into_a_local_dir(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    directory = repo_dir(standin_repos.root, standin_repos.split)
    shard = download(hub, standin_repos.split, SHARD_2, tmp_path)
    assert shard.read_bytes() == (directory / SHARD_2).read_bytes()
    assert hub.bytes_sent(standin_repos.split, SHARD_2) == (directory / SHARD_2).stat().st_size

    index = json.loads(download(hub, standin_repos.split, INDEX_FILE, tmp_path).read_text())
    weight_map = cast(dict[str, str], index["weight_map"])
    assert sorted(set(weight_map.values())) == SHARDS
    assert {name for name, file in weight_map.items() if file == shard_name(1, 4)} == {
        "model.embed_tokens.biases",
        "model.embed_tokens.scales",
        "model.embed_tokens.weight",
        "model.norm.weight",
    }
    assert weight_map["model.layers.0.input_layernorm.weight"] == shard_name(2, 4)
    assert weight_map["model.layers.9.input_layernorm.weight"] == shard_name(2, 4)
    assert weight_map["model.layers.10.input_layernorm.weight"] == shard_name(3, 4)
    assert weight_map["model.layers.29.input_layernorm.weight"] == shard_name(4, 4)
    assert index["metadata"]["total_size"] > 0

    fetched = [(r.method, r.filename, r.status) for r in hub.requests]
    assert fetched == [
        ("HEAD", SHARD_2, 200),
        ("GET", SHARD_2, 200),
        ("HEAD", INDEX_FILE, 200),
        ("GET", INDEX_FILE, 200),
    ]


def test_snapshot_download_fetches_every_file_once(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    target = Path(
        snapshot_download(
            standin_repos.split,
            local_dir=tmp_path / "local",
            cache_dir=tmp_path / "cache",
            endpoint=hub.url,
            token=False,
        )
    )
    directory = repo_dir(standin_repos.root, standin_repos.split)
    files = sorted(path.name for path in directory.iterdir())
    for name in files:
        assert (target / name).read_bytes() == (directory / name).read_bytes()
        assert hub.bytes_sent(standin_repos.split, name) == (directory / name).stat().st_size
    # repo_info for the commit, the recursive tree at that commit, then a HEAD and a GET a file.
    api = f"/api/models/{standin_repos.split}"
    sha = hub.commit_sha(standin_repos.split)
    assert [(r.method, r.path, r.query) for r in hub.requests if r.filename is None] == [
        ("GET", f"{api}/revision/main", ""),
        ("GET", f"{api}/tree/{sha}", "recursive=true&expand=false"),
    ]
    resolved = sorted((r.filename, r.method) for r in hub.requests if r.filename is not None)
    assert resolved == sorted((name, method) for name in files for method in ("GET", "HEAD"))
    assert all(f"/resolve/{sha}/" in r.path for r in hub.requests if r.filename is not None)


def test_missing_repo_revision_and_file_raise_the_hub_errors(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("shoal-test/no-such-repo")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(standin_repos.split, revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, "shoal-test/no-such-repo", "config.json", tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        download(hub, standin_repos.split, "no-such-file.json", tmp_path)


def test_a_connection_dropped_mid_file_is_resumed_by_huggingface_hub(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    size = (repo_dir(standin_repos.root, standin_repos.split) / SHARD_2).stat().st_size
    # huggingface_hub writes what it received in 10 MiB chunks (DOWNLOAD_CHUNK_SIZE): cut at
    # 15 MiB, it keeps 10 MiB and asks for the rest with a Range.
    kept = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    cut = kept + 5 * 1024 * 1024 + 17
    hub.drop(SHARD_2, after_bytes=cut)

    shard = download(hub, standin_repos.split, SHARD_2, tmp_path)

    assert sha256_of(shard) == hub.snapshot(standin_repos.split).files[SHARD_2].sha256
    sent = hub.bytes_sent(standin_repos.split, SHARD_2)
    assert sent == cut + size - kept < size + 10 * 1024 * 1024
    gets = [r for r in hub.requests if r.method == "GET" and r.filename == SHARD_2]
    assert [(r.status, r.range, r.fault, r.complete) for r in gets] == [
        (200, None, "drop", False),
        (206, f"bytes={kept}-", None, True),
    ]
    assert gets[0].body_bytes == cut


def test_a_drop_inside_the_first_chunk_restarts_the_file(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    size = (repo_dir(standin_repos.root, standin_repos.split) / SHARD_2).stat().st_size
    hub.drop(SHARD_2, after_bytes=1000)
    shard = download(hub, standin_repos.split, SHARD_2, tmp_path)
    assert sha256_of(shard) == hub.snapshot(standin_repos.split).files[SHARD_2].sha256
    assert hub.bytes_sent(standin_repos.split, SHARD_2) == size + 1000
    gets = [(r.status, r.range) for r in hub.requests if r.method == "GET"]
    assert gets == [(200, None), (200, None)]


def test_the_drop_is_a_broken_body_to_a_plain_http_client(
    hub: HubStandIn, standin_repos: StandardRepos
) -> None:
    hub.drop("config.json", after_bytes=10)
    url = f"{hub.url}/{standin_repos.split}/resolve/main/config.json"
    with httpx.Client() as client:
        head = client.head(url)
        assert head.headers["X-Repo-Commit"] == hub.commit_sha(standin_repos.split)
        assert not [name for name in head.headers if name.lower().startswith("x-xet")]
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(url)
        ranged = client.get(url, headers={"Range": "bytes=10-"})
    size = int(head.headers["Content-Length"])
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 10-{size - 1}/{size}"
    assert len(ranged.content) == size - 10


def test_a_reset_drop_ends_in_a_connection_reset(
    hub: HubStandIn, standin_repos: StandardRepos
) -> None:
    # huggingface_hub 2.4 resumes after a closed connection (RemoteProtocolError) but not after
    # a reset one: http_get lets httpx2.ReadError through and hf_hub_download fails.
    hub.drop(SHARD_2, after_bytes=1 << 20, reset=True)
    url = f"{hub.url}/{standin_repos.split}/resolve/main/{SHARD_2}"
    with httpx.Client() as client, pytest.raises(httpx.ReadError):
        client.get(url)
    assert [(r.status, r.fault, r.complete) for r in hub.requests] == [(200, "drop", False)]


def test_tree_and_paths_info(hub: HubStandIn, standin_repos: StandardRepos) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    found = api.get_paths_info(standin_repos.split, ["config.json", "missing.json", SHARD_2])
    assert [(entry.path, isinstance(entry, RepoFile)) for entry in found] == [
        ("config.json", True),
        (SHARD_2, True),
    ]
    tree = {entry.path for entry in api.list_repo_tree(standin_repos.split)}
    assert set(SHARDS) <= tree


def test_429_with_retry_after_is_waited_out(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    hub.rate_limit(retry_after=1, filename="config.json", method="GET")
    started = time.monotonic()
    config = download(hub, standin_repos.split, "config.json", tmp_path)
    waited = time.monotonic() - started

    assert json.loads(config.read_text())["model_type"] == "llama"
    statuses = [(r.method, r.status, r.fault) for r in hub.requests]
    assert statuses == [("HEAD", 200, None), ("GET", 429, "rate_limit"), ("GET", 200, None)]
    assert waited >= 1.0  # huggingface_hub sleeps Retry-After + 1 s


def test_a_private_repo_needs_its_token(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    private = standin_repos.private
    with pytest.raises(RepositoryNotFoundError) as no_token:
        HfApi(endpoint=hub.url, token=False).model_info(private)
    assert no_token.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        download(hub, private, "config.json", tmp_path)
    with pytest.raises(HfHubHTTPError) as wrong_token:
        download(hub, private, "config.json", tmp_path, token="hf_wrong")
    assert not isinstance(wrong_token.value, RepositoryNotFoundError)
    assert wrong_token.value.response.status_code == 401
    assert wrong_token.value.response.headers["X-Error-Message"] == INVALID_CREDENTIALS

    info = HfApi(endpoint=hub.url, token=standin_repos.private_token).model_info(private)
    assert info.private is True
    config = download(hub, private, "config.json", tmp_path, token=standin_repos.private_token)
    assert json.loads(config.read_text())["model_type"] == "llama"
    assert [r.status for r in hub.requests][-3:] == [200, 200, 200]

    # The same, injected at run time on a public repo.
    hub.require_token("hf_injected", repo=standin_repos.unsupported)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(standin_repos.unsupported)
    HfApi(endpoint=hub.url, token="hf_injected").model_info(standin_repos.unsupported)


def test_corrupt_serves_a_body_that_does_not_match_its_sha256(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    advertised = hub.snapshot(standin_repos.split).files[SHARD_2].sha256
    hub.corrupt(SHARD_2, offset=1234)

    corrupted = download(hub, standin_repos.split, SHARD_2, tmp_path / "first")
    original = (repo_dir(standin_repos.root, standin_repos.split) / SHARD_2).read_bytes()
    served = corrupted.read_bytes()
    assert sha256_of(corrupted) != advertised
    assert len(served) == len(original)
    assert served[:1234] == original[:1234]
    assert served[1234] == original[1234] ^ 0xFF
    assert served[1235:] == original[1235:]

    # One-shot: the next download is clean.
    assert sha256_of(download(hub, standin_repos.split, SHARD_2, tmp_path / "second")) == advertised
    assert [r.fault for r in hub.requests if r.method == "GET"] == ["corrupt", None]


def test_unsupported_repo_has_a_foreign_model_type(
    hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path
) -> None:
    info = HfApi(endpoint=hub.url, token=False).model_info(standin_repos.unsupported)
    assert config_of(info)["model_type"] == UNSUPPORTED_MODEL_TYPE
    index = json.loads(download(hub, standin_repos.unsupported, INDEX_FILE, tmp_path).read_text())
    assert set(index["weight_map"].values()) == {shard_name(1, 1)}


def test_the_stand_in_runs_as_its_own_process(standin_repos: StandardRepos, tmp_path: Path) -> None:
    with StandInProcess(standin_repos.root) as process:
        control = process.control()
        info = HfApi(endpoint=process.url, token=False).model_info(standin_repos.split)
        assert info.sha is not None
        assert len(info.sha) == 40

        fault = control.inject("drop", filename="tokenizer.json", after_bytes=1000)
        assert [f.id for f in control.faults()] == [fault]
        tokenizer = hf_hub_download(
            standin_repos.split,
            "tokenizer.json",
            local_dir=tmp_path / "local",
            cache_dir=tmp_path / "cache",
            endpoint=process.url,
            token=False,
        )
        size = (repo_dir(standin_repos.root, standin_repos.split) / "tokenizer.json").stat().st_size
        assert Path(tokenizer).stat().st_size == size
        # Cut inside huggingface_hub's first 10 MiB chunk: it starts the file again.
        assert control.bytes_sent(standin_repos.split, "tokenizer.json") == size + 1000
        assert [r.fault for r in control.requests() if r.method == "GET"][-2:] == ["drop", None]
        assert control.faults() == []
