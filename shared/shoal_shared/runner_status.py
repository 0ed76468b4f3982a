"""The runner lifecycle, one tagged model per stage."""

from typing import Annotated, Literal

from pydantic import Field

from shoal_shared.frozen import FrozenModel


class RunnerIdle(FrozenModel):
    status: Literal["idle"] = "idle"


class RunnerConnecting(FrozenModel):
    status: Literal["connecting"] = "connecting"


class RunnerLoading(FrozenModel):
    status: Literal["loading"] = "loading"
    layers_loaded: int = Field(ge=0)
    layers_total: int = Field(ge=0)


class RunnerLoaded(FrozenModel):
    status: Literal["loaded"] = "loaded"


class RunnerWarmingUp(FrozenModel):
    status: Literal["warming_up"] = "warming_up"


class RunnerReady(FrozenModel):
    status: Literal["ready"] = "ready"


class RunnerRunning(FrozenModel):
    status: Literal["running"] = "running"
    active_tasks: int = Field(ge=1)


class RunnerFailed(FrozenModel):
    status: Literal["failed"] = "failed"
    reason: str


class RunnerShutDown(FrozenModel):
    status: Literal["shut_down"] = "shut_down"


RunnerStatus = Annotated[
    RunnerIdle
    | RunnerConnecting
    | RunnerLoading
    | RunnerLoaded
    | RunnerWarmingUp
    | RunnerReady
    | RunnerRunning
    | RunnerFailed
    | RunnerShutDown,
    Field(discriminator="status"),
]


def accepts_tasks(status: RunnerStatus) -> bool:
    return isinstance(status, RunnerReady | RunnerRunning)
