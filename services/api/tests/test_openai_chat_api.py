"""`POST /v1/chat/completions` over real HTTP and NATS, with a fake master and worker."""

import asyncio

import httpx
import openai
import pytest
from shoal_api.context import ApiContext
from shoal_api.testing import (
    ANSWER,
    ANSWER_PROMPT_TOKENS,
    BUNDLED_MODEL_ID,
    TEST_INSTANCE_ID,
    TEST_NODE_ID,
    TEST_RUNNER_ID,
    FakeMaster,
    answer_script,
    cards_for_tests,
    token_chunks,
)
from shoal_shared.chunks import Chunk, ErrorChunk, FinishChunk, Usage
from shoal_shared.commands import RejectionCode
from shoal_shared.events import RunnerStatusChanged
from shoal_shared.runner_status import RunnerLoading
from shoal_shared.tasks import ChatTask

MODEL = BUNDLED_MODEL_ID
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def gap_script(task: ChatTask) -> list[Chunk]:
    first, _lost, third = token_chunks(task, ["a", "b", "c"])
    return [first, third]


def error_script(task: ChatTask) -> list[Chunk]:
    return [*token_chunks(task, ["a"]), ErrorChunk(task_id=task.task_id, sequence=1, message="oom")]


def stalling_script(task: ChatTask) -> list[Chunk]:
    return token_chunks(task, ["a"])


async def test_non_streaming_completion(
    client: openai.AsyncOpenAI, fake_master: FakeMaster, api_context: ApiContext
) -> None:
    response = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is the capital"},
                    {"type": "text", "text": "of France?"},
                ],
            },
        ],
        max_tokens=16,
        seed=3,
    )
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "".join(ANSWER)
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    assert response.usage.prompt_tokens == ANSWER_PROMPT_TOKENS
    assert response.usage.completion_tokens == len(ANSWER)
    assert response.usage.total_tokens == ANSWER_PROMPT_TOKENS + len(ANSWER)
    [task] = fake_master.submitted()
    assert task.instance_id == TEST_INSTANCE_ID
    assert task.requester_node_id == TEST_NODE_ID
    assert [(message.role, message.content) for message in task.messages] == [
        ("system", "Be brief."),
        ("user", "What is the capital\nof France?"),
    ]
    # What the request left unset comes from the model card.
    card = cards_for_tests()[MODEL]
    assert task.sampling.temperature == card.sampling.temperature
    assert task.sampling.top_p == card.sampling.top_p
    assert (task.sampling.max_tokens, task.sampling.seed) == (16, 3)
    # The task finished: there is nothing to cancel.
    await api_context.background.drain(5)
    assert fake_master.cancelled.empty()


async def test_streaming_completion(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(ANSWER)
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ANSWER)
    assert len({chunk.id for chunk in chunks}) == 1


