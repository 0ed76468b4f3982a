"""The deployment files: launchd agents, the docker compose dev cluster, the Dockerfile.

Neither launchd nor a Docker engine runs here: these tests check that the generated plists
and the compose file say what the `shoal` command understands.
"""

import plistlib
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest
import yaml
from shoal_shared.settings import NodeSettings, resolve_settings

from deploy.launchd import (
    SERVICES,
    AgentSettings,
    bootstrap_commands,
    default_shoal_bin,
    label,
    main,
    write_agents,
)
from shoal.cli import build_parser

REPO: Path = Path(__file__).resolve().parent.parent
COMPOSE_FILE: Path = REPO / "docker-compose.yml"
DOCKERFILE: Path = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE: Path = REPO / ".dockerignore"
CONTAINER_API_PORT = 52415


# --- launchd ---------------------------------------------------------------------------------


def _read_plist(path: Path) -> dict[str, object]:
    with path.open("rb") as file:
        loaded: object = plistlib.load(file)
    assert isinstance(loaded, dict)
    return cast(dict[str, object], loaded)


def _settings_from_cli(argv: list[str], environment: Mapping[str, str]) -> tuple[str, NodeSettings]:
    """What `shoal <argv>` would run with: the command and the node settings."""
    flags = vars(build_parser().parse_args(argv))
    command = cast(str | None, flags.pop("command")) or "run"
    return command, resolve_settings(flags, environment)


def test_launchd_agents_run_each_service(tmp_path: Path) -> None:
    home = tmp_path / "home"
    shoal_bin = tmp_path / "venv" / "bin" / "shoal"
    settings = AgentSettings(
        home=home, shoal_bin=shoal_bin, api_port=52500, nats_port=52501, leaf_port=52502
    )
    paths = write_agents(settings, tmp_path / "LaunchAgents")

    assert [path.name for path in paths] == [f"dev.shoal.{service}.plist" for service in SERVICES]
    assert (home / "logs").is_dir()
    for service, path in zip(SERVICES, paths, strict=True):
        agent = _read_plist(path)
        assert agent["Label"] == label(service) == f"dev.shoal.{service}"
        arguments = cast(list[str], agent["ProgramArguments"])
        assert arguments == [str(shoal_bin), service]
        assert agent["KeepAlive"] is True
        assert agent["RunAtLoad"] is True
        assert agent["ProcessType"] == ("Interactive" if service == "worker" else "Background")
        log = str(home / "logs" / f"{service}.launchd.log")
        assert agent["StandardOutPath"] == log
        assert agent["StandardErrorPath"] == log
        environment = cast(dict[str, str], agent["EnvironmentVariables"])
        assert environment["SHOAL_HOME"] == str(home)
        assert environment["SHOAL_API_PORT"] == "52500"
        assert environment["SHOAL_NATS_PORT"] == "52501"
        assert environment["SHOAL_LEAF_PORT"] == "52502"
        assert environment["PATH"].split(":")[0] == str(shoal_bin.parent)
        # Unset settings stay Shoal's defaults, not an empty string.
        assert "SHOAL_NAMESPACE" not in environment

        # The `shoal` command accepts the arguments and resolves the node's settings.
        command, node = _settings_from_cli(arguments[1:], environment)
        assert command == service
        assert node.home == home
        assert (node.api_port, node.nats_port, node.leaf_port) == (52500, 52501, 52502)


