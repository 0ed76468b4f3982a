"""The worker's model store against the Hugging Face stand-in: shard-only downloads, resume,
integrity, retries, tokens, offline mode, read-only directories, disk space, cancellation."""

import hashlib
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from shoal_shared.model_card import ModelCard, SamplingDefaults
from shoal_worker.downloads.added_model import card_from_hub
from shoal_worker.downloads.hub import DownloadCancelledError, HubAccess, HubError
from shoal_worker.downloads.progress import DownloadProgress
from shoal_worker.downloads.store import LocalModel, ModelStore

from .hf_standin import (
    HubStandIn,
    StandardRepos,
    build_unsupported_repo,
    clone_repo,
    repo_dir,
    shard_name,
)

MIB = 1 << 20
# huggingface_hub writes bodies in 10 MiB chunks: a resumed transfer repeats less than one.
HUB_CHUNK = 10 * MIB
FIRST_HALF = (0, 15)


@pytest.fixture(autouse=True)
def hub_not_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in is local: an HF_HUB_OFFLINE=1 around the test run must not block it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(standin_repos: StandardRepos) -> Iterator[HubStandIn]:
    with HubStandIn(standin_repos.root) as running:
        yield running


def access(hub: HubStandIn, token: str | None = None, offline: bool = False) -> HubAccess:
    return HubAccess(endpoint=hub.url, token=token, offline=offline)


@pytest.fixture
def card(hub: HubStandIn, standin_repos: StandardRepos) -> ModelCard:
    return card_from_hub(access(hub), standin_repos.split)


def ensure(store: ModelStore, card: ModelCard, layers: tuple[int, int] = FIRST_HALF) -> LocalModel:
    return store.ensure(card, layers[0], layers[1], DownloadProgress(), threading.Event())


