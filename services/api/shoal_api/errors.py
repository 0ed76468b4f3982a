"""Errors as OpenAI-style JSON: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see goes through `ApiError`, and the handlers installed here turn
framework errors (validation, unknown routes, crashes) into the same shape: a client never
receives a traceback or a bare HTML page.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast, final

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from shoal_shared.commands import CommandRejected, RejectionCode
from shoal_shared.download_commands import DownloadCommandRejected
from shoal_shared.frozen import FrozenModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ErrorType = Literal["invalid_request_error", "not_found_error", "server_error"]

JSON_MEDIA_TYPE: Final = "application/json"


@final
class ApiError(Exception):
    """A failure with the HTTP status and OpenAI error fields a client should get."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: ErrorType,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type: ErrorType = error_type
        self.code = code
        self.param = param


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, error_type="invalid_request_error", code=code, param=param)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, error_type="invalid_request_error", code=code, param=param)


def unavailable(message: str, *, code: str = "unavailable") -> ApiError:
    return ApiError(503, message, error_type="server_error", code=code)


def server_error(message: str, *, code: str = "internal_error", status: int = 500) -> ApiError:
    return ApiError(status, message, error_type="server_error", code=code)


def no_master_error() -> ApiError:
    return unavailable(
        "no master is answering: the cluster is electing one or this node is cut off",
        code="no_master",
    )


_REJECTION_STATUS: Final[Mapping[RejectionCode, tuple[int, ErrorType]]] = {
    "not_found": (404, "invalid_request_error"),
    "invalid": (400, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "unavailable": (503, "server_error"),
}


def rejection_error(rejected: CommandRejected | DownloadCommandRejected) -> ApiError:
    """A master's or a worker's refusal (both use the same codes)."""
    status, error_type = _REJECTION_STATUS[rejected.code]
    return ApiError(status, rejected.reason, error_type=error_type, code=rejected.code)


class ErrorDetail(FrozenModel):
    message: str
    type: ErrorType
    param: str | None
    code: str | None


class ErrorBody(FrozenModel):
    error: ErrorDetail


def error_body(error: ApiError) -> ErrorBody:
    return ErrorBody(
        error=ErrorDetail(
            message=error.message, type=error.error_type, param=error.param, code=error.code
        )
    )


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        content=error_body(error).model_dump_json(),
        status_code=error.status,
        media_type=JSON_MEDIA_TYPE,
        headers=headers,
    )


# Pydantic names the member of a union that failed ("str", "tuple[ContentPart, ...]") in the
# error location; those names are not part of the parameter's path.
_UNION_MEMBER_TAGS: Final = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _is_union_tag(part: str) -> bool:
    return part in _UNION_MEMBER_TAGS or "[" in part


def _param_path(location: Sequence[object]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content", as OpenAI names params."""
    path = ""
    for part in location:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not _is_union_tag(part):
            path += f".{part}" if path else part
    return path or None


def validation_problem(errors: Sequence[object]) -> ApiError:
    """The first problem of a pydantic error list, phrased for a client."""
    for raw in errors:
        if not isinstance(raw, Mapping):
            continue
        # Pydantic documents each error as a dict of "type", "loc", "msg" (ErrorDetails).
        problem = cast(Mapping[str, object], raw)
        kind = problem.get("type")
        if kind == "json_invalid":
            return bad_request(
                "the request body is not valid JSON", code="invalid_json", param=None
            )
        location = problem.get("loc")
        param = (
            _param_path(cast(Sequence[object], location))
            if isinstance(location, tuple | list)
            else None
        )
        message = str(problem.get("msg", "invalid value"))
        if param is None:
            return bad_request(f"invalid request: {message}", code="invalid_value")
        return bad_request(f"invalid '{param}': {message}", param=param, code="invalid_value")
    return bad_request("invalid request", code="invalid_value")


def pydantic_problem(error: ValidationError) -> ApiError:
    return validation_problem(list(error.errors()))


async def _on_api_error(_request: Request, error: Exception) -> Response:
    if not isinstance(error, ApiError):
        return await _on_crash(_request, error)
    return error_response(error)


async def _on_validation_error(_request: Request, error: Exception) -> Response:
    # Only FastAPI's own (query and path parameters): a pydantic ValidationError that escapes
    # a route is a bug of ours, not the client's, and is answered 500 by `_on_crash`.
    if isinstance(error, RequestValidationError):
        return error_response(validation_problem(list(error.errors())))
    return await _on_crash(_request, error)


async def _on_http_exception(_request: Request, error: Exception) -> Response:
    if not isinstance(error, StarletteHTTPException):
        return await _on_crash(_request, error)
    status = error.status_code
    message = error.detail if status != 404 else "no such route"
    error_type: ErrorType = "invalid_request_error" if status < 500 else "server_error"
    code = "not_found" if status == 404 else None
    return error_response(
        ApiError(status, message, error_type=error_type, code=code), headers=error.headers
    )


async def _on_crash(request: Request, error: Exception) -> Response:
    # Logged here with the traceback for the operator; the client gets a plain message.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return error_response(server_error("internal error in the Shoal API"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_crash)