def test_launchd_optional_settings_reach_the_environment(tmp_path: Path) -> None:
    settings = AgentSettings(
        home=tmp_path / "home",
        shoal_bin=tmp_path / "shoal",
        namespace="lab",
        log_level="DEBUG",
        api_host="127.0.0.1",
        place_default_model=False,
    )
    (path, *_) = write_agents(settings, tmp_path / "agents")
    environment = cast(dict[str, str], _read_plist(path)["EnvironmentVariables"])
    _, node = _settings_from_cli(["broker"], environment)
    assert node.namespace == "lab"
    assert node.log_level == "DEBUG"
    assert node.api_host == "127.0.0.1"
    assert node.place_default_model is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"home": Path("relative")}, "absolute"),
        ({"api_port": 0}, "between 1 and 65535"),
        ({"leaf_port": 52415}, "must differ"),
    ],
)
def test_launchd_rejects_bad_settings(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    home = changes.get("home", tmp_path)
    api_port = changes.get("api_port", 52415)
    leaf_port = changes.get("leaf_port", 52417)
    assert isinstance(home, Path)
    assert isinstance(api_port, int)
    assert isinstance(leaf_port, int)
    with pytest.raises(ValueError, match=message):
        AgentSettings(
            home=home, shoal_bin=tmp_path / "shoal", api_port=api_port, leaf_port=leaf_port
        )


def test_launchd_command_line_prints_bootstrap_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "Launch Agents"
    shoal_bin = tmp_path / "shoal"
    shoal_bin.write_text("#!/bin/sh\n")
    status = main(
        [
            "--home",
            str(tmp_path / "home"),
            "--output",
            str(output),
            "--shoal-bin",
            str(shoal_bin),
            "--namespace",
            "lab",
            "--no-default-model",
        ]
    )
    assert status == 0
    paths = [output / f"dev.shoal.{service}.plist" for service in SERVICES]
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if not line.startswith("#")]
    assert commands == bootstrap_commands(paths)
    for command, path in zip(commands, paths, strict=True):
        assert shlex.split(command) == ["launchctl", "bootstrap", "gui/$UID", str(path)]
    environment = cast(dict[str, str], _read_plist(paths[0])["EnvironmentVariables"])
    assert environment["SHOAL_NAMESPACE"] == "lab"
    assert environment["SHOAL_PLACE_DEFAULT_MODEL"] == "0"


def test_launchd_finds_shoal_beside_the_interpreter() -> None:
    # `uv run` puts this interpreter in the workspace venv, where `shoal` is installed.
    assert default_shoal_bin().is_file()


