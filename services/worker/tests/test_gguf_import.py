"""The bundled SmolLM2 GGUF becomes an MLX model directory that mlx-lm loads and runs."""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
import regex
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from shoal_worker.models.default_model import (
    DEFAULT_MODEL_ID,
    bundled_gguf_path,
    ensure_default_model,
    preferred_weight_format,
)
from shoal_worker.models.gguf_import import (
    COMPLETE_MARKER,
    GgufImportError,
    WeightFormat,
    convert_gguf,
)
from tokenizers import Tokenizer

QUESTION = "What is the capital of France?"

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's John's book, isn't it?",
    "12345 and 3.14159 and 1,000,000",
    "Café naïve résumé — 日本語のテキスト, Ελληνικά, emoji 🤖🎉👍🏽",
    'def square(x: int) -> int:\n    return x ** 2  # "power"\n\tprint(f"{x=}")\n',
    "a   b\t\tc\n\n\n  d    \n   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 42!<|im_end|>\n"
    "<|im_start|>assistant\n",
]


# --- fixtures: convert once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


class Conversion(NamedTuple):
    directory: Path
    seconds: float


def _timed_default_model(models_dir: Path, weight_format: WeightFormat) -> Conversion:
    started = time.perf_counter()
    directory = ensure_default_model(models_dir, weight_format)
    return Conversion(directory, time.perf_counter() - started)


@pytest.fixture(scope="module")
def float32_conversion(models_dir: Path) -> Conversion:
    return _timed_default_model(models_dir, "float32")


@pytest.fixture(scope="module")
def quantized_conversion(models_dir: Path) -> Conversion:
    return _timed_default_model(models_dir, "quantized")


@pytest.fixture(scope="module")
def float32_dir(float32_conversion: Conversion) -> Path:
    return float32_conversion.directory


@pytest.fixture(scope="module")
def quantized_dir(quantized_conversion: Conversion) -> Path:
    return quantized_conversion.directory


class GgufReference(NamedTuple):
    """The GGUF's raw metadata, read here with mx.load independently of the importer."""

    metadata: dict[str, Any]
    tokens: list[str]
    merges: list[str]
    token_types: list[int]


@pytest.fixture(scope="module")
def gguf_reference() -> GgufReference:
    loaded = mx.load(str(bundled_gguf_path()), return_metadata=True)
    _, metadata = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    return GgufReference(
        metadata=metadata,
        tokens=cast(list[str], metadata["tokenizer.ggml.tokens"]),
        merges=cast(list[str], metadata["tokenizer.ggml.merges"]),
        token_types=cast(list[int], cast(mx.array, metadata["tokenizer.ggml.token_type"]).tolist()),
    )


def _metadata_number(reference: GgufReference, key: str) -> float:
    return float(cast(float, cast(mx.array, reference.metadata[key]).item()))


def _read_json(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))


# --- an independent, minimal byte-level BPE ---------------------------------------------


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


# GPT-2's pre-tokenization regex (what HF's ByteLevel(use_regex=True) applies).
GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
SINGLE_DIGIT = regex.compile(r"(\p{N})")


class ReferenceBpe:
    def __init__(self, reference: GgufReference) -> None:
        self.vocab = {token: token_id for token_id, token in enumerate(reference.tokens)}
        self.ranks = {
            cast(tuple[str, str], tuple(merge.split(" ", 1))): rank
            for rank, merge in enumerate(reference.merges)
        }
        control_tokens = [
            token
            for token, token_type in zip(reference.tokens, reference.token_types, strict=True)
            if token_type == 3
        ]
        longest_first = sorted(control_tokens, key=len, reverse=True)
        self.control_split = regex.compile(
            "(" + "|".join(regex.escape(token) for token in longest_first) + ")"
        )
        self.control_ids = {token: self.vocab[token] for token in control_tokens}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self.control_split.split(text):
            if segment in self.control_ids:
                ids.append(self.control_ids[segment])
            elif segment:
                for word in self._pre_tokenize(segment):
                    ids.extend(self.vocab[symbol] for symbol in self._merge(word))
        return ids

    @staticmethod
    def _pre_tokenize(text: str) -> Iterator[str]:
        # tokenizer.ggml.pre = "smollm": each digit on its own, then GPT-2's split.
        for piece in SINGLE_DIGIT.split(text):
            yield from cast(list[str], GPT2_SPLIT.findall(piece))

    def _merge(self, word: str) -> list[str]:
        """Repeatedly merge the lowest-ranked adjacent pair (the GPT-2 BPE algorithm)."""
        mapping = _byte_to_unicode()
        symbols = [mapping[byte] for byte in word.encode("utf-8")]
        while len(symbols) > 1:
            pairs = list(itertools.pairwise(symbols))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols


