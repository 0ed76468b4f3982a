"""OpenAI chat requests to Shoal tasks, and chunks back to OpenAI's response shapes."""

import json

import pytest
from shoal_api.bodies import parse_body
from shoal_api.errors import ApiError
from shoal_api.inference import Completion
from shoal_api.openai_chat_schema import ChatCompletionRequest, ContentPart, RequestMessage
from shoal_api.openai_chat_translate import (
    ChunkRenderer,
    chat_completion,
    completion_id,
    flatten_content,
    normalize_stop,
    sampling_parameters,
    to_chat_messages,
)
from shoal_shared.chunks import Usage
from shoal_shared.ids import ModelId, TaskId
from shoal_shared.model_card import ModelCard, builtin_cards
from shoal_shared.tasks import ChatMessage

MODEL = ModelId("smollm2-135m")


@pytest.fixture
def card() -> ModelCard:
    return builtin_cards()[MODEL]


def request(**fields: object) -> ChatCompletionRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_body(json.dumps(body).encode(), ChatCompletionRequest)


def test_string_content_is_kept_as_is() -> None:
    assert flatten_content("  hello\n", 0) == "  hello\n"
    assert flatten_content(None, 0) == ""


def test_text_parts_are_joined() -> None:
    parts = (ContentPart(type="text", text="one"), ContentPart(type="text", text="two"))
    assert flatten_content(parts, 0) == "one\ntwo"


def test_image_parts_are_refused_with_their_parameter() -> None:
    parts = (ContentPart(type="text", text="look"), ContentPart(type="image_url"))
    with pytest.raises(ApiError) as caught:
        flatten_content(parts, 3)
    assert caught.value.status == 400
    assert caught.value.param == "messages[3].content[1]"
    assert "image_url" in caught.value.message


def test_messages_map_developer_to_system() -> None:
    messages = (
        RequestMessage(role="developer", content="be brief"),
        RequestMessage(role="user", content=(ContentPart(type="text", text="hi"),)),
        RequestMessage(role="assistant", content=None),
    )
    assert to_chat_messages(messages) == (
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content=""),
    )


def test_stop_accepts_a_string_or_up_to_four() -> None:
    assert normalize_stop(None) == ()
    assert normalize_stop("END") == ("END",)
    assert normalize_stop(["a", "", "b"]) == ("a", "b")
    with pytest.raises(ApiError) as caught:
        normalize_stop(["a", "b", "c", "d", "e"])
    assert caught.value.param == "stop"


def test_sampling_defaults_come_from_the_model_card(card: ModelCard) -> None:
    sampling = sampling_parameters(request(), card)
    assert sampling.temperature == card.sampling.temperature
    assert sampling.top_p == card.sampling.top_p
    assert sampling.max_tokens is None
    assert sampling.stop == ()
    assert sampling.seed is None


def test_sampling_takes_the_request_values(card: ModelCard) -> None:
    sampling = sampling_parameters(
        request(temperature=0, top_p=0.5, max_tokens=10, stop="\n\n", seed=7), card
    )
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.0, 0.5, 10)
    assert sampling.stop == ("\n\n",)
    assert sampling.seed == 7


def test_max_completion_tokens_wins_over_max_tokens(card: ModelCard) -> None:
    sampling = sampling_parameters(request(max_tokens=10, max_completion_tokens=20), card)
    assert sampling.max_tokens == 20


def test_max_tokens_beyond_the_context_is_refused(card: ModelCard) -> None:
    with pytest.raises(ApiError) as caught:
        sampling_parameters(request(max_tokens=card.context_length + 1), card)
    assert caught.value.param == "max_tokens"


@pytest.mark.parametrize("n", [0, 2])
def test_only_one_choice_is_served(card: ModelCard, n: int) -> None:
    with pytest.raises(ApiError) as caught:
        sampling_parameters(request(n=n), card)
    assert (caught.value.status, caught.value.param) == (400, "n")


def test_unknown_fields_are_ignored_and_numbers_coerced() -> None:
    parsed = request(temperature=1, logprobs=False, user="me", tools=[])
    assert parsed.temperature == 1.0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stop": 3}, "stop"),
    ],
)
def test_bad_fields_name_their_parameter(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        request(**fields)
    assert caught.value.status == 400
    assert caught.value.error_type == "invalid_request_error"
    assert caught.value.param == param


def test_completion_id_is_derived_from_the_task() -> None:
    assert completion_id(TaskId("task-0123abcd")) == "chatcmpl-0123abcd"


def test_chat_completion_shape() -> None:
    completion = Completion(
        text="Paris.", finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=2)
    )
    body = json.loads(chat_completion("chatcmpl-1", 99, "m", completion).model_dump_json())
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 99,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def test_stream_chunks_shape() -> None:
    renderer = ChunkRenderer("chatcmpl-1", 99, "m")
    role = json.loads(renderer.role())
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = json.loads(renderer.content('say "hi"\n'))
    assert content["choices"][0]["delta"] == {"content": 'say "hi"\n'}
    assert content["choices"][0]["finish_reason"] is None
    finish = json.loads(renderer.finish("length"))
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    usage = json.loads(renderer.usage(Usage(prompt_tokens=3, completion_tokens=4)))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
