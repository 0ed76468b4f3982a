"""Request bodies: JSON whatever the content type says, validated into a request model.

Parsing the body ourselves (rather than through a FastAPI body parameter) accepts what
`curl -d '{...}'` sends (form content type, JSON text) and reports every problem in the
OpenAI error shape.
"""

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from shoal_api.errors import bad_request, pydantic_problem

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class LenientRequest(BaseModel):
    """Base of public request bodies: immutable, ignores fields we do not support (as OpenAI
    ignores unknown ones) and coerces what JSON clients commonly send (1 for 1.0)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=False)


def parse_body(raw: bytes, model: type[RequestModel]) -> RequestModel:
    if not raw.strip():
        raise bad_request("the request body is empty: expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise pydantic_problem(error) from None


async def read_body(request: Request, model: type[RequestModel]) -> RequestModel:
    return parse_body(await request.body(), model)
