"""Download records and added models in the fold."""

from functools import reduce

from shoal_shared.apply import apply
from shoal_shared.downloads import (
    Download,
    DownloadCompleted,
    DownloadFailed,
    DownloadOngoing,
    DownloadStatus,
)
from shoal_shared.events import (
    DownloadRemoved,
    DownloadUpdated,
    Event,
    ModelAdded,
    NodeDiscovered,
    NodeLost,
)
from shoal_shared.ids import ModelId
from shoal_shared.model_card import builtin_cards
from shoal_shared.state import State
from shoal_shared.testing import NODE_A, NODE_B, indexed

MODEL = ModelId("mlx-community/Llama-3.2-1B-Instruct-4bit")


def fold(events: list[Event]) -> State:
    return reduce(apply, [indexed(index, event) for index, event in enumerate(events)], State())


def update(status: DownloadStatus, node_id: str = NODE_A, model_id: ModelId = MODEL) -> Event:
    return DownloadUpdated(
        download=Download(
            node_id=NODE_A if node_id == NODE_A else NODE_B,
            model_id=model_id,
            start_layer=0,
            end_layer=8,
            layer_count=16,
            status=status,
        )
    )


ONGOING = DownloadOngoing(bytes_done=5, bytes_total=10, bytes_per_second=1.0, eta_seconds=5.0)
DONE = DownloadCompleted(bytes_total=10, path="/m")


def test_the_latest_update_per_node_and_model_wins() -> None:
    state = fold([update(ONGOING), update(DONE), update(ONGOING, NODE_B)])
    assert state.downloads[NODE_A][MODEL].status == DONE
    assert state.downloads[NODE_B][MODEL].status == ONGOING
    assert state.downloads[NODE_A][MODEL].covers(0, 8)
    assert not state.downloads[NODE_A][MODEL].covers(0, 9)
    assert not state.downloads[NODE_B][MODEL].covers(0, 8)


def test_removal_forgets_the_record_and_an_empty_node() -> None:
    state = fold(
        [update(DONE), update(DONE, NODE_B), DownloadRemoved(node_id=NODE_A, model_id=MODEL)]
    )
    assert NODE_A not in state.downloads
    assert MODEL in state.downloads[NODE_B]


def test_a_lost_node_keeps_its_files_but_not_its_running_downloads() -> None:
    other = ModelId("mlx-community/Qwen3-0.6B-4bit")
    state = fold(
        [
            NodeDiscovered(node_id=NODE_A),
            update(DONE),
            update(ONGOING, model_id=other),
            NodeLost(node_id=NODE_A),
        ]
    )
    assert state.downloads[NODE_A][MODEL].status == DONE
    failed = state.downloads[NODE_A][other].status
    assert isinstance(failed, DownloadFailed)
    assert "left the cluster" in failed.reason


def test_added_models_join_state() -> None:
    card = builtin_cards()[MODEL].model_copy(update={"model_id": ModelId("org/custom")})
    state = fold([ModelAdded(card=card)])
    assert state.added_models[ModelId("org/custom")] == card
