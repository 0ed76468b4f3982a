"""The one base class every message and state type derives from."""

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """Immutable, strictly validated and closed: the house rule for every shared type."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")
