"""GGUF import for every tensor type MLX runs (F32, F16, Q8_0, Q4_0, Q4_1): the converted
model's logits against a float64 numpy forward pass over gguf-py's dequantization of the same
file, and a clear one-line error for what the importer cannot take."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from shoal_worker.models.gguf_import import GgufImportError, WeightFormat, convert_gguf

from services.worker.tests.llama_reference import (
    Float64Array,
    dequantized_tensors,
    reference_logits,
)
from services.worker.tests.tiny_gguf import (
    TINY,
    TINY_TYPES,
    TinyType,
    write_single_tensor_gguf,
    write_tiny_llama,
)

# A short chat-like sequence of real SmolLM2 ids, control tokens included.
TOKENS: Final = [1, 9690, 198, 504, 3458, 314, 4649, 30, 2, 198, 1, 520, 9531]

# Tolerances on max |logit - reference| / max |reference| (the reference logits are of size
# ~5). Float weights and float32-dequantized weights are exact, so only float32 arithmetic
# against float64 remains: measured ~5e-7. With quantized weights mlx-lm's quantized
# embedding dequantizes the looked-up rows in the scales' float16 (2**-11 relative per
# element); the quantized matmuls themselves are exact with float32 inputs: measured ~1e-3.
EXACT_TOLERANCE: Final = 1e-5
FLOAT16_EMBEDDING_TOLERANCE: Final = 5e-3
QUANTIZED_TYPES: Final[frozenset[TinyType]] = frozenset({"Q8_0", "Q4_0", "Q4_1"})
BITS: Final[Mapping[TinyType, int]] = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
# A wrong RoPE pairing must move the logits far beyond any tolerance, or the comparison
# would prove little about the Q/K layout.
WRONG_ROPE_MINIMUM: Final = 0.1


class TinyCase(NamedTuple):
    tensor_type: TinyType
    gguf_path: Path
    reference: Float64Array
    wrong_rope_reference: Float64Array


@pytest.fixture(scope="module", params=TINY_TYPES)
def tiny_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    tensor_type = cast(TinyType, request.param)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{tensor_type}.gguf"
    write_tiny_llama(path, tensor_type)
    weights = dequantized_tensors(path)
    return TinyCase(
        tensor_type=tensor_type,
        gguf_path=path,
        reference=reference_logits(weights, TINY, TOKENS),
        wrong_rope_reference=reference_logits(weights, TINY, TOKENS, interleaved_rope=False),
    )


def _converted(case: TinyCase, weight_format: WeightFormat) -> Path:
    directory = case.gguf_path.parent / f"converted-{weight_format}"
    convert_gguf(case.gguf_path, directory, weight_format=weight_format)
    return directory


def _mlx_logits(directory: Path) -> Float64Array:
    model = cast(Callable[[mx.array], mx.array], mlx_lm.load(str(directory))[0])
    logits = model(mx.array([TOKENS]))[0].astype(mx.float32)
    return np.array(logits, dtype=np.float64)


def _relative_difference(logits: Float64Array, reference: Float64Array) -> float:
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def _read_json(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))


# --- logits ------------------------------------------------------------------------------


def test_quantized_format_logits_match_reference(tiny_case: TinyCase) -> None:
    logits = _mlx_logits(_converted(tiny_case, "quantized"))
    difference = _relative_difference(logits, tiny_case.reference)
    print(f"{tiny_case.tensor_type} quantized format: relative difference {difference:.2e}")
    quantized = tiny_case.tensor_type in QUANTIZED_TYPES
    assert difference < (FLOAT16_EMBEDDING_TOLERANCE if quantized else EXACT_TOLERANCE)
    assert (logits.argmax(axis=-1) == tiny_case.reference.argmax(axis=-1)).all()


def test_float32_format_logits_match_reference(tiny_case: TinyCase) -> None:
    logits = _mlx_logits(_converted(tiny_case, "float32"))
    difference = _relative_difference(logits, tiny_case.reference)
    print(f"{tiny_case.tensor_type} float32 format: relative difference {difference:.2e}")
    assert difference < EXACT_TOLERANCE


def test_reference_tells_rope_layouts_apart(tiny_case: TinyCase) -> None:
    difference = _relative_difference(tiny_case.wrong_rope_reference, tiny_case.reference)
    assert difference > WRONG_ROPE_MINIMUM


# --- what is stored ----------------------------------------------------------------------


def test_quantized_format_keeps_the_storage_type(tiny_case: TinyCase) -> None:
    directory = _converted(tiny_case, "quantized")
    config = _read_json(directory / "config.json")
    stored = cast(dict[str, mx.array], mx.load(str(directory / "model.safetensors")))
    linear_weights = [name for name in stored if name.endswith(".weight") and "norm" not in name]
    assert len(linear_weights) == 2 + 7 * TINY.layers
    if tiny_case.tensor_type in QUANTIZED_TYPES:
        bits = BITS[tiny_case.tensor_type]
        assert config["quantization"] == {"group_size": 32, "bits": bits}
        assert all(stored[name].dtype == mx.uint32 for name in linear_weights)
    else:
        float_type = mx.float16 if tiny_case.tensor_type == "F16" else mx.float32
        assert "quantization" not in config
        assert not any(name.endswith(".scales") for name in stored)
        assert all(stored[name].dtype == float_type for name in linear_weights)
    norms = [name for name in stored if "norm" in name]
    assert all(stored[name].dtype == mx.float32 for name in norms)
    assert config["tie_word_embeddings"] is False


def test_float32_format_is_all_float32(tiny_case: TinyCase) -> None:
    directory = _converted(tiny_case, "float32")
    stored = cast(dict[str, mx.array], mx.load(str(directory / "model.safetensors")))
    assert "quantization" not in _read_json(directory / "config.json")
    assert all(array.dtype == mx.float32 for array in stored.values())


# --- what is refused ---------------------------------------------------------------------


FileWriter = Callable[[Path], object]


def _single_tensor(architecture: str, qtype: gguf.GGMLQuantizationType) -> FileWriter:
    def write(path: Path) -> None:
        write_single_tensor_gguf(path, architecture=architecture, qtype=qtype)

    return write


def _safetensors_file(path: Path) -> None:
    """A safetensors file: an 8-byte header length, a JSON header, then the data."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)


