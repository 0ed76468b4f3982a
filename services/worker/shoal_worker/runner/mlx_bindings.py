"""Typed doorways into MLX and mlx-lm.

mlx-lm's functions are mostly unannotated, so the engine talks to them only through these
small helpers, which check or `cast` what comes back into honest types.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast, final

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load
from shoal_shared.tasks import ChatMessage

# Used when config.json names no context length: the smallest window of current chat models.
_FALLBACK_CONTEXT_LENGTH: Final = 2048
_CONTEXT_LENGTH_KEYS: Final = ("max_position_embeddings", "max_seq_len", "n_positions")

# The untyped parts of their signatures (`*args`, `**kwargs`, unannotated returns), pinned to
# the ways this module calls them. `mlx_lm.generate` is imported by name because the package
# re-exports a function called `generate` that shadows the submodule as an attribute.
_mlx_lm_generate = importlib.import_module("mlx_lm.generate")
_evaluate = cast("Callable[[object], None]", mx.eval)
_stream_generate = cast(
    "Callable[..., Generator[GenerationResponse, None, None]]", _mlx_lm_generate.stream_generate
)


@final
@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model whose weights may still be lazy, with its tokenizer and context window."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    layers: tuple[nn.Module, ...]
    context_length: int
    eos_token_ids: frozenset[int]


def load_lazily(model_dir: Path) -> LoadedModel:
    """Build the model with lazy weights, so the caller can materialize it layer by layer."""
    loaded = cast(
        "tuple[nn.Module, TokenizerWrapper, dict[str, object]]",
        load(str(model_dir), lazy=True, return_config=True),
    )
    model, tokenizer, config = loaded
    layers = cast("object", getattr(model, "layers", None))
    if not isinstance(layers, list):
        raise ValueError(f"the model in {model_dir} exposes no list of transformer layers")
    layer_modules = tuple(cast("list[nn.Module]", layers))
    eos_token_ids = frozenset(cast("set[int]", tokenizer.eos_token_ids))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        layers=layer_modules,
        context_length=_context_length(config),
        eos_token_ids=eos_token_ids,
    )


def _context_length(config: dict[str, object]) -> int:
    for key in _CONTEXT_LENGTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return _FALLBACK_CONTEXT_LENGTH


def read_layer_count(model_dir: Path) -> int:
    """The number of transformer layers that config.json declares."""
    config = cast("dict[str, object]", json.loads((model_dir / "config.json").read_text()))
    value = config.get("num_hidden_layers")
    if not isinstance(value, int):
        raise ValueError(f"{model_dir}/config.json has no integer num_hidden_layers")
    return value


def materialize(module: nn.Module) -> None:
    """Force a module's lazy parameters into memory (reads them from the safetensors)."""
    _evaluate(cast("object", module.parameters()))


def chat_prompt_tokens(tokenizer: TokenizerWrapper, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt's token ids through the model's own chat template."""
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    apply_chat_template = cast("Callable[..., object]", tokenizer.apply_chat_template)
    tokens = apply_chat_template(conversation, add_generation_prompt=True)
    if not isinstance(tokens, list):
        raise TypeError(f"the chat template produced {type(tokens).__name__}, not token ids")
    token_list = cast("list[object]", tokens)
    if not all(isinstance(token, int) for token in token_list):
        raise TypeError("the chat template produced something other than integer token ids")
    return cast("list[int]", token_list)


def seed_random(seed: int) -> None:
    mx.random.seed(seed)


def stream_tokens(
    loaded: LoadedModel,
    prompt: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
) -> Generator[GenerationResponse, None, None]:
    """mlx-lm's `stream_generate`: one response per token, the last one with a finish reason.

    A temperature of 0 makes `make_sampler` return the argmax (greedy) sampler.
    """
    sampler = make_sampler(temp=temperature, top_p=top_p)
    return _stream_generate(
        loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens, sampler=sampler
    )
