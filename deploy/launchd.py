"""Generate launchd agents that run a Shoal node on a Mac, one job per service.

    uv run python deploy/launchd.py --home ~/.shoal --output ~/Library/LaunchAgents

writes `dev.shoal.<service>.plist` for broker, election, master, worker and api, each running
`shoal <service>` with the node's settings in its environment, and prints the
`launchctl bootstrap` commands that load them. It never runs launchctl itself.
"""

import argparse
import plistlib
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from shoal_shared.settings import (
    DEFAULT_API_PORT,
    DEFAULT_LEAF_PORT,
    DEFAULT_NATS_PORT,
    ENVIRONMENT_VARIABLES,
)

Service = Literal["broker", "election", "master", "worker", "api"]

# Load order: the broker first, so that the others find their nats-server sooner.
SERVICES: Final[tuple[Service, ...]] = ("broker", "election", "master", "worker", "api")
LABEL_PREFIX: Final = "dev.shoal"
# launchd starts jobs with this PATH; the shoal bin directory goes in front.
_SYSTEM_PATH: Final = "/usr/bin:/bin:/usr/sbin:/sbin"


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """What every agent of one node shares. None leaves a setting to Shoal's default."""

    home: Path
    shoal_bin: Path
    api_port: int = DEFAULT_API_PORT
    nats_port: int = DEFAULT_NATS_PORT
    leaf_port: int = DEFAULT_LEAF_PORT
    api_host: str | None = None
    namespace: str | None = None
    log_level: str | None = None
    place_default_model: bool | None = None

    def __post_init__(self) -> None:
        if not self.home.is_absolute():
            raise ValueError(f"home must be an absolute path, not {self.home}")
        if not self.shoal_bin.is_absolute():
            raise ValueError(f"the shoal entry point must be an absolute path: {self.shoal_bin}")
        ports = {"api": self.api_port, "nats": self.nats_port, "leaf": self.leaf_port}
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} port {port} is not between 1 and 65535")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"the api, nats and leaf ports must differ: {ports}")

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"


def label(service: Service) -> str:
    return f"{LABEL_PREFIX}.{service}"


def plist_name(service: Service) -> str:
    return f"{label(service)}.plist"


def log_path(settings: AgentSettings, service: Service) -> Path:
    return settings.logs_dir / f"{service}.launchd.log"


def agent_environment(settings: AgentSettings) -> dict[str, str]:
    """SHOAL_* variables that make every service of the node resolve the same settings."""
    values: dict[str, str | int | bool | Path | None] = {
        "home": settings.home,
        "api_host": settings.api_host,
        "api_port": settings.api_port,
        "nats_port": settings.nats_port,
        "leaf_port": settings.leaf_port,
        "namespace": settings.namespace,
        "log_level": settings.log_level,
        "place_default_model": settings.place_default_model,
    }
    environment: dict[str, str] = {}
    for field, value in values.items():
        if value is None:
            continue
        variable = ENVIRONMENT_VARIABLES[field]
        environment[variable] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    environment["PATH"] = f"{settings.shoal_bin.parent}:{_SYSTEM_PATH}"
    return environment


def agent_plist(service: Service, settings: AgentSettings) -> dict[str, object]:
    """The launchd job of one service, as plistlib writes it."""
    log = str(log_path(settings, service))
    return {
        "Label": label(service),
        "ProgramArguments": [str(settings.shoal_bin), service],
        "EnvironmentVariables": agent_environment(settings),
        "WorkingDirectory": str(settings.home),
        "RunAtLoad": True,
        "KeepAlive": True,
        # Metal wants the worker's runners treated as foreground work; the rest is background.
        "ProcessType": "Interactive" if service == "worker" else "Background",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }


def write_agents(settings: AgentSettings, output: Path) -> list[Path]:
    """Write one plist per service into `output`; return their paths in load order.

    Also creates the node's logs directory: launchd does not create the parents of
    StandardOutPath.
    """
    output.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for service in SERVICES:
        path = output / plist_name(service)
        with path.open("wb") as file:
            plistlib.dump(agent_plist(service, settings), file)
        paths.append(path)
    return paths


def bootstrap_commands(paths: Sequence[Path]) -> list[str]:
    return [f"launchctl bootstrap gui/$UID {shlex.quote(str(path))}" for path in paths]


def bootout_commands(services: Sequence[Service] = SERVICES) -> list[str]:
    return [f"launchctl bootout gui/$UID/{label(service)}" for service in reversed(services)]


def default_shoal_bin() -> Path:
    """The `shoal` entry point installed beside this interpreter (not resolved: in a venv
    the interpreter is a symlink and the entry point sits beside the link)."""
    return Path(sys.executable).absolute().parent / "shoal"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchd.py", description="Write launchd agents for the Shoal services."
    )
    parser.add_argument("--home", type=Path, default=Path("~/.shoal"), help="SHOAL_HOME")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("~/Library/LaunchAgents"),
        help="where the plists go (default ~/Library/LaunchAgents)",
    )
    parser.add_argument(
        "--shoal-bin", type=Path, help="the shoal entry point (default: beside this Python)"
    )
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    parser.add_argument("--nats-port", type=int, default=DEFAULT_NATS_PORT)
    parser.add_argument("--leaf-port", type=int, default=DEFAULT_LEAF_PORT)
    parser.add_argument("--api-host", help="address the HTTP API binds (SHOAL_API_HOST)")
    parser.add_argument("--namespace", help="cluster namespace (SHOAL_NAMESPACE)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--no-default-model",
        dest="place_default_model",
        action="store_const",
        const=False,
        help="do not place the bundled default model at start",
    )
    return parser


def _as_path(value: object) -> Path:
    if not isinstance(value, Path):
        raise TypeError(f"expected a path, got {value!r}")
    return value.expanduser().absolute()


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    return value


def settings_from_arguments(arguments: Mapping[str, object]) -> AgentSettings:
    shoal_bin = arguments.get("shoal_bin")
    place_default_model = arguments.get("place_default_model")
    return AgentSettings(
        home=_as_path(arguments["home"]),
        shoal_bin=default_shoal_bin() if shoal_bin is None else _as_path(shoal_bin),
        api_port=_int(arguments["api_port"]),
        nats_port=_int(arguments["nats_port"]),
        leaf_port=_int(arguments["leaf_port"]),
        api_host=_optional_str(arguments.get("api_host")),
        namespace=_optional_str(arguments.get("namespace")),
        log_level=_optional_str(arguments.get("log_level")),
        place_default_model=place_default_model if isinstance(place_default_model, bool) else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = vars(parser.parse_args(argv))
    try:
        settings = settings_from_arguments(arguments)
    except ValueError as error:
        parser.error(str(error))
    if not settings.shoal_bin.is_file():
        parser.error(f"no shoal entry point at {settings.shoal_bin} (give --shoal-bin)")
    paths = write_agents(settings, _as_path(arguments["output"]))
    print(f"# wrote {len(paths)} launchd agents; load them with:")
    for command in bootstrap_commands(paths):
        print(command)
    print("# and unload them with:")
    for command in bootout_commands():
        print(f"# {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
