"""Entries of a master's global stream: a snapshot opens a term, indexed events follow it."""

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from shoal_shared.events import IndexedEvent
from shoal_shared.frozen import FrozenModel
from shoal_shared.state import State


class LoggedEvent(FrozenModel):
    entry: Literal["event"] = "event"
    event: IndexedEvent


class LoggedSnapshot(FrozenModel):
    """State as of `state.last_index`: a reader that is behind adopts it instead of replaying."""

    entry: Literal["snapshot"] = "snapshot"
    term: int = Field(ge=1)
    state: State


GlobalLogEntry = Annotated[LoggedEvent | LoggedSnapshot, Field(discriminator="entry")]
GLOBAL_LOG_ENTRY: TypeAdapter[GlobalLogEntry] = TypeAdapter(GlobalLogEntry)
