"""Download routes over real HTTP and NATS, answered by a real `DownloadManager` (offline, over
a temporary models directory) whose events reach the replica through the fake master."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from pydantic import TypeAdapter
from shoal_api.testing import (
    BUNDLED_MODEL_ID,
    TEST_NODE_ID,
    WORKER_START_SECONDS_IN_TESTS,
    FakeMaster,
    cards_for_tests,
)
from shoal_shared.bus import Bus
from shoal_shared.downloads import Download, DownloadCompleted
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard
from shoal_shared.settings import NodeSettings
from shoal_worker.downloads.hub import HubAccess
from shoal_worker.downloads.manager import DownloadManager
from shoal_worker.downloads.store import MANIFEST, ModelStore

# On disk before the worker starts (it announces it as completed).
PLANTED: Final = ModelId("mlx-community/Qwen3-0.6B-4bit")
# In the catalogue, with no files anywhere.
ABSENT: Final = ModelId("mlx-community/Llama-3.2-1B-Instruct-4bit")
PLANTED_WEIGHT_BYTES: Final = 4096
PLANTED_CONFIG: Final = json.dumps({"model_type": "qwen3"})
# A completed download counts every file of the model, not only the weights.
PLANTED_BYTES: Final = PLANTED_WEIGHT_BYTES + len(PLANTED_CONFIG)
_DOWNLOADS: Final = TypeAdapter(list[Download])
# Nothing listens there, and offline mode never tries.
NO_HUB: Final = HubAccess(endpoint="http://127.0.0.1:9", token=None, offline=True)


def plant_model(models_dir: Path, repo: str) -> Path:
    """A verified own copy: config.json, weights, and the manifest the store trusts."""
    directory = models_dir / "hub" / repo
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(PLANTED_CONFIG)
    (directory / "model.safetensors").write_bytes(b"\0" * PLANTED_WEIGHT_BYTES)
    files: dict[str, dict[str, int]] = {}
    for name in ("config.json", "model.safetensors"):
        stat = (directory / name).stat()
        files[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (directory / MANIFEST).parent.mkdir(parents=True)
    (directory / MANIFEST).write_text(json.dumps({"files": files}))
    return directory


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "worker-models"


@pytest.fixture
async def worker(
    settings: NodeSettings, fake_master: FakeMaster, models_dir: Path
) -> AsyncIterator[DownloadManager]:
    plant_model(models_dir, PLANTED)
    bus = await Bus.connect(settings.nats_url, name="worker-under-test")

    def cards() -> dict[ModelId, ModelCard]:
        return {**cards_for_tests(), **fake_master.state.added_models}

    manager = DownloadManager(
        bus,
        TEST_NODE_ID,
        ModelStore(models_dir, (), NO_HUB),
        fake_master.emit,
        cards,
        # The fake cluster's ready instance serves the bundled model on this node.
        lambda model_id: model_id == BUNDLED_MODEL_ID,
    )
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()
        await bus.close()


async def models_by_id(http: httpx.AsyncClient) -> dict[str, Any]:
    listing: dict[str, Any] = (await http.get("/v1/models")).json()
    return {model["id"]: model for model in listing["data"]}


async def record_of(http: httpx.AsyncClient, model_id: str) -> dict[str, Any] | None:
    records: list[dict[str, Any]] = (await http.get("/downloads")).json()
    return next((record for record in records if record["model_id"] == model_id), None)


async def wait_for_status(http: httpx.AsyncClient, model_id: str, status: str) -> dict[str, Any]:
    """The model's record once it has `status`: the worker's events travel through the log
    before the API sees them."""
    async with asyncio.timeout(10):
        while True:
            record = await record_of(http, model_id)
            if record is not None and record["status"]["status"] == status:
                return record
            await asyncio.sleep(0.05)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.usefixtures("worker")
async def test_a_bundled_model_needs_no_download(http: httpx.AsyncClient) -> None:
    response = await http.post("/download/start", json={"model_id": BUNDLED_MODEL_ID})
    assert response.status_code == 202
    assert response.json() == {
        "node_id": TEST_NODE_ID,
        "model_id": BUNDLED_MODEL_ID,
        "detail": f"{BUNDLED_MODEL_ID} is bundled with Shoal",
        "download": None,
    }
    bundled = (await models_by_id(http))[BUNDLED_MODEL_ID]
    assert (bundled["source"], bundled["downloaded"], bundled["downloads"]) == (
        "bundled",
        True,
        [],
    )
    assert bundled["storage_bytes"] > 0


@pytest.mark.usefixtures("worker")
async def test_an_offline_download_fails_in_state(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/download/start", json={"model_id": ABSENT, "node_id": TEST_NODE_ID}
    )
    assert response.status_code == 202
    answer = response.json()
    assert answer["detail"] == f"downloading layers 0-15 of {ABSENT}"
    # Read-your-writes: the record of this download is in the replica when 202 arrives.
    assert answer["download"] is not None
    failed = await wait_for_status(http, ABSENT, "failed")
    assert "offline" in failed["status"]["reason"]
    assert (failed["node_id"], failed["start_layer"], failed["end_layer"]) == (TEST_NODE_ID, 0, 16)
    listed = (await models_by_id(http))[ABSENT]
    assert listed["downloaded"] is False
    assert [(row["status"], row["bytes_done"], row["path"]) for row in listed["downloads"]] == [
        ("failed", 0, None)
    ]
    assert "offline" in listed["downloads"][0]["reason"]


@pytest.mark.usefixtures("worker")
async def test_files_on_disk_are_listed_then_deleted(
    http: httpx.AsyncClient, models_dir: Path
) -> None:
    record = await wait_for_status(http, PLANTED, "completed")
    directory = models_dir / "hub" / PLANTED
    assert record["status"]["path"] == str(directory)
    listed = (await models_by_id(http))[PLANTED]
    assert listed["downloaded"] is True
    assert listed["downloads"] == [
        {
            "node_id": TEST_NODE_ID,
            "status": "completed",
            "start_layer": 0,
            "end_layer": 28,
            "bytes_done": PLANTED_BYTES,
            "bytes_total": PLANTED_BYTES,
            "path": str(directory),
            "reason": None,
        }
    ]
    # Already there: accepted, and the completed record stands.
    again = await http.post("/download/start", json={"model_id": PLANTED})
    assert again.status_code == 202
    assert again.json()["download"]["status"]["status"] == "completed"

    deleted = await http.delete(f"/download/{TEST_NODE_ID}/{PLANTED}")
    assert deleted.status_code == 200
    assert deleted.json()["detail"] == f"deleted {PLANTED} from this node"
    assert not directory.exists()
    # Read-your-writes: the record is gone once the delete returned.
    assert await record_of(http, PLANTED) is None
    after = (await models_by_id(http))[PLANTED]
    assert (after["downloaded"], after["downloads"]) == (False, [])

    twice = await http.delete(f"/download/{TEST_NODE_ID}/{PLANTED}")
    assert twice.status_code == 404
    assert error_of(twice)["message"] == f"{PLANTED} has no files on this node"


@pytest.mark.usefixtures("worker")
async def test_bad_download_requests(http: httpx.AsyncClient) -> None:
    not_json = await http.post("/download/start", content=b"{not json")
    assert not_json.status_code == 400
    assert error_of(not_json)["code"] == "invalid_json"
    empty = await http.post("/download/start", content=b"")
    assert empty.status_code == 400
    no_model = await http.post("/download/start", json={"node_id": TEST_NODE_ID})
    assert (no_model.status_code, error_of(no_model)["param"]) == (400, "model_id")
    negative = await http.post("/download/start", json={"model_id": ABSENT, "start_layer": -1})
    assert (negative.status_code, error_of(negative)["param"]) == (400, "start_layer")

    unknown = await http.post("/download/start", json={"model_id": "org/no-such-model"})
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "model_not_found"
    nowhere = await http.post(
        "/download/start", json={"model_id": ABSENT, "node_id": "node-nowhere"}
    )
    assert nowhere.status_code == 404
    assert error_of(nowhere) == {
        "message": "no node 'node-nowhere' in the cluster",
        "type": "invalid_request_error",
        "param": "node_id",
        "code": "node_not_found",
    }
    # The worker's own refusals, by code.
    backwards = await http.post(
        "/download/start", json={"model_id": ABSENT, "start_layer": 5, "end_layer": 2}
    )
    assert backwards.status_code == 400
    assert error_of(backwards)["message"] == "layers 5-2 do not fit 16 layers"
    idle = await http.post("/download/cancel", json={"model_id": ABSENT})
    assert idle.status_code == 404
    assert error_of(idle)["message"] == f"no download of {ABSENT} is running"
    in_use = await http.delete(f"/download/{TEST_NODE_ID}/{BUNDLED_MODEL_ID}")
    assert in_use.status_code == 409
    assert "delete its instance first" in error_of(in_use)["message"]
    elsewhere = await http.delete(f"/download/node-nowhere/{ABSENT}")
    assert error_of(elsewhere)["code"] == "node_not_found"
    unknown_delete = await http.delete(f"/download/{TEST_NODE_ID}/org/no-such-model")
    assert error_of(unknown_delete)["code"] == "model_not_found"


@pytest.mark.usefixtures("worker")
async def test_adding_models(http: httpx.AsyncClient) -> None:
    known = await http.post("/models/add", json={"model_id": PLANTED})
    assert known.status_code == 200
    assert ModelCard.model_validate_json(known.content).model_id == PLANTED
    offline = await http.post("/models/add", json={"model_id": "org/name"})
    assert offline.status_code == 400
    assert error_of(offline)["message"] == "cannot add org/name: this node is offline"
    not_a_repo = await http.post("/models/add", json={"model_id": "just-a-name"})
    assert not_a_repo.status_code == 400
    assert "is not a Hugging Face repository id" in error_of(not_a_repo)["message"]
    bad = await http.post("/models/add", content=b"[1, 2")
    assert (bad.status_code, error_of(bad)["code"]) == (400, "invalid_json")


async def test_a_worker_still_starting_is_waited_for(
    http: httpx.AsyncClient, worker: DownloadManager
) -> None:
    await worker.stop()
    asking = asyncio.create_task(http.post("/download/cancel", json={"model_id": ABSENT}))
    await asyncio.sleep(WORKER_START_SECONDS_IN_TESTS / 4)
    assert not asking.done()
    await worker.start()
    answered = await asking
    # The worker's own answer, not the API's 503.
    assert answered.status_code == 404
    assert error_of(answered)["message"] == f"no download of {ABSENT} is running"


async def test_a_silent_worker_is_503(http: httpx.AsyncClient, worker: DownloadManager) -> None:
    await worker.stop()
    response = await http.post("/download/start", json={"model_id": ABSENT})
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "worker_unavailable"
    assert error["message"].startswith(f"the worker of node {TEST_NODE_ID} did not answer")


@pytest.mark.usefixtures("worker")
async def test_downloads_lists_every_record(http: httpx.AsyncClient) -> None:
    await wait_for_status(http, PLANTED, "completed")
    response = await http.get("/downloads")
    assert response.status_code == 200
    records = _DOWNLOADS.validate_json(response.content)
    assert [(record.node_id, record.model_id) for record in records] == [(TEST_NODE_ID, PLANTED)]
    assert isinstance(records[0].status, DownloadCompleted)
