"""Tiny random llama GGUF files in every tensor type the importer supports, written with
llama.cpp's own gguf-py so that the tests need no download.

The tokenizer is SmolLM2's, copied field by field from the bundled GGUF: a real 49152-token
byte-level BPE that the importer's tokenizer rebuild and mlx-lm's loader accept as they would
a real model's. Only the transformer is tiny (and random).

Imported by the tests in this directory as `services.worker.tests.tiny_gguf`: pytest's
importlib mode registers the test directory's parent packages, but never puts the directory
itself on sys.path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal, cast, final, get_args

import gguf
import numpy as np
import numpy.typing as npt
from shoal_worker.models.default_model import bundled_gguf_path

TinyType = Literal["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
TINY_TYPES: Final[tuple[TinyType, ...]] = get_args(TinyType)

FloatArray = npt.NDArray[np.float32]

# llama.cpp's `general.file_type` for a file whose 2-D weights are all of one type.
_FILE_TYPES: Final[Mapping[TinyType, gguf.LlamaFileType]] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
_QUANT_BLOCK: Final = 32


@final
@dataclass(frozen=True)
class TinyLlama:
    """Hyperparameters: small enough to write and convert in a second, big enough for GQA
    (two query heads per KV head) and for RoPE to matter (head_dim 16)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    context: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY: Final = TinyLlama()


@final
@dataclass(frozen=True)
class CopiedField:
    key: str
    value: object
    value_type: gguf.GGUFValueType
    element_type: gguf.GGUFValueType | None


@cache
def smollm2_tokenizer_fields() -> tuple[CopiedField, ...]:
    """Every `tokenizer.*` metadata field of the bundled SmolLM2 GGUF (read once: gguf-py
    takes a couple of seconds over its 49152 tokens and 48900 merges)."""
    reader = gguf.GGUFReader(bundled_gguf_path())
    copied: list[CopiedField] = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = list(field.types)
        is_array = types[0] == gguf.GGUFValueType.ARRAY
        copied.append(
            CopiedField(
                key=key,
                value=cast(object, field.contents()),
                value_type=types[0],
                element_type=types[-1] if is_array else None,
            )
        )
    return tuple(copied)


def vocab_size() -> int:
    for field in smollm2_tokenizer_fields():
        if field.key == "tokenizer.ggml.tokens":
            return len(cast(list[str], field.value))
    raise AssertionError("the bundled GGUF has no tokenizer.ggml.tokens")


def random_weights(seed: int = 0, shape: TinyLlama = TINY) -> dict[str, FloatArray]:
    """float32 weights by GGUF tensor name, in numpy's (rows, row length) order: a linear
    layer's (out_features, in_features), which GGUF records reversed as (ne0, ne1).

    Scaled so that activations stay near unit size: attention is then far from uniform,
    so a wrong RoPE or head layout changes the logits a lot."""
    rng = np.random.default_rng(seed)

    def linear(out_features: int, in_features: int) -> FloatArray:
        scale = 1.0 / np.sqrt(in_features)
        return (rng.standard_normal((out_features, in_features)) * scale).astype(np.float32)

    def norm(size: int) -> FloatArray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    kv_width = shape.kv_heads * shape.head_dim
    vocab = vocab_size()
    weights: dict[str, FloatArray] = {
        "token_embd.weight": rng.standard_normal((vocab, shape.hidden)).astype(np.float32),
        "output_norm.weight": norm(shape.hidden),
        "output.weight": linear(vocab, shape.hidden),
    }
    for layer in range(shape.layers):
        prefix = f"blk.{layer}"
        weights |= {
            f"{prefix}.attn_norm.weight": norm(shape.hidden),
            f"{prefix}.attn_q.weight": linear(shape.hidden, shape.hidden),
            f"{prefix}.attn_k.weight": linear(kv_width, shape.hidden),
            f"{prefix}.attn_v.weight": linear(kv_width, shape.hidden),
            f"{prefix}.attn_output.weight": linear(shape.hidden, shape.hidden),
            f"{prefix}.ffn_norm.weight": norm(shape.hidden),
            f"{prefix}.ffn_gate.weight": linear(shape.ffn, shape.hidden),
            f"{prefix}.ffn_up.weight": linear(shape.ffn, shape.hidden),
            f"{prefix}.ffn_down.weight": linear(shape.hidden, shape.ffn),
        }
    return weights


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: FloatArray, tensor_type: str) -> None:
    qtype = gguf.GGMLQuantizationType[tensor_type]
    # As llama.cpp's converter does: 1-D tensors (the norms) stay F32, and so does a matrix
    # whose rows are not whole 32-element quantization blocks.
    if array.ndim != 2 or (qtype.name.startswith("Q") and array.shape[-1] % _QUANT_BLOCK):
        writer.add_tensor(name, array)
    elif qtype.name.startswith("Q"):
        packed = cast(npt.NDArray[np.uint8], gguf.quants.quantize(array, qtype))
        writer.add_tensor(name, packed, raw_dtype=qtype)
    else:
        # The writer takes a float type from the numpy dtype.
        writer.add_tensor(name, array.astype(np.float16 if qtype.name == "F16" else np.float32))


def write_tiny_llama(
    path: Path,
    tensor_type: TinyType,
    *,
    name: str | None = "Tiny Llama",
    seed: int = 0,
    architecture: str = "llama",
    chat_template: bool = True,
) -> None:
    """A 2-layer random llama GGUF whose 2-D weights are all `tensor_type`."""
    shape = TINY
    writer = gguf.GGUFWriter(path, architecture)
    if name is not None:
        writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[tensor_type])
    writer.add_uint32("llama.block_count", shape.layers)
    writer.add_uint32("llama.context_length", shape.context)
    writer.add_uint32("llama.embedding_length", shape.hidden)
    writer.add_uint32("llama.feed_forward_length", shape.ffn)
    writer.add_uint32("llama.attention.head_count", shape.heads)
    writer.add_uint32("llama.attention.head_count_kv", shape.kv_heads)
    writer.add_float32("llama.rope.freq_base", shape.rope_theta)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", shape.rms_eps)
    writer.add_uint32("llama.rope.dimension_count", shape.head_dim)
    writer.add_uint32("llama.vocab_size", vocab_size())
    for field in smollm2_tokenizer_fields():
        if field.key == "tokenizer.chat_template" and not chat_template:
            continue
        writer.add_key_value(field.key, field.value, field.value_type, field.element_type)
    for tensor_name, array in random_weights(seed, shape).items():
        _add_tensor(writer, tensor_name, array, tensor_type)
    _write(writer)


def write_single_tensor_gguf(
    path: Path, *, architecture: str, qtype: gguf.GGMLQuantizationType
) -> None:
    """A GGUF holding only `general.architecture` and one 4x256 tensor of `qtype` (random
    bytes: enough for the header checks, which run before any data is read)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, row_length = 4, 256
    data = np.random.default_rng(0).integers(
        0, 256, (rows, row_length // block_size * type_size), dtype=np.uint8
    )
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    _write(writer)


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