@pytest.fixture(scope="module")
def reference_bpe(gguf_reference: GgufReference) -> ReferenceBpe:
    return ReferenceBpe(gguf_reference)


@pytest.fixture(scope="module")
def converted_tokenizer(float32_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(float32_dir / "tokenizer.json"))


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_tokenizer_matches_reference_bpe(
    text: str, converted_tokenizer: Tokenizer, reference_bpe: ReferenceBpe
) -> None:
    assert converted_tokenizer.encode(text).ids == reference_bpe.encode(text)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_tokenizer_round_trips(text: str, converted_tokenizer: Tokenizer) -> None:
    ids = converted_tokenizer.encode(text).ids
    assert converted_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_individually(converted_tokenizer: Tokenizer) -> None:
    pieces = converted_tokenizer.encode("12345").tokens
    assert pieces == ["1", "2", "3", "4", "5"]


def test_control_tokens_are_special_single_tokens(
    converted_tokenizer: Tokenizer, gguf_reference: GgufReference
) -> None:
    assert converted_tokenizer.encode("<|im_start|>user").ids[0] == 1
    assert converted_tokenizer.decode([1, 2], skip_special_tokens=True) == ""
    control_count = gguf_reference.token_types.count(3)
    assert control_count == 17


def test_tokenizer_config_carries_chat_template_and_special_tokens(
    float32_dir: Path, gguf_reference: GgufReference
) -> None:
    tokenizer_config = _read_json(float32_dir / "tokenizer_config.json")
    assert tokenizer_config["chat_template"] == gguf_reference.metadata["tokenizer.chat_template"]
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    generation_config = _read_json(float32_dir / "generation_config.json")
    assert generation_config["eos_token_id"] == [2]


# --- config and files ----------------------------------------------------------------------


def test_config_matches_gguf_metadata(float32_dir: Path, gguf_reference: GgufReference) -> None:
    config = _read_json(float32_dir / "config.json")
    expected_integers = {
        "hidden_size": "llama.embedding_length",
        "num_hidden_layers": "llama.block_count",
        "intermediate_size": "llama.feed_forward_length",
        "num_attention_heads": "llama.attention.head_count",
        "num_key_value_heads": "llama.attention.head_count_kv",
        "max_position_embeddings": "llama.context_length",
        "vocab_size": "llama.vocab_size",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }
    for config_key, metadata_key in expected_integers.items():
        assert config[config_key] == _metadata_number(gguf_reference, metadata_key), config_key
    assert config["rope_theta"] == _metadata_number(gguf_reference, "llama.rope.freq_base")
    assert config["rms_norm_eps"] == pytest.approx(
        _metadata_number(gguf_reference, "llama.attention.layer_norm_rms_epsilon")
    )
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert "quantization" not in config


def test_quantized_config_describes_mixed_bits(quantized_dir: Path) -> None:
    config = _read_json(quantized_dir / "config.json")
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }


def test_weight_index_lists_every_tensor(float32_dir: Path) -> None:
    index = _read_json(float32_dir / "model.safetensors.index.json")
    stored = cast(dict[str, mx.array], mx.load(str(float32_dir / "model.safetensors")))
    assert set(cast(dict[str, str], index["weight_map"])) == set(stored)
    assert all(array.dtype == mx.float32 for array in stored.values())
    assert "lm_head.weight" not in stored


def test_converting_twice_is_a_noop(float32_dir: Path, models_dir: Path) -> None:
    weights_file = float32_dir / "model.safetensors"
    modified_before = weights_file.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_default_model(models_dir, "float32")
    assert again == float32_dir
    assert time.perf_counter() - started < 1.0
    assert weights_file.stat().st_mtime_ns == modified_before
    leftovers = [path.name for path in float32_dir.parent.iterdir() if "partial" in path.name]
    assert leftovers == []


def test_default_model_is_loadable(
    models_dir: Path, float32_dir: Path, quantized_dir: Path
) -> None:
    directory = ensure_default_model(models_dir)
    assert directory == models_dir / DEFAULT_MODEL_ID / preferred_weight_format()
    assert directory in (float32_dir, quantized_dir)
    assert (directory / COMPLETE_MARKER).is_file()
    model, _tokenizer = _load(directory)
    assert len(cast(list[nn.Module], getattr(model, "layers"))) == 30  # noqa: B009


# --- bad input ---------------------------------------------------------------------------


