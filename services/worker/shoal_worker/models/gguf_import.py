"""Convert a llama-architecture GGUF file into an MLX model directory for `mlx_lm.load`.

The directory holds config.json, model.safetensors (+ index), the tokenizer files and a
completion marker. It is built in a temporary sibling directory and renamed into place, so a
crash never leaves a half-written model where a loader would find it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

import mlx.core as mx

from shoal_worker.models.gguf_metadata import (
    GgufImportError,
    GgufMetadata,
    reject_unsupported_architecture,
    reject_unsupported_tensor_types,
    scan_header,
)
from shoal_worker.models.gguf_tokenizer import special_token_ids, write_tokenizer_files

__all__ = ["COMPLETE_MARKER", "GgufImportError", "WeightFormat", "convert_gguf", "is_converted"]

# "quantized" keeps the GGUF's storage types (its block quantizations as MLX affine triples,
# its float tensors as they are); "float32" dequantizes everything.
WeightFormat = Literal["quantized", "float32"]

# Written last, inside the temporary directory: its presence means the directory is complete.
COMPLETE_MARKER: Final = "shoal-gguf-import.json"
# Bumped when the output layout changes, so that old conversions are not mistaken for new.
IMPORTER_VERSION: Final = 1
# Q4_0, Q4_1 and Q8_0 all use blocks of 32 weights, which mx.load keeps as the group size.
GGUF_GROUP_SIZE: Final = 32
WEIGHTS_FILE: Final = "model.safetensors"
_STAGING_INFIX: Final = ".partial-"
# A conversion of the bundled model takes seconds; an hour-old staging directory is debris.
STALE_STAGING_SECONDS: Final = 3600.0

_LAYER_TENSOR_NAMES: Final[Mapping[str, str]] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_LEVEL_TENSOR_NAMES: Final[Mapping[str, str]] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR_PATTERN: Final = re.compile(r"blk\.(\d+)\.(\w+)")
_PARAMETER_SUFFIXES: Final = ("weight", "scales", "biases")


# mlx's stub leaves the return type of save_safetensors unannotated; it returns None.
_save_safetensors = cast(
    Callable[[str, dict[str, mx.array], dict[str, str]], None],
    getattr(mx, "save_safetensors"),  # noqa: B009 (typed re-binding)
)


def is_converted(output_dir: Path) -> bool:
    return (output_dir / COMPLETE_MARKER).is_file()


def convert_gguf(gguf_path: Path, output_dir: Path, *, weight_format: WeightFormat) -> None:
    """Convert `gguf_path` into an MLX model directory at `output_dir` (no-op if done)."""
    if weight_format not in get_args(WeightFormat):
        raise ValueError(f"weight_format must be one of {get_args(WeightFormat)}")
    if is_converted(output_dir):
        return
    weights, metadata = _read_gguf(gguf_path)
    config = _model_config(metadata, weights)
    mlx_weights = _rename_weights(weights)
    if weight_format == "float32":
        mlx_weights = _dequantize_to_float32(mlx_weights)
    else:
        # An F16 or F32 GGUF has nothing quantized: its weights stay in their float type.
        quantization = _quantization_config(mlx_weights)
        if quantization is not None:
            config["quantization"] = quantization
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging_dirs(output_dir)
    staging_dir = Path(tempfile.mkdtemp(prefix=_staging_prefix(output_dir), dir=output_dir.parent))
    # mkdtemp creates the directory owner-only; a model directory is meant to be shared.
    staging_dir.chmod(0o755)
    try:
        _write_model_dir(staging_dir, mlx_weights, config, metadata)
        _write_json(
            staging_dir / COMPLETE_MARKER,
            {
                "importer_version": IMPORTER_VERSION,
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
                "weight_format": weight_format,
            },
        )
        _move_into_place(staging_dir, output_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def _staging_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}{_STAGING_INFIX}"


def _remove_stale_staging_dirs(output_dir: Path) -> None:
    """Delete staging directories that a killed conversion left behind.

    Only old ones: a young one may belong to a conversion running in another process.
    """
    now = time.time()
    for candidate in output_dir.parent.glob(f"{_staging_prefix(output_dir)}*"):
        try:
            if now - candidate.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(candidate, ignore_errors=True)
        except FileNotFoundError:
            continue  # another process cleaned it up first


def _read_gguf(path: Path) -> tuple[dict[str, mx.array], GgufMetadata]:
    # Our own header scan first: it gives clear errors for non-GGUF files, for other
    # architectures (before their tensor types, which would be the lesser complaint) and
    # for tensor types that mx.load would reject or silently degrade to float16.
    header = scan_header(path)
    reject_unsupported_architecture(path, header)
    reject_unsupported_tensor_types(path, header.tensors)
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise GgufImportError(f"{path}: cannot load GGUF: {error}") from error
    weights, raw_metadata = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    return weights, GgufMetadata(raw_metadata, path)


def _mlx_module_name(gguf_module: str) -> str:
    if gguf_module in _TOP_LEVEL_TENSOR_NAMES:
        return _TOP_LEVEL_TENSOR_NAMES[gguf_module]
    match = _LAYER_TENSOR_PATTERN.fullmatch(gguf_module)
    if match is not None and match.group(2) in _LAYER_TENSOR_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSOR_NAMES[match.group(2)]}"
    raise GgufImportError(f"unexpected tensor '{gguf_module}' for the llama architecture")


def _rename_weights(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """GGUF names to mlx-lm llama names; the weight/scales/biases suffixes stay as they are.

    The Q/K rows stay in llama.cpp's interleaved-RoPE order: config.json says
    `rope_traditional: true`, which is exactly the rotation that order expects.
    """
    renamed: dict[str, mx.array] = {}
    for name, array in weights.items():
        module, _, suffix = name.rpartition(".")
        if suffix not in _PARAMETER_SUFFIXES:
            raise GgufImportError(f"unexpected tensor '{name}' for the llama architecture")
        renamed[f"{_mlx_module_name(module)}.{suffix}"] = array
    return renamed


def _quantized_modules(weights: Mapping[str, mx.array]) -> list[str]:
    return [name.removesuffix(".scales") for name in weights if name.endswith(".scales")]


def _quantized_bits(weights: Mapping[str, mx.array], module: str) -> int:
    """Bits per weight of a quantized module, from its packed uint32 width per group."""
    packed_width = weights[f"{module}.weight"].shape[-1]
    group_count = weights[f"{module}.scales"].shape[-1]
    return packed_width * 32 // (group_count * GGUF_GROUP_SIZE)


def _quantization_config(weights: Mapping[str, mx.array]) -> dict[str, object] | None:
    """The most common bit width as the default, per-module entries for the others; None
    when nothing is quantized.

    mlx-lm's load_model returns `config["quantization"][module_path]` for a module path
    found there, and otherwise infers parameters from the weights; explicit entries make
    the mixed 4-/8-bit layout visible in config.json and independent of that inference.
    Modules without scales (the norms, or an F16 embedding in a Q8_0 file) stay float:
    mlx-lm quantizes only where the weights have scales.
    """
    bits_by_module = {
        module: _quantized_bits(weights, module) for module in _quantized_modules(weights)
    }
    if not bits_by_module:
        return None
    default_bits = Counter(bits_by_module.values()).most_common(1)[0][0]
    config: dict[str, object] = {"group_size": GGUF_GROUP_SIZE, "bits": default_bits}
    for module, bits in sorted(bits_by_module.items()):
        if bits != default_bits:
            config[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return config


def _dequantize_to_float32(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Exact float32 weights: scale * q + bias with float16 GGUF scales and q < 256 is
    representable in float32. (Dequantizing with the float16 scales as they are would
    round every weight to float16, a relative error of up to 2**-11.)"""
    quantized = set(_quantized_modules(weights))
    result: dict[str, mx.array] = {}
    for name, array in weights.items():
        module, _, suffix = name.rpartition(".")
        if module not in quantized:
            result[name] = array.astype(mx.float32)
        elif suffix == "weight":
            result[name] = mx.dequantize(
                array,
                scales=weights[f"{module}.scales"].astype(mx.float32),
                biases=weights[f"{module}.biases"].astype(mx.float32),
                group_size=GGUF_GROUP_SIZE,
                bits=_quantized_bits(weights, module),
            )
        # scales and biases are folded into the dequantized weight
    return result