def weight_files(directory: Path) -> set[str]:
    return {path.name for path in directory.glob("*.safetensors")}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pipeline_shard_fetches_only_its_own_weight_files(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models", (), access(hub))
    first = ensure(store, card, (0, 15))
    # Layers 0-14 are in files 2 (0-9) and 3 (10-19); file 1 holds embedding and norm.
    assert weight_files(first.path) == {shard_name(1, 4), shard_name(2, 4), shard_name(3, 4)}
    fetched = {record.filename for record in hub.requests if record.method == "GET"}
    assert shard_name(4, 4) not in fetched
    assert (first.start_layer, first.end_layer) == (0, 20)
    assert not first.read_only
    for name in weight_files(first.path):
        assert sha256_of(first.path / name) == sha256_of(repo_dir(hub.root, card.model_id) / name)

    hub.clear_log()
    second = ensure(store, card, (20, 30))
    fetched = [record.filename for record in hub.requests if record.method == "GET"]
    # Only the missing file: what is on disk and verified is not fetched again.
    assert [name for name in fetched if name and name.endswith(".safetensors")] == [
        shard_name(4, 4)
    ]
    # Both shards' files: the node now has the whole model.
    assert (second.start_layer, second.end_layer) == (0, 30)


def test_a_download_cut_mid_file_resumes_where_it_stopped(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    target = shard_name(2, 4)
    size = (repo_dir(hub.root, card.model_id) / target).stat().st_size
    assert size > 15 * MIB
    hub.drop(target, after_bytes=15 * MIB)
    local = ensure(ModelStore(tmp_path / "models", (), access(hub)), card)
    assert hub.bytes_sent(card.model_id, target) < size + HUB_CHUNK
    ranged = [r for r in hub.requests if r.filename == target and r.method == "GET" and r.range]
    assert ranged, "the second request asked for the rest only"
    assert sha256_of(local.path / target) == sha256_of(repo_dir(hub.root, card.model_id) / target)


def test_a_reset_connection_is_resumed_too(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    target = shard_name(3, 4)
    size = (repo_dir(hub.root, card.model_id) / target).stat().st_size
    hub.drop(target, after_bytes=12 * MIB, reset=True)
    local = ensure(ModelStore(tmp_path / "models", (), access(hub)), card)
    # A reset discards what the client had not read yet, so less may be kept than after a
    # clean close; never more than the cut-off part is fetched twice.
    assert hub.bytes_sent(card.model_id, target) <= size + 12 * MIB
    assert sha256_of(local.path / target) == sha256_of(repo_dir(hub.root, card.model_id) / target)


def test_a_corrupted_file_is_fetched_again_and_never_kept(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    target = shard_name(2, 4)
    hub.corrupt(target)
    local = ensure(ModelStore(tmp_path / "models", (), access(hub)), card)
    full_gets = [r for r in hub.requests if r.filename == target and r.method == "GET"]
    assert len(full_gets) == 2
    assert sha256_of(local.path / target) == sha256_of(repo_dir(hub.root, card.model_id) / target)


def test_a_file_that_stays_corrupt_fails_and_is_not_used(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    target = shard_name(2, 4)
    hub.corrupt(target, times=None)
    store = ModelStore(tmp_path / "models", (), access(hub))
    with pytest.raises(HubError, match="integrity check 3 times"):
        ensure(store, card)
    assert store.find_local(card, *FIRST_HALF) is None
    assert not (store.own_dir(card) / target).exists()


def test_429_backs_off_as_told_and_succeeds(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    hub.rate_limit(times=2, retry_after=1, filename=shard_name(1, 4), method="GET")
    hub.rate_limit(times=1, retry_after=1, filename=None, method="GET", repo=card.model_id)
    started = time.monotonic()
    local = ensure(ModelStore(tmp_path / "models", (), access(hub)), card)
    assert time.monotonic() - started >= 2
    assert shard_name(1, 4) in weight_files(local.path)
    assert sum(1 for record in hub.requests if record.status == 429) == 3


def test_401_names_hf_token(hub: HubStandIn, standin_repos: StandardRepos, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="HF_TOKEN is not set"):
        card_from_hub(access(hub), standin_repos.private)
    with pytest.raises(HubError, match="HF_TOKEN is set but was refused"):
        card_from_hub(access(hub, token="hf_wrong"), standin_repos.private)
    with_token = access(hub, token=standin_repos.private_token)
    private_card = card_from_hub(with_token, standin_repos.private)
    local = ensure(ModelStore(tmp_path / "models", (), with_token), private_card)
    assert shard_name(1, 4) in weight_files(local.path)


def test_offline_mode_uses_local_files_and_says_so_without_them(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    ensure(ModelStore(models, (), access(hub)), card)
    hub.clear_log()
    offline = ModelStore(models, (), access(hub, offline=True))
    assert ensure(offline, card).path == offline.own_dir(card)
    with pytest.raises(HubError, match=r"offline .* layers 20-29 .* not on this node"):
        ensure(offline, card, (20, 30))
    assert hub.requests == []


def test_a_read_only_directory_is_used_and_never_written(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    hub.clear_log()
    shelf = tmp_path / "shelf"
    shutil.copytree(repo_dir(hub.root, card.model_id), shelf / card.model_id)
    for path in sorted(shelf.rglob("*"), reverse=True):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = {path: path.stat().st_mtime_ns for path in shelf.rglob("*")}
    models = tmp_path / "models"
    try:
        store = ModelStore(models, (shelf,), access(hub, offline=True))
        local = ensure(store, card, (0, 30))
        assert local.read_only
        assert local.path == shelf / card.model_id
        assert (local.start_layer, local.end_layer) == (0, 30)
        scanned = store.scan(card)
        assert scanned is not None
        assert scanned.read_only
        assert not store.delete(card)
    finally:
        after = {path: path.stat().st_mtime_ns for path in shelf.rglob("*")}
        for path in shelf.rglob("*"):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert after == before
    assert not models.exists() or not any(models.rglob("*.safetensors"))
    assert hub.requests == []


def test_too_little_free_disk_fails_before_fetching_weights(
    hub: HubStandIn, card: ModelCard, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models", (), access(hub), free_disk=lambda _path: 1_000_000)
    with pytest.raises(HubError, match=r"needs 0\.\d\d GB more .* only 0\.00 GB free"):
        ensure(store, card)
    assert not any(r.filename and r.filename.endswith(".safetensors") for r in hub.requests)


def test_a_cancelled_download_stops_and_resumes_later(
    standin_repos: StandardRepos, card: ModelCard, tmp_path: Path
) -> None:
    store_dir = tmp_path / "models"
    with HubStandIn(standin_repos.root, bytes_per_second=8 * MIB) as slow:
        store = ModelStore(store_dir, (), access(slow))
        progress = DownloadProgress()
        cancelled = threading.Event()
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                store.ensure(card, 0, 15, progress, cancelled)
            except BaseException as error:
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        while progress.fetched_bytes < 12 * MIB:
            time.sleep(0.05)
        cancelled.set()
        worker.join(timeout=30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], DownloadCancelledError)
        names = [shard_name(index, 4) for index in (1, 2, 3)]
        sent_before = {name: slow.bytes_sent(card.model_id, name) for name in names}
    with HubStandIn(standin_repos.root) as fast:
        local = ensure(ModelStore(store_dir, (), access(fast)), card)
        for name in names:
            size = (local.path / name).stat().st_size
            resent = sent_before[name] + fast.bytes_sent(card.model_id, name) - size
            # What reached this node before the cancel is kept, bar the chunk in hand and
            # what was still in the socket's buffers.
            assert resent < 2 * HUB_CHUNK


def test_delete_removes_own_files(hub: HubStandIn, card: ModelCard, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", (), access(hub))
    ensure(store, card)
    assert store.scan(card) is not None
    assert store.delete(card)
    assert store.scan(card) is None
    assert not store.own_dir(card).exists()


def test_a_card_is_made_from_the_config_and_an_unknown_architecture_refused(
    hub: HubStandIn, standin_repos: StandardRepos
) -> None:
    made = card_from_hub(access(hub), standin_repos.split)
    assert (made.architecture, made.layers, made.attention_heads, made.kv_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert made.hf_repo == standin_repos.split
    assert made.quantization == "4bit"
    assert "chat" in made.capabilities
    repo_bytes = sum(
        path.stat().st_size for path in repo_dir(hub.root, made.model_id).glob("*.safetensors")
    )
    assert made.storage_bytes == repo_bytes
    with pytest.raises(HubError, match="'not_a_real_arch' is not supported by mlx-lm"):
        card_from_hub(access(hub), standin_repos.unsupported)
    with pytest.raises(HubError, match="no model repository"):
        card_from_hub(access(hub), "shoal-test/nothing-here")
    with pytest.raises(HubError, match="not a Hugging Face repository id"):
        card_from_hub(access(hub), "no-slash")


def test_an_added_card_takes_the_repos_sampling_recommendation(
    standin_repos: StandardRepos, tmp_path: Path
) -> None:
    recommending = "shoal-test/recommends-sampling"
    clone_repo(standin_repos.root, standin_repos.split, recommending)
    # A fresh file, not the hard link the clone made: the standard repo stays as it is.
    generation = repo_dir(standin_repos.root, recommending) / "generation_config.json"
    generation.unlink()
    generation.write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.95}')
    try:
        with HubStandIn(standin_repos.root) as own_hub:
            made = card_from_hub(access(own_hub), recommending)
            assert made.sampling == SamplingDefaults(temperature=0.6, top_p=0.95)
            generation.unlink()
            generation.write_text("{not json")
            # Only a recommendation: a broken one leaves the defaults, the model is added.
            assert card_from_hub(access(own_hub), recommending).sampling == SamplingDefaults()
        with HubStandIn(standin_repos.root) as own_hub:
            plain = card_from_hub(access(own_hub), standin_repos.split)
        assert plain.sampling == SamplingDefaults()
    finally:
        shutil.rmtree(repo_dir(standin_repos.root, recommending))


def test_a_bad_repo_id_or_config_is_a_hub_error(hub: HubStandIn, tmp_path: Path) -> None:
    # huggingface_hub's own validation (a ValueError) must not escape as something else.
    for bad in ("shoal-test/..", "shoal-test/with space"):
        with pytest.raises(HubError, match="is not a Hugging Face repository id"):
            card_from_hub(access(hub), bad)
    broken = "shoal-test/broken-config"
    build_unsupported_repo(tmp_path, broken)
    (repo_dir(tmp_path, broken) / "config.json").write_text("{not json")
    with HubStandIn(tmp_path) as own_hub, pytest.raises(HubError, match="not valid JSON"):
        card_from_hub(access(own_hub), broken)
    (repo_dir(tmp_path, broken) / "config.json").write_text("[1, 2]")
    with HubStandIn(tmp_path) as own_hub, pytest.raises(HubError, match="not a JSON object"):
        card_from_hub(access(own_hub), broken)
