"""What a node tells the cluster about itself."""

from typing import Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel

Backend = Literal["metal", "cuda", "cpu"]


class NodeTelemetry(FrozenModel):
    hostname: str
    platform: str
    chip: str
    backend: Backend
    cpu_cores: int = Field(ge=1)
    memory_total_bytes: int = Field(ge=0)
    memory_available_bytes: int = Field(ge=0)
    # IPv4 addresses other nodes can reach this one at (for the runners' ring connections).
    addresses: tuple[str, ...] = ()
    # Free space where the worker stores models, and whether it may fetch from the hub at all
    # (not offline): placement sends a shard only where its files are or can arrive.
    disk_available_bytes: int = Field(default=0, ge=0)
    can_download: bool = True
