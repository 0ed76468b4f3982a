"""Every error a client sees has OpenAI's shape and a fitting status."""

import json

import pytest
from shoal_api.errors import (
    bad_request,
    error_body,
    rejection_error,
    validation_problem,
)
from shoal_shared.commands import CommandRejected, RejectionCode
from shoal_shared.ids import CommandId


@pytest.mark.parametrize(
    ("code", "status"),
    [("not_found", 404), ("invalid", 400), ("conflict", 409), ("unavailable", 503)],
)
def test_rejections_map_to_statuses(code: RejectionCode, status: int) -> None:
    error = rejection_error(CommandRejected(command_id=CommandId("c"), code=code, reason="why"))
    assert (error.status, error.message, error.code) == (status, "why", code)


def test_error_body_has_openai_shape() -> None:
    body = json.loads(error_body(bad_request("nope", param="stop")).model_dump_json())
    assert body == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "stop",
            "code": None,
        }
    }


def test_invalid_json_is_named_as_such() -> None:
    error = validation_problem([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}])
    assert (error.status, error.code, error.param) == (400, "invalid_json", None)


def test_location_becomes_a_parameter_path() -> None:
    error = validation_problem(
        [
            {
                "type": "string_type",
                "loc": ("body", "messages", 0, "content", "str"),
                "msg": "Input should be a valid string",
            }
        ]
    )
    assert error.param == "messages[0].content"
    assert "messages[0].content" in error.message


def test_query_parameters_are_named_without_their_source() -> None:
    error = validation_problem([{"type": "int_parsing", "loc": ("query", "since"), "msg": "m"}])
    assert error.param == "since"
