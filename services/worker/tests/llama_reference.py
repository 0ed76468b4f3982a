"""A llama forward pass in float64 numpy, straight from a GGUF's tensors as gguf-py reads and
dequantizes them: the reference that converted models are checked against.

It follows llama.cpp's semantics for `general.architecture = llama`, not mlx-lm's code: RMS
norms, rotary embeddings on adjacent pairs (llama.cpp's "normal" RoPE, which its converter
arranges the Q/K rows for), grouped-query causal attention, a SwiGLU MLP, and the output
matrix (or the token embedding, when there is none) for the logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, cast

import gguf
import numpy as np
import numpy.typing as npt

from services.worker.tests.tiny_gguf import TinyLlama

Float64Array = npt.NDArray[np.float64]

_OUTPUT: Final = "output.weight"
_EMBEDDING: Final = "token_embd.weight"


def dequantized_tensors(path: Path) -> dict[str, Float64Array]:
    """Every tensor of the GGUF file, dequantized by gguf-py from the file's raw bytes."""
    reader = gguf.GGUFReader(path)
    tensors: dict[str, Float64Array] = {}
    for tensor in reader.tensors:
        values = cast(
            npt.NDArray[np.float32], gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        )
        tensors[tensor.name] = values.astype(np.float64)
    return tensors


def _rms_norm(x: Float64Array, weight: Float64Array, eps: float) -> Float64Array:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: Float64Array, theta: float, *, interleaved: bool) -> Float64Array:
    """Rotate (positions, heads, head_dim) by position. Interleaved pairs are (2i, 2i+1),
    as llama.cpp rotates llama; the other layout pairs (i, i + head_dim/2) (NeoX)."""
    positions, _, head_dim = x.shape
    half = head_dim // 2
    frequencies = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    angles = np.arange(positions, dtype=np.float64)[:, None] * frequencies[None, :]
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x[..., :half], x[..., half:]
    rotated_first = first * cos - second * sin
    rotated_second = first * sin + second * cos
    result = np.empty_like(x)
    if interleaved:
        result[..., 0::2], result[..., 1::2] = rotated_first, rotated_second
    else:
        result[..., :half], result[..., half:] = rotated_first, rotated_second
    return result


def _attention(
    x: Float64Array,
    weights: Mapping[str, Float64Array],
    prefix: str,
    shape: TinyLlama,
    *,
    interleaved_rope: bool,
) -> Float64Array:
    positions = x.shape[0]
    head_dim = shape.head_dim
    q = (x @ weights[f"{prefix}.attn_q.weight"].T).reshape(positions, shape.heads, head_dim)
    k = (x @ weights[f"{prefix}.attn_k.weight"].T).reshape(positions, shape.kv_heads, head_dim)
    v = (x @ weights[f"{prefix}.attn_v.weight"].T).reshape(positions, shape.kv_heads, head_dim)
    q = _rope(q, shape.rope_theta, interleaved=interleaved_rope)
    k = _rope(k, shape.rope_theta, interleaved=interleaved_rope)
    group = shape.heads // shape.kv_heads
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
    future = np.triu(np.ones((positions, positions), dtype=bool), k=1)
    scores = np.where(future[None, :, :], -np.inf, scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities = scores / scores.sum(axis=-1, keepdims=True)
    attended = np.einsum("hqk,khd->qhd", probabilities, v).reshape(positions, shape.hidden)
    return attended @ weights[f"{prefix}.attn_output.weight"].T


def _mlp(x: Float64Array, weights: Mapping[str, Float64Array], prefix: str) -> Float64Array:
    gate = x @ weights[f"{prefix}.ffn_gate.weight"].T
    up = x @ weights[f"{prefix}.ffn_up.weight"].T
    silu = gate / (1.0 + np.exp(-gate))
    return (silu * up) @ weights[f"{prefix}.ffn_down.weight"].T


def reference_logits(
    weights: Mapping[str, Float64Array],
    shape: TinyLlama,
    tokens: Sequence[int],
    *,
    interleaved_rope: bool = True,
) -> Float64Array:
    """(positions, vocab) logits for `tokens` (no KV cache: the whole sequence at once)."""
    x = weights[_EMBEDDING][np.asarray(tokens)]
    for layer in range(shape.layers):
        prefix = f"blk.{layer}"
        normed = _rms_norm(x, weights[f"{prefix}.attn_norm.weight"], shape.rms_eps)
        x = x + _attention(normed, weights, prefix, shape, interleaved_rope=interleaved_rope)
        normed = _rms_norm(x, weights[f"{prefix}.ffn_norm.weight"], shape.rms_eps)
        x = x + _mlp(normed, weights, prefix)
    x = _rms_norm(x, weights["output_norm.weight"], shape.rms_eps)
    return x @ weights.get(_OUTPUT, weights[_EMBEDDING]).T
