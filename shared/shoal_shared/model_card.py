"""Model cards: one TOML file per model, validated into frozen records."""

import json
import tomllib
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Literal

from pydantic import Field, model_validator

from shoal_shared.frozen import FrozenModel
from shoal_shared.ids import ModelId

Capability = Literal["text", "chat", "tools", "thinking", "vision"]


class SamplingDefaults(FrozenModel):
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class ModelCard(FrozenModel):
    model_id: ModelId
    name: str
    family: str
    architecture: str
    # "local": imported from a GGUF file on one node; it has no hub repo to fetch from.
    source: Literal["bundled", "huggingface", "local"]
    hf_repo: str | None = None
    quantization: str
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    attention_heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    storage_bytes: int = Field(ge=1)
    context_length: int = Field(ge=1)
    capabilities: tuple[Capability, ...]
    supports_tensor: bool
    sampling: SamplingDefaults = SamplingDefaults()

    @model_validator(mode="after")
    def _heads_are_consistent(self) -> "ModelCard":
        if self.attention_heads % self.kv_heads != 0:
            raise ValueError(
                f"{self.model_id}: {self.attention_heads} attention heads are not a multiple "
                f"of {self.kv_heads} KV heads"
            )
        return self

    @model_validator(mode="after")
    def _hub_models_name_their_repo(self) -> "ModelCard":
        if self.source == "huggingface" and not self.hf_repo:
            raise ValueError(f"{self.model_id}: a Hugging Face model needs hf_repo")
        return self

    @property
    def bytes_per_layer(self) -> int:
        return -(-self.storage_bytes // self.layers)


class ModelCardError(ValueError):
    pass


def parse_card(text: str, origin: str) -> ModelCard:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ModelCardError(f"{origin}: not valid TOML: {error}") from error
    try:
        # Through JSON, where strict mode takes arrays for the card's tuples.
        return ModelCard.model_validate_json(json.dumps(raw))
    except ValueError as error:
        raise ModelCardError(f"{origin}: {error}") from error


@cache
def builtin_cards() -> Mapping[ModelId, ModelCard]:
    cards: dict[ModelId, ModelCard] = {}
    for entry in resources.files("shoal_shared.model_cards").iterdir():
        if entry.name.endswith(".toml"):
            card = parse_card(entry.read_text(), entry.name)
            cards[card.model_id] = card
    return cards


def all_cards(added: Mapping[ModelId, ModelCard]) -> Mapping[ModelId, ModelCard]:
    """The built-in catalogue plus the models added at run time (state's `added_models`)."""
    if not added:
        return builtin_cards()
    return {**builtin_cards(), **added}