async def test_a_stream_is_server_sent_events_ending_in_done(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    # The role, one event per token, the finish; no usage chunk unless asked for.
    assert len(lines) == 1 + len(ANSWER) + 1 + 1


async def test_a_sequence_gap_fails_the_response(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    fake_master.script = gap_script
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "chunk_gap"
    assert "never arrived" in error["message"]
    # Asked once more (the client had seen nothing), then given up; each task may still be
    # running somewhere, so each is cancelled.
    first, second = fake_master.submitted()
    cancelled = {await asyncio.wait_for(fake_master.cancelled.get(), 5) for _ in range(2)}
    assert cancelled == {first.task_id, second.task_id}


async def test_a_gap_once_is_retried_invisibly(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    scripts = iter([gap_script, answer_script])
    fake_master.script = lambda task: next(scripts)(task)
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert len(fake_master.submitted()) == 2


async def test_a_sequence_gap_fails_the_stream(
    client: openai.AsyncOpenAI, fake_master: FakeMaster
) -> None:
    fake_master.script = gap_script
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="never arrived"):
        await consume()
    assert "".join(received) == "a"


async def test_an_error_chunk_fails_the_response(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    fake_master.script = error_script
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "inference failed: oom"
    async with http.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as r:
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1].startswith('data: {"error":')
    assert "inference failed: oom" in lines[-1]
    assert "data: [DONE]" not in lines


async def test_a_silent_worker_times_out(http: httpx.AsyncClient, fake_master: FakeMaster) -> None:
    fake_master.script = stalling_script
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    [task] = fake_master.submitted()
    assert await asyncio.wait_for(fake_master.cancelled.get(), 5) == task.task_id


async def test_a_stream_client_that_hangs_up_cancels_its_task(
    http: httpx.AsyncClient, fake_master: FakeMaster, api_context: ApiContext
) -> None:
    fake_master.script = stalling_script
    async with http.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as r:
        async for line in r.aiter_lines():
            if '"content":"a"' in line:
                break  # leaving the block closes the connection mid-stream
    [task] = fake_master.submitted()
    # Well before the chunk timeout would have cancelled it anyway.
    async with asyncio.timeout(api_context.timeouts.chunk_seconds / 2):
        assert await fake_master.cancelled.get() == task.task_id


async def test_a_client_that_gives_up_waiting_cancels_its_task(
    http: httpx.AsyncClient, fake_master: FakeMaster, api_context: ApiContext
) -> None:
    fake_master.script = stalling_script
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", json=HELLO, timeout=0.5)
    [task] = fake_master.submitted()
    async with asyncio.timeout(api_context.timeouts.chunk_seconds / 2):
        assert await fake_master.cancelled.get() == task.task_id


async def test_an_unknown_model_is_404(client: openai.AsyncOpenAI, fake_master: FakeMaster) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    assert fake_master.commands == []


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        content=b'{"model": "smollm2-135m", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "the request body is not valid JSON",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
    }


IMAGE_MESSAGE = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 3}, "n"),
        ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"model": 7}, "model"),
        ({"messages": [IMAGE_MESSAGE]}, "messages[0].content[0]"),
    ],
)
async def test_bad_requests_are_400(
    http: httpx.AsyncClient, fake_master: FakeMaster, fields: dict[str, object], param: str
) -> None:
    response = await http.post("/v1/chat/completions", json={**HELLO, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert fake_master.commands == []


async def test_a_body_without_json_content_type_is_still_read(http: httpx.AsyncClient) -> None:
    # What `curl -d '{...}'` sends.
    body = b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}'
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = await http.post("/v1/chat/completions", content=body, headers=form)
    assert response.status_code == 200


async def test_unknown_routes_and_methods_have_the_error_shape(http: httpx.AsyncClient) -> None:
    missing = await http.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = await http.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


async def test_a_loading_model_is_503_with_its_progress(
    client: openai.AsyncOpenAI, fake_master: FakeMaster, api_context: ApiContext
) -> None:
    loading = RunnerLoading(layers_loaded=12, layers_total=30)
    await fake_master.append(
        RunnerStatusChanged(
            runner_id=TEST_RUNNER_ID,
            instance_id=TEST_INSTANCE_ID,
            node_id=TEST_NODE_ID,
            status=loading,
        )
    )
    last_index = fake_master.state.last_index
    assert await api_context.cluster.wait_for_state(lambda s: s.last_index == last_index, 10)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 503
    assert caught.value.code == "model_not_ready"
    assert f"loading (layers 12/30) on node {TEST_NODE_ID}" in caught.value.message
    assert fake_master.commands == []


async def test_a_model_with_no_instance_is_503(http: httpx.AsyncClient) -> None:
    unplaced = next(model for model in cards_for_tests() if model != MODEL)
    response = await http.post("/v1/chat/completions", json={**HELLO, "model": unplaced})
    assert response.status_code == 503
    assert f"no instance of model {unplaced} is placed" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("code", "status"), [("unavailable", 503), ("conflict", 409), ("invalid", 400)]
)
async def test_a_rejected_task_maps_to_a_status(
    http: httpx.AsyncClient,
    fake_master: FakeMaster,
    api_context: ApiContext,
    code: RejectionCode,
    status: int,
) -> None:
    fake_master.submit_rejection = code
    response = await http.post("/v1/chat/completions", json={**HELLO, "stream": True})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    # The master never created the task: there is nothing to cancel.
    await api_context.background.drain(5)
    assert fake_master.cancelled.empty()


async def test_no_master_is_503(
    http: httpx.AsyncClient, fake_master: FakeMaster, api_context: ApiContext
) -> None:
    await fake_master.stop_answering_commands()
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_master"
    # Nobody received the task: nothing to cancel.
    await api_context.background.drain(5)
    assert fake_master.commands == []


async def test_a_master_that_does_not_reply_is_503_and_the_task_is_cancelled(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    fake_master.replying = False
    response = await http.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_master"
    # It may have accepted the task before its reply got lost: the task is cancelled.
    [task] = fake_master.submitted()
    assert await asyncio.wait_for(fake_master.cancelled.get(), 5) == task.task_id


async def test_tokens_stream_without_per_token_delay(
    http: httpx.AsyncClient, fake_master: FakeMaster
) -> None:
    """A regression guard for the hot path: thousands of tokens a second get through (a
    runner makes tens to hundreds), so no polling or sleeping sits between NATS and HTTP."""
    count = 2000

    def long_script(task: ChatTask) -> list[Chunk]:
        finish = FinishChunk(
            task_id=task.task_id,
            sequence=count,
            finish_reason="length",
            usage=Usage(prompt_tokens=1, completion_tokens=count),
        )
        return [*token_chunks(task, ["x"] * count), finish]

    fake_master.script = long_script
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    elapsed = loop.time() - started
    assert len(events) == 1 + count + 1 + 1
    assert '"finish_reason":"length"' in events[-2]
    assert elapsed < 10