REFUSED: Final[list[tuple[str, FileWriter, str]]] = [
    (
        "gpt2",
        _single_tensor("gpt2", gguf.GGMLQuantizationType.F32),
        r"unsupported model architecture 'gpt2' \(only 'llama' is supported\)",
    ),
    (
        # Named for its architecture, not for its (also unsupported) K-quant tensors.
        "qwen2moe-q6_k",
        _single_tensor("qwen2moe", gguf.GGMLQuantizationType.Q6_K),
        r"unsupported model architecture 'qwen2moe'",
    ),
    (
        "q5_k",
        _single_tensor("llama", gguf.GGMLQuantizationType.Q5_K),
        r"unsupported GGUF tensor type Q5_K .*supported types are F32, F16, Q4_0, Q4_1, Q8_0",
    ),
    (
        "q6_k",
        _single_tensor("llama", gguf.GGMLQuantizationType.Q6_K),
        r"unsupported GGUF tensor type Q6_K \(first: tensor 'blk.0.ffn_down.weight'\)",
    ),
    ("text", lambda path: path.write_text("not a model\n"), r"not a GGUF file"),
    ("safetensors", _safetensors_file, r"not a GGUF file \(missing 'GGUF' magic bytes\)"),
]


@pytest.mark.parametrize(
    ("write_file", "message"),
    [(writer, message) for _, writer, message in REFUSED],
    ids=[name for name, _, _ in REFUSED],
)
def test_refused_file_raises_one_line_error(
    tmp_path: Path, write_file: FileWriter, message: str
) -> None:
    path = tmp_path / "model.gguf"
    write_file(path)
    output_dir = tmp_path / "out" / "model"
    with pytest.raises(GgufImportError, match=message) as raised:
        convert_gguf(path, output_dir, weight_format="quantized")
    assert "\n" not in str(raised.value)
    assert str(path) in str(raised.value)
    assert not output_dir.parent.exists()
