"""Node settings: command-line flags over environment variables over defaults.

`shoal run` resolves them once and hands them to its children through the environment, so
every process of a node agrees on its home and ports.
"""

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pydantic import Field

from shoal_shared.frozen import FrozenModel

DEFAULT_API_PORT: Final = 52415
DEFAULT_NATS_PORT: Final = 52416
DEFAULT_LEAF_PORT: Final = 52417
NATS_USER: Final = "shoal"


class NodeSettings(FrozenModel):
    home: Path
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=1, le=65535)
    nats_port: int = Field(default=DEFAULT_NATS_PORT, ge=1, le=65535)
    leaf_port: int = Field(default=DEFAULT_LEAF_PORT, ge=1, le=65535)
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Empty: derived from the namespace, so that any node of the namespace may join (exo's
    # open default). Set it to keep other machines of the same namespace out.
    cluster_secret: str = ""
    # Where the NATS client and leafnode listeners bind: peers connect to both.
    bind_host: str = "0.0.0.0"
    # "host:port,..." of peers' NATS client ports, for networks without multicast.
    peers: str = ""
    mdns: bool = True
    # Election rank: a higher priority wins, then the node that started first.
    priority: int = 0
    place_default_model: bool = True
    log_level: str = "INFO"
    # Use only model files already on this node (HF_HUB_OFFLINE=1 means the same).
    offline: bool = False
    # Extra model directories, separated by the OS path separator: searched before the
    # node's own models directory, read and never written.
    model_dirs: str = ""

    @property
    def nats_password(self) -> str:
        """What every NATS connection and leaf link must present: a digest, never the secret."""
        material = f"shoal-cluster:{self.namespace}:{self.cluster_secret}".encode()
        return hashlib.sha256(material).hexdigest()

    @property
    def nats_url(self) -> str:
        return self.nats_url_for("127.0.0.1", self.nats_port)

    def nats_url_for(self, host: str, port: int) -> str:
        return f"nats://{NATS_USER}:{self.nats_password}@{host}:{port}"

    @property
    def nats_store_dir(self) -> Path:
        return self.home / "nats"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def read_only_model_dirs(self) -> tuple[Path, ...]:
        return tuple(
            Path(entry).expanduser() for entry in self.model_dirs.split(os.pathsep) if entry.strip()
        )

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


# Field name -> environment variable.
ENVIRONMENT_VARIABLES: Final[Mapping[str, str]] = {
    "home": "SHOAL_HOME",
    "api_host": "SHOAL_API_HOST",
    "api_port": "SHOAL_API_PORT",
    "nats_port": "SHOAL_NATS_PORT",
    "leaf_port": "SHOAL_LEAF_PORT",
    "namespace": "SHOAL_NAMESPACE",
    "cluster_secret": "SHOAL_CLUSTER_SECRET",
    "bind_host": "SHOAL_BIND_HOST",
    "peers": "SHOAL_PEERS",
    "mdns": "SHOAL_MDNS",
    "priority": "SHOAL_PRIORITY",
    "place_default_model": "SHOAL_PLACE_DEFAULT_MODEL",
    "log_level": "SHOAL_LOG_LEVEL",
    "offline": "SHOAL_OFFLINE",
    "model_dirs": "SHOAL_MODEL_DIRS",
}

_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    pass


def _parse(field: str, raw: str) -> object:
    annotation = NodeSettings.model_fields[field].annotation
    if annotation is Path:
        return Path(raw).expanduser()
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(
                f"{ENVIRONMENT_VARIABLES[field]}={raw!r} is not a whole number"
            ) from None
    if annotation is bool:
        word = raw.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise SettingsError(f"{ENVIRONMENT_VARIABLES[field]}={raw!r} is not true or false")
    return raw


def resolve_settings(
    overrides: Mapping[str, object] | None = None,
    environment: Mapping[str, str] | None = None,
) -> NodeSettings:
    """Flags given in `overrides` (None means not given) win over the environment."""
    environment = os.environ if environment is None else environment
    values: dict[str, object] = {"home": Path("~/.shoal").expanduser()}
    for field, variable in ENVIRONMENT_VARIABLES.items():
        raw = environment.get(variable)
        if raw is not None and raw != "":
            values[field] = _parse(field, raw)
    for field, value in (overrides or {}).items():
        if value is not None:
            values[field] = value
    return NodeSettings.model_validate(values)


def settings_environment(settings: NodeSettings) -> dict[str, str]:
    """The environment variables that make a child process resolve the same settings."""
    values = settings.model_dump()
    rendered: dict[str, str] = {}
    for field, variable in ENVIRONMENT_VARIABLES.items():
        value = values[field]
        rendered[variable] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return rendered
