"""One real node (`shoal run`): every process separate, real NATS, real MLX, real HTTP."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .node_harness import RunningNode, started_node

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with started_node(tmp_path_factory.mktemp("node") / "home") as running:
        yield running


@pytest.fixture
def client(node: RunningNode) -> Iterator[openai.OpenAI]:
    # Closed, so no socket is left to the garbage collector (warnings are errors here).
    with openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


def test_every_service_is_its_own_process(node: RunningNode) -> None:
    commands = [" ".join(child.cmdline()) for child in node.descendants()]
    for needle in (
        "nats-server",
        "shoal election",
        "shoal master",
        "shoal worker",
        "shoal api",
        "shoal broker",
        "shoal_worker.runner.main",
    ):
        assert sum(needle in command for command in commands) == 1, (needle, commands)


def test_chat_completion_mentions_paris(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.message.content is not None
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert completion.usage.prompt_tokens > 0


def test_streamed_chat_completion_mentions_paris(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish_reasons: list[str] = []
    usage_seen = False
    for chunk in stream:
        if chunk.usage is not None:
            usage_seen = True
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert "Paris" in text
    assert finish_reasons == ["stop"]
    assert usage_seen


def test_greedy_answers_are_repeatable_and_limits_apply(client: openai.OpenAI) -> None:
    def ask() -> str:
        completion = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Name three colours."}],
            temperature=0,
            max_tokens=8,
        )
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 8
        return completion.choices[0].message.content or ""

    assert ask() == ask()


def test_stop_sequences_cut_the_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        stop=["Paris"],
    )
    content = completion.choices[0].message.content or ""
    assert "Paris" not in content
    assert content.startswith("The capital of France is")
    assert completion.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Tell me a short story."}],
            temperature=1.0,
            top_p=0.95,
            max_tokens=12,
            seed=seed,
        )
        return completion.choices[0].message.content or ""

    assert sample(11) == sample(11)


def test_models_list_names_the_bundled_model(client: openai.OpenAI) -> None:
    assert "smollm2-135m" in [model.id for model in client.models.list()]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 404


def test_malformed_bodies_are_400(node: RunningNode) -> None:
    url = f"{node.base_url}/v1/chat/completions"
    not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert "error" in not_json.json()
    wrong_type = httpx.post(url, json={"model": "smollm2-135m", "messages": "hello"})
    assert wrong_type.status_code in (400, 422)
    assert wrong_type.json()["error"]["message"]
    missing = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code in (400, 422)


def test_cluster_endpoints(node: RunningNode) -> None:
    node_id = node.get("/node_id").json()["node_id"]
    state = node.state()
    assert state["master_node_id"] == node_id
    assert node_id in state["nodes"]
    assert node.get("/healthz").status_code == 200
    page = node.get("/events").json()
    assert page["events"][0]["index"] == 0
    kinds = [entry["event"]["kind"] for entry in page["events"]]
    assert "master_elected" in kinds
    assert "node_discovered" in kinds
    assert page["last_index"] >= state["last_index"]
    assert (node.home / "node_id").read_text().strip() == node_id


def test_node_keeps_its_id_across_restarts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = RunningNode(home, "--no-default-model")
    first.start()
    try:
        first.wait_until("the API", 60, lambda n: n.get("/healthz").status_code == 200)
        node_id = first.get("/node_id").json()["node_id"]
    finally:
        first.stop()
    second = RunningNode(home, "--no-default-model")
    second.start()
    try:
        second.wait_until("the API", 60, lambda n: n.get("/healthz").status_code == 200)
        assert second.get("/node_id").json()["node_id"] == node_id
        # A restart opens a new, higher term; the old one's log is still read.
        second.wait_until("a new term", 30, lambda n: n.state()["term"] > 1)
        assert (home / "term").read_text().strip() == str(second.state()["term"])
    finally:
        second.stop()
