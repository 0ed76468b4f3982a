"""The `shoal` command: `shoal run` (the default), one service per process, or `shoal models`."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from shoal_shared.service_runtime import ServiceMain, run_service
from shoal_shared.settings import NodeSettings, SettingsError, resolve_settings

from shoal import models_parser


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line on stderr, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("node settings (flags override SHOAL_* variables)")
    group.add_argument("--home", type=Path, help="where the node keeps its data (SHOAL_HOME)")
    group.add_argument("--api-host", help="address the HTTP API binds (SHOAL_API_HOST)")
    group.add_argument("--api-port", type=int, help="HTTP API port, default 52415")
    group.add_argument("--nats-port", type=int, help="local NATS client port, default 52416")
    group.add_argument("--leaf-port", type=int, help="NATS leafnode port, default 52417")
    group.add_argument("--namespace", help="cluster namespace (SHOAL_NAMESPACE)")
    group.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    group.add_argument("--bind-host", help="address the NATS listeners bind (SHOAL_BIND_HOST)")
    group.add_argument(
        "--peers", help="host:port,... of peers' NATS ports, where multicast does not reach"
    )
    group.add_argument("--priority", type=int, help="election priority; higher wins")
    group.add_argument(
        "--no-mdns",
        dest="mdns",
        action="store_const",
        const=False,
        help="do not advertise or browse with mDNS (use --peers)",
    )
    group.add_argument(
        "--no-default-model",
        dest="place_default_model",
        action="store_const",
        const=False,
        help="do not place the bundled smollm2-135m model at start",
    )
    group.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="use only model files already on this node (SHOAL_OFFLINE, HF_HUB_OFFLINE)",
    )
    group.add_argument(
        "--model-dirs",
        help="extra read-only model directories, searched first (SHOAL_MODEL_DIRS)",
    )


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations at the top: it reads every argument, and `models ... --api URL` would
    # be refused there as an ambiguous prefix of --api-host and --api-port.
    parser = OneLineParser(prog="shoal", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    descriptions = {
        "run": "run a whole node: broker, election, master, worker and api (the default)",
        "broker": "run the embedded nats-server and keep it running",
        "election": "run discovery and master election",
        "master": "run the master (active when this node is elected)",
        "worker": "run the worker: telemetry, downloads, model runners",
        "api": "run the HTTP API and dashboard",
    }
    for name, description in descriptions.items():
        _add_node_flags(commands.add_parser(name, help=description, description=description))
    models_description = "list, pull, remove or import models (talks to a node's HTTP API)"
    models_parser.configure_parser(
        commands.add_parser("models", help=models_description, description=models_description)
    )
    _add_node_flags(parser)
    return parser


def _service_main(command: str) -> ServiceMain:
    # Imported lazily: `shoal api` must not pay for MLX, nor `shoal broker` for FastAPI.
    match command:
        case "broker":
            from shoal.broker_service import run_broker

            return run_broker
        case "election":
            from shoal_election.service import run_election

            return run_election
        case "master":
            from shoal_master.service import run_master

            return run_master
        case "worker":
            from shoal_worker.service import run_worker

            return run_worker
        case "api":
            from shoal_api.service import run_api

            return run_api
        case _:
            from shoal.supervisor import run_node

            return run_node


def main(argv: Sequence[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "models":
        # Imported only here: the services need neither rich nor httpx.
        from shoal.models_cli import run as run_models_command

        sys.exit(run_models_command(arguments))
    flags = vars(arguments)
    command: str = flags.pop("command") or "run"
    try:
        settings: NodeSettings = resolve_settings(flags)
    except ValidationError as error:
        first = error.errors()[0]
        setting = ".".join(str(part) for part in first["loc"])
        sys.exit(f"shoal: bad {setting} {first.get('input')!r}: {first['msg']}")
    except SettingsError as error:
        sys.exit(f"shoal: {error}")
    run_service(command if command != "run" else "shoal", _service_main(command), settings)
