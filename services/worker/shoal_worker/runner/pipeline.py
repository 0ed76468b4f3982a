"""Pipeline parallelism for mlx-lm's llama: each rank holds a contiguous slice of the layers.

mlx-lm 0.32 pipelines a few architectures (its `PipelineMixin`, e.g. qwen2, deepseek_v2) but
not llama, and it gives rank 0 the *last* layers. Shoal's specs give rank 0 the first layers,
so this module follows mlx-lm's recipe in that order: rank r receives the hidden state from
rank r-1 (`recv_like`), runs its layers, sends the result to rank r+1, and the last rank's
hidden state is all-gathered so that every rank computes the same logits and the stock
`stream_generate` runs unchanged on all ranks in step.
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final, Protocol, cast, final

import mlx.core as mx
import mlx.nn as nn

from shoal_worker.runner.mlx_bindings import LoadedModel, load_lazily

# The module mlx-lm builds llama-family models from (llama, mistral and others map to it).
_LLAMA_MODULE: Final = "mlx_lm.models.llama"
_SAFETENSORS_HEADER_LENGTH: Final = struct.Struct("<Q")

_Layer = Callable[..., mx.array]
_Mask = mx.array | str | None
_create_attention_mask = cast(
    "Callable[..., _Mask]", importlib.import_module("mlx_lm.models.base").create_attention_mask
)
_tree_flatten = cast(
    "Callable[[object], list[tuple[str, object]]]",
    importlib.import_module("mlx.utils").tree_flatten,
)
_depends = cast("Callable[[mx.array, mx.array], mx.array]", mx.depends)


class _KeyedCache(Protocol):
    """mlx-lm's KV caches keep their keys in a `keys` array (filled once a layer ran)."""

    keys: mx.array


@final
class PipelinedLlamaBody(nn.Module):
    """Stands in for `LlamaModel` (`Model.model`): the same interface, with a slice of layers.

    Every rank keeps the embedding and the final norm (and, for tied embeddings, the
    embedding doubles as the LM head): rank 0 embeds the prompt and every rank computes the
    logits from the gathered last hidden state.
    """

    def __init__(
        self, body: nn.Module, start_layer: int, end_layer: int, group: mx.distributed.Group
    ) -> None:
        super().__init__()
        layers = cast("list[nn.Module]", body["layers"])
        self.embed_tokens = cast("nn.Module", body["embed_tokens"])
        self.norm = cast("nn.Module", body["norm"])
        self.layers = layers[start_layer:end_layer]
        # Not arrays or modules, so nn.Module keeps these as plain attributes.
        self.rank = group.rank()
        self.size = group.size()
        self.group = group
        self.sliding_window = cast("int | None", getattr(body, "sliding_window", None))
        # What the ranks pass each other: the dtype a layer's output has, which is not the
        # embedding's when they differ (a float16 quantized embedding before float32 layers).
        # A receiver that took the embedding's dtype would read float32 bytes as float16.
        # Only the graph is built here: MLX knows the dtype without computing anything.
        probe = cast("Callable[[mx.array], mx.array]", self.embed_tokens)(
            mx.zeros((1, 1), dtype=mx.int32)
        )
        self.wire_dtype = cast("_Layer", layers[start_layer])(probe, None, cache=None).dtype

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[object] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        embed = cast("Callable[[mx.array], mx.array]", self.embed_tokens)
        # On ranks > 0 this only gives recv_like its shape and dtype: it is never evaluated.
        hidden = input_embeddings if input_embeddings is not None else embed(inputs)
        layers: list[nn.Module] = self.layers
        caches: list[object] = list(cache) if cache is not None else [None] * len(layers)
        masks = self._masks(hidden, layers, caches)

        if self.rank > 0:
            template = hidden.astype(self.wire_dtype)
            hidden = mx.distributed.recv_like(template, self.rank - 1, group=self.group)
        for layer, layer_cache, mask in zip(layers, caches, masks, strict=True):
            hidden = cast("_Layer", layer)(hidden, mask, cache=layer_cache)
        if self.rank < self.size - 1:
            hidden = mx.distributed.send(
                hidden.astype(self.wire_dtype), self.rank + 1, group=self.group
            )
            # Prefill evaluates only the KV caches: tying the send into the last cache makes
            # every prefill chunk perform it (otherwise the next rank waits forever).
            last_cache = caches[-1]
            if last_cache is not None:
                keyed_cache = cast("_KeyedCache", last_cache)
                keyed_cache.keys = _depends(keyed_cache.keys, hidden)
        # Every rank needs the last rank's hidden state; gathering keeps it in the graph of
        # every rank, so all of them take part in the collective at the same step.
        gathered = mx.distributed.all_gather(hidden.astype(self.wire_dtype), group=self.group)
        batch = hidden.shape[0]
        norm = cast("Callable[[mx.array], mx.array]", self.norm)
        return norm(gathered[(self.size - 1) * batch :])

    def _masks(
        self, hidden: mx.array, layers: list[nn.Module], caches: list[object]
    ) -> list[_Mask]:
        """One mask per layer, made as `LlamaModel` makes them (full or sliding attention)."""
        sliding = [bool(getattr(layer, "use_sliding", False)) for layer in layers]
        full_mask: _Mask = None
        sliding_mask: _Mask = None
        if not all(sliding):
            full_mask = _create_attention_mask(hidden, caches[sliding.index(False)])
        if any(sliding):
            sliding_mask = _create_attention_mask(
                hidden, caches[sliding.index(True)], window_size=self.sliding_window
            )
        return [sliding_mask if is_sliding else full_mask for is_sliding in sliding]


