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
