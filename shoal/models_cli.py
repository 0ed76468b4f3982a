"""`shoal models list|pull|rm|import`: a node's models through its HTTP API (import works on
this machine's files, with no node running). Every failure is one line on stderr."""

import argparse
import json
import sys
from pathlib import Path
from typing import Final, TextIO, cast

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from shoal_shared.settings import SettingsError, resolve_settings

from shoal.model_pull import EXIT_INTERRUPTED, PullRequest, gigabytes, pull
from shoal.node_client import CliError, ModelFilesView, ModelView, NodeClient, default_api_url

GGUF_MAGIC: Final = b"GGUF"
# Wide enough for hub ids on a pipe, where rich would otherwise assume 80 columns.
PIPE_WIDTH: Final = 160


def run(arguments: argparse.Namespace) -> int:
    """Run one `shoal models` command; returns the exit status."""
    command = cast(str, arguments.models_command)
    try:
        if command == "import":
            return _import(
                cast(Path, arguments.file),
                cast("str | None", arguments.model_id),
                cast("Path | None", arguments.home),
            )
        api = cast("str | None", arguments.api) or default_api_url()
        with NodeClient(api) as client:
            match command:
                case "list":
                    return _list(client, as_json=cast(bool, arguments.json))
                case "pull":
                    request = PullRequest(
                        model_id=cast(str, arguments.model),
                        node_id=cast("str | None", arguments.node),
                        start_layer=cast("int | None", arguments.start_layer),
                        end_layer=cast("int | None", arguments.end_layer),
                    )
                    return pull(client, request)
                case _:
                    return _remove(
                        client, cast(str, arguments.model), cast("str | None", arguments.node)
                    )
    except CliError as error:
        print(f"shoal: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _where(model: ModelView) -> str:
    if model.source == "bundled":
        return "bundled"
    return ", ".join(_files_state(files) for files in model.downloads) or "—"


def _files_state(files: ModelFilesView) -> str:
    match files.status:
        case "ongoing" if files.bytes_total:
            state = f"{100 * files.bytes_done // files.bytes_total}%"
        case status:
            state = status
    return f"{files.node_id} {state}"


def _status(model: ModelView) -> str:
    if model.ready:
        return "ready"
    return "placed" if model.placed else "—"


def _list(client: NodeClient, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    if as_json:
        raw = client.models_json()
        print(json.dumps(json.loads(raw), indent=2), file=out)
        return 0
    models = client.models().data
    console = Console(file=out)
    if not console.is_terminal:
        console = Console(file=out, width=PIPE_WIDTH)
    table = Table(box=None, pad_edge=False)
    table.add_column("model", no_wrap=True)
    table.add_column("size (GB)", justify="right")
    table.add_column("where")
    table.add_column("status")
    for model in models:
        table.add_row(model.id, f"{model.storage_bytes / 1e9:.2f}", _where(model), _status(model))
    console.print(table)
    return 0


def _remove(client: NodeClient, model_id: str, node_id: str | None) -> int:
    node = node_id or client.node_id()
    answer = client.delete_download(node, model_id)
    print(f"{answer.node_id}: {answer.detail}")
    return 0


def _models_dir(home: Path | None) -> Path:
    try:
        return resolve_settings({"home": home}).models_dir
    except SettingsError as error:
        raise CliError(str(error)) from None
    except ValidationError as error:
        raise CliError(f"bad settings: {error.errors()[0]['msg']}") from None


def _import(gguf_path: Path, model_id: str | None, home: Path | None) -> int:
    if not gguf_path.is_file():
        raise CliError(f"no file at {gguf_path}")
    try:
        with gguf_path.open("rb") as content:
            magic = content.read(len(GGUF_MAGIC))
    except OSError as error:
        raise CliError(f"cannot read {gguf_path}: {error.strerror or error}") from None
    if magic != GGUF_MAGIC:
        raise CliError(f"{gguf_path} is not a GGUF file")
    models_dir = _models_dir(home)
    # Imported lazily: the converter loads MLX, which no other command needs.
    from shoal_worker.downloads.hub import HubError
    from shoal_worker.downloads.store import local_model_dir
    from shoal_worker.models.gguf_card import import_gguf_model
    from shoal_worker.models.gguf_metadata import GgufImportError

    try:
        card = import_gguf_model(gguf_path, models_dir, model_id)
    except (GgufImportError, HubError, OSError, ValueError) as error:
        # The importer's messages often name the file already.
        detail = str(error).removeprefix(f"{gguf_path}: ")
        raise CliError(f"cannot import {gguf_path}: {detail}") from None
    path = local_model_dir(models_dir, card.model_id)
    print(
        f"imported {card.model_id}: {card.layers} layers, {gigabytes(card.storage_bytes)} at {path}"
    )
    return 0
