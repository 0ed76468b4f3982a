"""Tensor parallelism through mlx-lm's own `Model.shard(group)`.

Every rank holds every layer and a 1/world_size slice of each: the attention heads and the
MLP's hidden units are split across ranks and the partial outputs all-summed. The split is
exact only when the head counts and the MLP width divide by the group size (SmolLM2-135M's 9
heads and 3 KV heads split across 3 ranks, not 2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import mlx.core as mx

from shoal_worker.runner.mlx_bindings import LoadedModel, load_lazily


def tensor_problem(config: dict[str, object], world_size: int) -> str | None:
    """Why this model cannot be split across world_size ranks, or None."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    intermediate = config.get("intermediate_size")
    if not (isinstance(heads, int) and isinstance(kv_heads, int)):
        return "config.json gives no integer head counts to split for tensor parallelism"
    undivided = [
        f"{what} {count}"
        for what, count in (
            ("attention heads", heads),
            ("key/value heads", kv_heads),
            ("intermediate size", intermediate),
        )
        if isinstance(count, int) and count % world_size
    ]
    if undivided:
        return (
            f"tensor parallelism over {world_size} ranks needs counts that divide by"
            f" {world_size}, but this model has {', '.join(undivided)}"
        )
    return None


def load_tensor_shard(model_dir: Path, group: mx.distributed.Group) -> LoadedModel:
    """The whole model with each layer sharded for this rank, its weights still lazy.

    Sharding slices the lazy weights, so materializing a layer keeps only this rank's part
    (the full tensor is read to take the slice, one layer at a time).
    """
    loaded = load_lazily(model_dir)
    shard = cast(
        "Callable[[mx.distributed.Group], None] | None", getattr(loaded.model, "shard", None)
    )
    if shard is None:
        model_type = type(loaded.model).__module__
        raise ValueError(f"{model_type} has no tensor-parallel `shard` in mlx-lm")
    shard(group)
    return loaded