def _model_config(metadata: GgufMetadata, weights: Mapping[str, mx.array]) -> dict[str, object]:
    hidden_size = metadata.integer("llama.embedding_length")
    head_count = metadata.integer("llama.attention.head_count")
    tokens = metadata.string_list("tokenizer.ggml.tokens")
    ids = special_token_ids(metadata)
    eos_ids = ids.eos_ids()
    config: dict[str, object] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": metadata.integer("llama.block_count"),
        "intermediate_size": metadata.integer("llama.feed_forward_length"),
        "num_attention_heads": head_count,
        "num_key_value_heads": metadata.optional_integer("llama.attention.head_count_kv")
        or head_count,
        "head_dim": metadata.optional_integer("llama.attention.key_length")
        or hidden_size // head_count,
        "rms_norm_eps": metadata.number("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": metadata.optional_number("llama.rope.freq_base") or 10000.0,
        "rope_traditional": True,
        "vocab_size": metadata.optional_integer("llama.vocab_size") or len(tokens),
        "max_position_embeddings": metadata.integer("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
    }
    rope_scaling = _rope_scaling(metadata, weights)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if ids.bos is not None:
        config["bos_token_id"] = ids.bos
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return config


def _rope_scaling(
    metadata: GgufMetadata, weights: Mapping[str, mx.array]
) -> dict[str, object] | None:
    if "rope_freqs.weight" in weights:
        # Llama 3.1-style scaling is stored as precomputed frequencies, which mlx-lm's llama
        # model cannot take as a tensor.
        raise GgufImportError("RoPE frequency tensors (Llama 3.1-style scaling) are not supported")
    scaling_type = metadata.optional_string("llama.rope.scaling.type")
    if scaling_type in (None, "none"):
        return None
    if scaling_type == "linear":
        return {"type": "linear", "factor": metadata.number("llama.rope.scaling.factor")}
    raise GgufImportError(f"unsupported RoPE scaling type '{scaling_type}'")


def _write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_dir(
    directory: Path,
    weights: dict[str, mx.array],
    config: dict[str, object],
    metadata: GgufMetadata,
) -> None:
    _save_safetensors(str(directory / WEIGHTS_FILE), weights, {"format": "mlx"})
    total_size = sum(array.nbytes for array in weights.values())
    _write_json(
        directory / f"{WEIGHTS_FILE}.index.json",
        {
            "metadata": {"total_size": total_size},
            "weight_map": dict.fromkeys(sorted(weights), WEIGHTS_FILE),
        },
    )
    _write_json(directory / "config.json", config)
    write_tokenizer_files(
        metadata, directory, context_length=cast(int, config["max_position_embeddings"])
    )


def _move_into_place(staging_dir: Path, output_dir: Path) -> None:
    """Rename the finished directory into place; a concurrent converter may have won."""
    try:
        # POSIX rename replaces an empty directory too, but never a non-empty one.
        os.replace(staging_dir, output_dir)
    except OSError as error:
        if is_converted(output_dir):
            return
        raise GgufImportError(
            f"{output_dir} exists and is not a completed conversion; remove it and retry"
        ) from error
