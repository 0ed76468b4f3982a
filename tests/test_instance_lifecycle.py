"""Placing and deleting instances through the API on a node started without one."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .node_harness import RunningNode, started_node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    def api_up(running: RunningNode) -> None:
        running.wait_until("the API", 60, lambda n: n.get("/healthz").status_code == 200)
        running.wait_until("this node in state", 30, lambda n: len(n.state()["nodes"]) == 1)

    home = tmp_path_factory.mktemp("lifecycle") / "home"
    with started_node(home, "--no-default-model", until=api_up) as running:
        yield running


def chat(node: RunningNode) -> httpx.Response:
    return httpx.post(
        f"{node.base_url}/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
        },
        timeout=60,
    )


def test_no_instance_means_503_with_a_reason(node: RunningNode) -> None:
    response = chat(node)
    assert response.status_code == 503
    message: str = response.json()["error"]["message"]
    assert "smollm2-135m" in message


def test_place_chat_delete(node: RunningNode) -> None:
    placed = httpx.post(f"{node.base_url}/instance", json={"model_id": "smollm2-135m"}, timeout=30)
    assert placed.status_code in (200, 201), placed.text
    body: dict[str, Any] = placed.json()
    instance_id: str = body["instance_id"]
    node.wait_ready()
    answer = chat(node)
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]

    deleted = httpx.delete(f"{node.base_url}/instance/{instance_id}", timeout=30)
    assert deleted.status_code in (200, 204), deleted.text
    node.wait_until("the runner to go", 30, lambda n: n.state()["runners"] == {})
    node.wait_until(
        "the runner process to exit",
        30,
        # find_descendant skips a process that exits while it looks (a zombie not yet reaped).
        lambda n: n.find_descendant("runner.main") is None,
    )
    assert chat(node).status_code == 503
    again = httpx.delete(f"{node.base_url}/instance/{instance_id}", timeout=30)
    assert again.status_code == 404


def test_placing_an_unknown_model_is_404(node: RunningNode) -> None:
    response = httpx.post(f"{node.base_url}/instance", json={"model_id": "nope"}, timeout=30)
    assert response.status_code == 404
    assert "nope" in response.json()["error"]["message"]


def test_impossible_placement_is_refused_with_the_reason(node: RunningNode) -> None:
    response = httpx.post(
        f"{node.base_url}/instance",
        json={"model_id": "smollm2-135m", "sharding": "tensor", "node_count": 2},
        timeout=30,
    )
    assert response.status_code == 400
    assert "2 nodes" in response.json()["error"]["message"]
