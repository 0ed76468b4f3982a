"""The CLI's side of a node's HTTP API: typed replies, and every failure as one sentence."""

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self, TypeVar, final
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from shoal_shared.downloads import Download
from shoal_shared.settings import DEFAULT_API_PORT

# Long enough for a download command (the API waits up to ~12 s for the worker and its
# replica); short enough that a node that stopped answering is reported, not waited on.
REQUEST_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)

Body = TypeVar("Body", bound=BaseModel)
_DOWNLOADS: Final[TypeAdapter[list[Download]]] = TypeAdapter(list[Download])


class CliError(Exception):
    """A failure worded for the person at the terminal (printed as `shoal: <message>`)."""


class NodeRefusedError(CliError):
    """The node answered with an error status (its message is the error's)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def default_api_url(environment: Mapping[str, str] | None = None) -> str:
    environment = os.environ if environment is None else environment
    raw = environment.get("SHOAL_API_PORT", "").strip()
    if not raw:
        return f"http://127.0.0.1:{DEFAULT_API_PORT}"
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise CliError(f"SHOAL_API_PORT={raw!r} is not a port number")
    return f"http://127.0.0.1:{int(raw)}"


class _Reply(BaseModel):
    """A node's reply as this CLI reads it: fields it does not know are ignored, so that a
    newer node's additions do not break an older CLI."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class ModelFilesView(_Reply):
    node_id: str
    status: str
    start_layer: int
    end_layer: int
    bytes_done: int
    bytes_total: int
    path: str | None = None
    reason: str | None = None


class ModelView(_Reply):
    id: str
    storage_bytes: int = 0
    placed: bool = False
    ready: bool = False
    source: str = "huggingface"
    downloaded: bool = False
    downloads: tuple[ModelFilesView, ...] = ()


class ModelListView(_Reply):
    data: tuple[ModelView, ...]


class AddedModelView(_Reply):
    """The card `POST /models/add` answers with."""

    model_id: str
    layers: int
    storage_bytes: int


class NodeIdView(_Reply):
    node_id: str


class DownloadAnswerView(_Reply):
    node_id: str
    model_id: str
    detail: str
    download: Download | None = None


class _ErrorDetailView(_Reply):
    message: str


class _ErrorView(_Reply):
    error: _ErrorDetailView


def _error_message(response: httpx.Response) -> str:
    """The message of the API's OpenAI-style error body, else the bare status."""
    try:
        message = _ErrorView.model_validate_json(response.content).error.message
    except ValidationError:
        message = ""
    if message:
        return message
    request = response.request
    return f"{request.method} {request.url.path} answered {response.status_code}"


@final
class NodeClient:
    def __init__(self, base_url: str, timeout: httpx.Timeout = REQUEST_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        try:
            self._client = httpx.Client(base_url=self.base_url, timeout=timeout)
        except httpx.InvalidURL as error:
            raise CliError(f"bad --api URL {base_url!r}: {error}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.close()

    def call(self, method: str, path: str, body: Mapping[str, object] | None = None) -> bytes:
        """The body of a 2xx answer; any other outcome raises CliError."""
        try:
            response = self._client.request(method, path, json=body)
        except httpx.ConnectError:
            raise CliError(
                f"no node answers at {self.base_url} (is `shoal run` running?)"
            ) from None
        except httpx.TimeoutException:
            read = self._timeout.read or 0.0
            raise CliError(
                f"the node at {self.base_url} did not answer within {read:g} s"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise CliError(f"cannot talk to the node at {self.base_url}: {error}") from None
        if not response.is_success:
            raise NodeRefusedError(_error_message(response), response.status_code)
        return response.content

    def _parse(self, raw: bytes, model: type[Body]) -> Body:
        try:
            return model.model_validate_json(raw)
        except ValidationError as error:
            raise CliError(
                f"the node at {self.base_url} sent a reply this shoal does not understand: "
                f"{error.errors()[0]['msg']}"
            ) from None

    def models_json(self) -> bytes:
        return self.call("GET", "/v1/models")

    def models(self) -> ModelListView:
        return self._parse(self.models_json(), ModelListView)

    def model(self, model_id: str) -> ModelView:
        return self._parse(self.call("GET", f"/v1/models/{_path(model_id)}"), ModelView)

    def add_model(self, model_id: str) -> AddedModelView:
        raw = self.call("POST", "/models/add", {"model_id": model_id})
        return self._parse(raw, AddedModelView)

    def node_id(self) -> str:
        return self._parse(self.call("GET", "/node_id"), NodeIdView).node_id

    def downloads(self) -> list[Download]:
        raw = self.call("GET", "/downloads")
        try:
            return _DOWNLOADS.validate_json(raw)
        except ValidationError as error:
            raise CliError(
                f"the node at {self.base_url} sent download records this shoal does not "
                f"understand: {error.errors()[0]['msg']}"
            ) from None

    def start_download(
        self, model_id: str, node_id: str, start_layer: int | None, end_layer: int | None
    ) -> DownloadAnswerView:
        body = {
            "model_id": model_id,
            "node_id": node_id,
            "start_layer": start_layer,
            "end_layer": end_layer,
        }
        return self._parse(self.call("POST", "/download/start", body), DownloadAnswerView)

    def cancel_download(self, model_id: str, node_id: str) -> DownloadAnswerView:
        body = {"model_id": model_id, "node_id": node_id}
        return self._parse(self.call("POST", "/download/cancel", body), DownloadAnswerView)

    def delete_download(self, node_id: str, model_id: str) -> DownloadAnswerView:
        path = f"/download/{_path(node_id)}/{_path(model_id)}"
        return self._parse(self.call("DELETE", path), DownloadAnswerView)


def _path(value: str) -> str:
    # Model ids keep their slash: the API's routes take `org/name` as a path.
    return quote(value, safe="/")
