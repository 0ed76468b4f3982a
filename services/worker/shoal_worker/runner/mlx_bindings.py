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
from shoal_shared.tasks import ChatMessage

# Used when config.json names no context length: the smallest window of current chat models.
_FALLBACK_CONTEXT_LENGTH: Final = 2048
_CONTEXT_LENGTH_KEYS: Final = ("max_position_embeddings", "max_seq_len", "n_positions")

# The untyped parts of their signatures (`*args`, `**kwargs`, unannotated returns), pinned to
# the ways this module calls them. `mlx_lm.generate` is imported by name because the package
# re-exports a function called `generate` that shadows the submodule as an attribute.
_mlx_lm_generate = importlib.import_module("mlx_lm.generate")
_mlx_lm_utils = importlib.import_module("mlx_lm.utils")
_evaluate = cast("Callable[[object], None]", mx.eval)
_load_model = cast("Callable[..., tuple[nn.Module, dict[str, object]]]", _mlx_lm_utils.load_model)
_load_tokenizer = cast("Callable[..., TokenizerWrapper]", _mlx_lm_utils.load_tokenizer)

# The stream mlx-lm generates on. Collectives outside its generation loop must be queued on
# it too: a step still in flight on it (generation runs one step ahead) would otherwise put
# its collectives on the wire concurrently with ours, and the ring would mix the two up.
GENERATION_STREAM = cast("mx.ThreadLocalStream", _mlx_lm_generate.generation_stream)

# A sampler maps a (1, vocabulary) array of log probabilities to a (1,) array of token ids.
Sampler = Callable[[mx.array], mx.array]
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


def load_lazily(model_dir: Path, *, strict: bool = True) -> LoadedModel:
    """Build the model with lazy weights, so the caller can materialize it layer by layer.

    Nothing is read from the safetensors until a parameter is evaluated, so a pipeline shard
    that drops the other ranks' layers never reads them. `strict=False` tolerates weights
    missing from the directory (a shard's download may hold only its own layers); whoever
    passes it must check that the weights it keeps were present.
    """
    model, config = _load_model(model_dir, lazy=True, strict=strict)
    tokenizer = _load_tokenizer(model_dir, None, eos_token_ids=config.get("eos_token_id"))
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


def read_model_config(model_dir: Path) -> dict[str, object]:
    config = cast("object", json.loads((model_dir / "config.json").read_text()))
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir}/config.json is not a JSON object")
    return cast("dict[str, object]", config)


def read_layer_count(model_dir: Path) -> int:
    """The number of transformer layers that config.json declares."""
    value = read_model_config(model_dir).get("num_hidden_layers")
    if not isinstance(value, int):
        raise ValueError(f"{model_dir}/config.json has no integer num_hidden_layers")
    return value


def evaluate(array: mx.array) -> None:
    """Compute an array now (for a collective: it raises when the ring group broke)."""
    _evaluate(array)


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
    wrap_sampler: Callable[[Sampler], Sampler] | None = None,
    on_prompt_progress: Callable[[int, int], None] | None = None,
) -> Generator[GenerationResponse, None, None]:
    """mlx-lm's `stream_generate`: one response per token, the last one with a finish reason.

    A temperature of 0 makes `make_sampler` return the argmax (greedy) sampler.
    `wrap_sampler` lets a ring group share rank 0's token; `on_prompt_progress` is called
    after each prefill chunk (processed, total).
    """
    sampler: Sampler = make_sampler(temp=temperature, top_p=top_p)
    if wrap_sampler is not None:
        sampler = wrap_sampler(sampler)
    return _stream_generate(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_progress_callback=on_prompt_progress,
    )
