"""The command line of `shoal models` (apart from the commands, which `shoal run` and the
services need not import)."""

import argparse
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands to the `shoal models` parser."""
    commands = parser.add_subparsers(
        dest="models_command",
        metavar="{list,pull,rm,import}",
        required=True,
        parser_class=type(parser),
    )
    api_help = "the node's HTTP API, default http://127.0.0.1:$SHOAL_API_PORT (52415)"

    listing = commands.add_parser("list", help="the models, their size and where their files are")
    listing.add_argument("--api", help=api_help)
    listing.add_argument("--json", action="store_true", help="print the API's JSON as it is")

    pulling = commands.add_parser("pull", help="download a model's files onto a node")
    pulling.add_argument(
        "model",
        help="model id, as `shoal models list` shows it, or any Hugging Face repo (org/name)",
    )
    pulling.add_argument("--node", help="node id (default: the node that serves --api)")
    pulling.add_argument("--start-layer", type=int, help="first layer of a shard")
    pulling.add_argument("--end-layer", type=int, help="layer after the last of a shard")
    pulling.add_argument("--api", help=api_help)

    removing = commands.add_parser("rm", help="delete a node's files of a model")
    removing.add_argument("model", help="model id")
    removing.add_argument("--node", help="node id (default: the node that serves --api)")
    removing.add_argument("--api", help=api_help)

    importing = commands.add_parser(
        "import", help="convert a GGUF file into a model of this machine (no node needed)"
    )
    importing.add_argument("file", type=Path, help="the .gguf file")
    importing.add_argument("--id", dest="model_id", help="model id (default: from the file)")
    importing.add_argument("--home", type=Path, help="the node's data directory (SHOAL_HOME)")