def test_launchd_command_line_refuses_a_missing_entry_point(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--home", str(tmp_path), "--shoal-bin", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "logs").exists()


# --- docker compose --------------------------------------------------------------------------


def _compose() -> dict[str, object]:
    loaded: object = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return cast(dict[str, object], loaded)


def _services() -> dict[str, dict[str, object]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return cast(dict[str, dict[str, object]], services)


def _string_map(value: object) -> dict[str, str]:
    """A compose `environment`, as a mapping or as a list of NAME=value."""
    if isinstance(value, list):
        pairs = [str(item).split("=", 1) for item in cast(list[object], value)]
        return {name: rest for name, rest in pairs}
    assert isinstance(value, dict)
    return {str(name): str(item) for name, item in cast(dict[object, object], value).items()}


def _string_list(value: object) -> list[str]:
    assert isinstance(value, list)
    return [str(item) for item in cast(list[object], value)]


def test_compose_has_three_nodes_of_one_image() -> None:
    services = _services()
    assert sorted(services) == ["node1", "node2", "node3"]
    for service in services.values():
        build = service["build"]
        assert isinstance(build, dict)
        assert cast(dict[str, object], build)["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == "shoal:dev"
        assert _string_list(service["networks"]) == ["shoal"]
    networks = _compose()["networks"]
    assert isinstance(networks, dict)
    assert cast(dict[str, dict[str, object]], networks)["shoal"]["driver"] == "bridge"


def test_compose_publishes_distinct_api_ports_and_volumes() -> None:
    services = _services()
    host_ports: dict[str, int] = {}
    volumes: dict[str, str] = {}
    for name, service in services.items():
        (mapping,) = _string_list(service["ports"])
        host, container = mapping.split(":")
        assert int(container) == CONTAINER_API_PORT
        host_ports[name] = int(host)
        (volume,) = _string_list(service["volumes"])
        source, target = volume.split(":")
        assert target == "/data"
        volumes[name] = source
    assert host_ports == {"node1": 52415, "node2": 52425, "node3": 52435}
    assert len(set(volumes.values())) == 3
    declared = _compose()["volumes"]
    assert isinstance(declared, dict)
    assert set(volumes.values()) == set(cast(dict[str, object], declared))


def test_compose_commands_agree_with_the_cli() -> None:
    namespaces: set[str] = set()
    for name, service in _services().items():
        command, node = _settings_from_cli(
            _string_list(service["command"]), _string_map(service["environment"])
        )
        assert command == "run"
        assert node.home == Path("/data")
        assert node.api_host == "0.0.0.0"
        assert node.api_port == CONTAINER_API_PORT
        assert len({node.api_port, node.nats_port, node.leaf_port}) == 3
        # Only node1 places the bundled default model.
        assert node.place_default_model is (name == "node1")
        namespaces.add(node.namespace)
    assert len(namespaces) == 1


def test_compose_healthcheck_asks_the_api() -> None:
    for service in _services().values():
        healthcheck = service["healthcheck"]
        assert isinstance(healthcheck, dict)
        test = _string_list(cast(dict[str, object], healthcheck)["test"])
        assert test[:3] == ["CMD", "python", "-c"]
        assert f"http://localhost:{CONTAINER_API_PORT}/healthz" in test[3]
        compile(test[3], "<healthcheck>", "exec")


# --- Dockerfile ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, arguments = stripped.partition(" ")
        pairs.append((instruction.upper(), " ".join(arguments.split())))
    return pairs


def _workspace_members() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as file:
        workspace = tomllib.load(file)["tool"]["uv"]["workspace"]
    return cast(list[str], workspace["members"])


def test_dockerfile_essentials() -> None:
    instructions = _instructions()
    kinds = [kind for kind, _ in instructions]
    arguments = dict(reversed(instructions))  # the first of each instruction
    assert arguments["FROM"] == "python:3.11-slim-bookworm"
    runs = [text for kind, text in instructions if kind == "RUN"]
    assert any("libopenblas0-pthread" in text for text in runs)
    assert any(re.search(r"pip install .*\buv\b", text) for text in runs)
    envs = " ".join(text for kind, text in instructions if kind == "ENV")
    assert "SHOAL_HOME=/data" in envs
    assert "SHOAL_API_HOST=0.0.0.0" in envs
    assert ("VOLUME", '["/data"]') in instructions
    exposed = {port for kind, text in instructions if kind == "EXPOSE" for port in text.split()}
    assert {"52415", "52417"} <= exposed
    assert kinds.count("ENTRYPOINT") == 1
    assert arguments["ENTRYPOINT"] == '["uv", "run", "--no-sync", "shoal"]'
    assert arguments["CMD"] == '["run"]'


def test_dockerfile_installs_dependencies_before_copying_sources() -> None:
    instructions = _instructions()
    syncs = [
        index
        for index, (kind, text) in enumerate(instructions)
        if kind == "RUN" and "uv sync --frozen --no-dev" in text
    ]
    assert len(syncs) == 2
    copy_all = instructions.index(("COPY", ". ."))
    assert syncs[0] < copy_all < syncs[1]
    assert "--no-install-workspace" in instructions[syncs[0]][1]
    early_copies = [text for kind, text in instructions[: syncs[0]] if kind == "COPY"]
    copied = {source for text in early_copies for source in text.split()[:-1]}
    assert {"pyproject.toml", "uv.lock"} <= copied
    # Every workspace member's pyproject.toml, or the first sync cannot see the workspace.
    for member in _workspace_members():
        assert f"{member}/pyproject.toml" in copied


def test_dockerignore_keeps_the_build_context_small() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "**/.venv", "**/__pycache__"} <= patterns
    # Needed by `uv sync` (the root project's readme) and by the services.
    for needed in ("README.md", "uv.lock", "pyproject.toml", "shoal", "shared", "services"):
        assert needed not in patterns