def _gguf_string(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def _write_tiny_gguf(path: Path, *, architecture: str, ggml_type: int, data: bytes) -> None:
    """A minimal GGUF v3 file: one string metadata entry and one 1-d tensor."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    header += _gguf_string("general.architecture") + struct.pack("<I", 8)
    header += _gguf_string(architecture)
    header += _gguf_string("token_embd.weight") + struct.pack("<IQ", 1, 256)
    header += struct.pack("<IQ", ggml_type, 0)
    padding = b"\0" * (-len(header) % 32)  # data starts at the default alignment
    path.write_bytes(header + padding + data)


BadFileWriter = Callable[[Path], object]


def _truncated_copy(size: int) -> BadFileWriter:
    def write(path: Path) -> None:
        with bundled_gguf_path().open("rb") as source:
            path.write_bytes(source.read(size))

    return write


BAD_FILES: Sequence[tuple[str, BadFileWriter, str]] = [
    ("text", lambda path: path.write_text("just some text\n"), "not a GGUF file"),
    ("empty", lambda path: path.write_bytes(b""), "not a GGUF file"),
    ("truncated-header", _truncated_copy(1000), "truncated"),
    ("truncated-data", _truncated_copy(5_000_000), "extends past the end of the file"),
    (
        "k-quant",
        lambda path: _write_tiny_gguf(path, architecture="llama", ggml_type=12, data=b"\0" * 144),
        "unsupported GGUF tensor type Q4_K",
    ),
    (
        "other-architecture",
        lambda path: _write_tiny_gguf(path, architecture="qwen2", ggml_type=0, data=b"\0" * 1024),
        "unsupported model architecture 'qwen2'",
    ),
]


@pytest.mark.parametrize(
    ("write_bad_file", "message"),
    [(writer, message) for _, writer, message in BAD_FILES],
    ids=[name for name, _, _ in BAD_FILES],
)
def test_bad_file_raises_clear_error(
    tmp_path: Path, write_bad_file: BadFileWriter, message: str
) -> None:
    bad_file = tmp_path / "bad.gguf"
    write_bad_file(bad_file)
    output_dir = tmp_path / "out" / "model"
    with pytest.raises(GgufImportError, match=message):
        convert_gguf(bad_file, output_dir, weight_format="float32")
    assert not output_dir.exists()
    leftovers = list(output_dir.parent.iterdir()) if output_dir.parent.exists() else []
    assert leftovers == []


def test_missing_file_raises_import_error(tmp_path: Path) -> None:
    with pytest.raises(GgufImportError, match="cannot read GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out", weight_format="float32")


def test_non_empty_foreign_output_dir_is_left_alone(tmp_path: Path) -> None:
    output_dir = tmp_path / "model"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(GgufImportError, match="not a completed conversion"):
        convert_gguf(bundled_gguf_path(), output_dir, weight_format="quantized")
    assert (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["model"]


# --- generation --------------------------------------------------------------------------


def _load(directory: Path) -> tuple[nn.Module, TokenizerWrapper]:
    return mlx_lm.load(str(directory))[:2]


def _chat_prompt(tokenizer: TokenizerWrapper, question: str) -> list[int]:
    apply_chat_template = cast(
        Callable[..., list[int]],
        getattr(tokenizer, "apply_chat_template"),  # noqa: B009
    )
    return apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


# mlx-lm leaves the **kwargs of stream_generate unannotated (they go to generate_step).
_stream_generate = cast(
    Callable[..., Iterator[GenerationResponse]],
    getattr(mlx_lm, "stream_generate"),  # noqa: B009
)


class Generation(NamedTuple):
    text: str
    tokens: list[int]


def _greedy(directory: Path, question: str, max_tokens: int) -> Generation:
    model, tokenizer = _load(directory)
    prompt = _chat_prompt(tokenizer, question)
    text = ""
    tokens: list[int] = []
    for response in _stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
    ):
        text += response.text
        tokens.append(response.token)
    return Generation(text, tokens)


@pytest.fixture(scope="module")
def float32_answer(float32_dir: Path) -> Generation:
    return _greedy(float32_dir, QUESTION, max_tokens=24)


def test_float32_greedy_answer_names_paris(float32_answer: Generation) -> None:
    print(f"float32 greedy answer: {float32_answer.text!r}")
    assert "Paris" in float32_answer.text


def test_quantized_greedy_answer_agrees(quantized_dir: Path, float32_answer: Generation) -> None:
    quantized_answer = _greedy(quantized_dir, QUESTION, max_tokens=12)
    print(f"quantized greedy answer: {quantized_answer.text!r}")
    assert "Paris" in quantized_answer.text
    assert quantized_answer.tokens[:5] == float32_answer.tokens[:5]


def test_conversion_timings_are_reported(
    float32_conversion: Conversion, quantized_conversion: Conversion
) -> None:
    print(
        f"conversion seconds: float32 {float32_conversion.seconds:.2f}, "
        f"quantized {quantized_conversion.seconds:.2f}"
    )
    assert float32_conversion.seconds < 120
    assert quantized_conversion.seconds < 120


def test_stale_staging_dirs_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".model.partial-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fresh = tmp_path / ".model.partial-running"
    fresh.mkdir()
    convert_gguf(bundled_gguf_path(), tmp_path / "model", weight_format="quantized")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.partial-running", "model"]
