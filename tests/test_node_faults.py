"""Faults on one real node: a runner killed mid-stream, the nats-server killed."""

import time
from collections.abc import Iterator

import openai
import psutil
import pytest

from .node_harness import RunningNode, started_node

LONG_PROMPT = "Write a long story about a lighthouse keeper and the sea, in many paragraphs."


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with started_node(tmp_path_factory.mktemp("faults") / "home") as running:
        yield running


def client_for(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    )


def ask_capital(node: RunningNode) -> str:
    with client_for(node) as client:
        completion = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
    return completion.choices[0].message.content or ""


def test_killing_the_runner_mid_stream_ends_the_stream_with_an_error(node: RunningNode) -> None:
    runner = node.descendant("shoal_worker.runner.main")
    client = client_for(node)
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        temperature=0,
        max_tokens=400,
        stream=True,
    )
    received: list[str] = []

    def read_until_the_end() -> None:
        for chunk in stream:
            received.extend(choice.delta.content or "" for choice in chunk.choices)
            if "".join(received) and runner.is_running():
                runner.kill()

    started = time.monotonic()
    with client, pytest.raises(openai.APIError) as raised:
        read_until_the_end()
    assert "".join(received), "the stream delivered text before the kill"
    assert "runner" in str(raised.value).lower()
    assert time.monotonic() - started < 60

    # The worker reports the failure and starts a new runner, which serves again.
    def replaced(checked: RunningNode) -> bool:
        fresh = checked.find_descendant("shoal_worker.runner.main")
        return fresh is not None and fresh.pid != runner.pid and checked.ready_runner_count() == 1

    node.wait_until("a new ready runner", 120, replaced)
    assert "Paris" in ask_capital(node)
    events = node.get("/events?limit=1000").json()["events"]
    assert any(
        entry["event"]["kind"] == "runner_status_changed"
        and entry["event"]["status"]["status"] == "failed"
        for entry in events
    )


def test_killing_nats_server_is_survived(node: RunningNode) -> None:
    server = node.descendant("nats-server")
    server.kill()
    psutil.wait_procs([server], timeout=10)

    def restarted(checked: RunningNode) -> bool:
        fresh = checked.find_descendant("nats-server")
        return fresh is not None and fresh.pid != server.pid

    node.wait_until("a new nats-server", 30, restarted)
    started = time.monotonic()
    node.wait_until(
        "an answer after the restart", 30, lambda checked: "Paris" in ask_capital(checked)
    )
    assert time.monotonic() - started < 30