def pipeline_problem(config: dict[str, object]) -> str | None:
    """Why this model cannot be pipelined here, judged from its config, or None."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral"):
        return f"pipeline parallelism is implemented for llama models, not {model_type!r}"
    return None


def load_pipeline_shard(
    model_dir: Path, *, start_layer: int, end_layer: int, group: mx.distributed.Group
) -> LoadedModel:
    """The model with only layers [start_layer, end_layer), its weights still lazy.

    The other layers are dropped before anything is read, so their weights are never loaded,
    and they need not even be in the directory.
    """
    loaded = load_lazily(model_dir, strict=False)
    model = loaded.model
    if type(model).__module__ != _LLAMA_MODULE:
        raise ValueError(f"pipeline parallelism needs a llama model, not {type(model).__module__}")
    body = cast("nn.Module", model["model"])
    layer_count = len(cast("list[nn.Module]", body["layers"]))
    if not 0 <= start_layer < end_layer <= layer_count:
        raise ValueError(f"layers [{start_layer}, {end_layer}) do not fit {layer_count} layers")
    _check_weights_present(model_dir, model, start_layer, end_layer)
    pipelined = PipelinedLlamaBody(body, start_layer, end_layer, group)
    model.model = pipelined
    return replace(loaded, layers=tuple(pipelined.layers))


def _check_weights_present(
    model_dir: Path, model: nn.Module, start_layer: int, end_layer: int
) -> None:
    """Every weight this shard keeps must be in the safetensors (it was loaded non-strictly)."""
    available = _safetensors_names(model_dir)
    kept_layers = {f"model.layers.{index}." for index in range(start_layer, end_layer)}
    missing: list[str] = []
    for name, _ in _tree_flatten(cast("object", model.parameters())):
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in kept_layers:
                continue
        if name not in available:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{model_dir} lacks {len(missing)} weights this shard needs: {shown}")


def _safetensors_names(model_dir: Path) -> set[str]:
    """Tensor names from the safetensors headers (8-byte length, then JSON), no data read."""
    names: set[str] = set()
    for path in sorted(model_dir.glob("model*.safetensors")):
        with path.open("rb") as weights:
            (header_length,) = cast(
                "tuple[int]", _SAFETENSORS_HEADER_LENGTH.unpack(weights.read(8))
            )
            header = cast("dict[str, object]", json.loads(weights.read(header_length)))
        names.update(name for name in header if name != "__metadata__")
    return names
