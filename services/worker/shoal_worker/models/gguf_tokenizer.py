"""Rebuild a Hugging Face `tokenizers` tokenizer from the metadata of a GGUF file.

GGUF stores a byte-level BPE tokenizer as its token list, merge list, token types and a
`tokenizer.ggml.pre` name that selects llama.cpp's pre-tokenization regexes. We rebuild the
same pipeline with the `tokenizers` library so that ids match llama.cpp's, and write the
files (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) that mlx-lm's
`load` expects next to the weights, chat template included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from shoal_worker.models.gguf_metadata import GgufImportError, GgufMetadata

# llama.cpp token types (llama_token_type): 1 normal, 3 control, 4 user-defined.
_CONTROL_TOKEN_TYPE: Final = 3
_USER_DEFINED_TOKEN_TYPE: Final = 4

# The Llama 3 pre-tokenizer regex, as in Meta-Llama-3's tokenizer.json and llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_LLAMA3 (tokenizer.ggml.pre = "llama-bpe").
_LLAMA3_SPLIT_PATTERN: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SUPPORTED_PRE_TOKENIZERS: Final = ("smollm", "gpt2", "llama-bpe", "llama3", "llama-v3")


@dataclass(frozen=True)
class SpecialTokenIds:
    bos: int | None
    eos: int | None
    padding: int | None
    unknown: int | None
    end_of_turn: int | None

    def eos_ids(self) -> list[int]:
        """Every id that ends generation (end-of-sequence and end-of-turn, when distinct)."""
        ids = [token_id for token_id in (self.eos, self.end_of_turn) if token_id is not None]
        return list(dict.fromkeys(ids))


def special_token_ids(metadata: GgufMetadata) -> SpecialTokenIds:
    return SpecialTokenIds(
        bos=metadata.optional_integer("tokenizer.ggml.bos_token_id"),
        eos=metadata.optional_integer("tokenizer.ggml.eos_token_id"),
        padding=metadata.optional_integer("tokenizer.ggml.padding_token_id"),
        unknown=metadata.optional_integer("tokenizer.ggml.unknown_token_id"),
        end_of_turn=metadata.optional_integer("tokenizer.ggml.eot_token_id"),
    )


def _pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF equivalent of llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`."""
    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit on its own, then GPT-2's regex split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise GgufImportError(
        f"unsupported tokenizer pre-tokenizer '{pre}' (tokenizer.ggml.pre); "
        f"supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
    )


def _parse_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        # Byte-level tokens never contain a plain space (it is mapped to "Ġ").
        left, separator, right = merge.partition(" ")
        if not separator:
            raise GgufImportError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return pairs


def _post_processor(
    tokens: list[str], ids: SpecialTokenIds, *, add_bos: bool, add_eos: bool
) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    prefix = [ids.bos] if add_bos and ids.bos is not None else []
    suffix = [ids.eos] if add_eos and ids.eos is not None else []
    if not prefix and not suffix:
        return byte_level
    prefix_template = [f"{tokens[token_id]}:0" for token_id in prefix]
    suffix_template = [f"{tokens[token_id]}:0" for token_id in suffix]
    single = [*prefix_template, "$A:0", *suffix_template]
    pair = [*single, *[item.replace(":0", ":1") for item in prefix_template], "$B:1"]
    pair += [item.replace(":0", ":1") for item in suffix_template]
    template = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(tokens[token_id], token_id) for token_id in {*prefix, *suffix}],
    )
    return processors.Sequence([byte_level, template])


def build_tokenizer(metadata: GgufMetadata) -> Tokenizer:
    """A byte-level BPE tokenizer equivalent to llama.cpp's for this GGUF."""
    model_kind = metadata.string("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise GgufImportError(
            f"unsupported tokenizer model '{model_kind}' (tokenizer.ggml.model); "
            "only byte-level BPE ('gpt2') is supported"
        )
    tokens = metadata.string_list("tokenizer.ggml.tokens")
    token_types = metadata.integer_list("tokenizer.ggml.token_type")
    if len(token_types) != len(tokens):
        raise GgufImportError(
            "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"
        )
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = _parse_merges(metadata.string_list("tokenizer.ggml.merges"))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # No default for a missing `pre`: llama.cpp's fallback regex matches no HF tokenizer.
    tokenizer.pre_tokenizer = _pre_tokenizer_for(metadata.string("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(
        tokens,
        special_token_ids(metadata),
        add_bos=metadata.optional_boolean("tokenizer.ggml.add_bos_token") or False,
        add_eos=metadata.optional_boolean("tokenizer.ggml.add_eos_token") or False,
    )
    # Control tokens (<|im_start|>, ...) must match as a whole before BPE ever sees them.
    _add_tokens(
        tokenizer,
        [
            AddedToken(token, special=token_type == _CONTROL_TOKEN_TYPE, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=True)
            if token_type in (_CONTROL_TOKEN_TYPE, _USER_DEFINED_TOKEN_TYPE)
        ],
    )
    return tokenizer


def _add_tokens(tokenizer: Tokenizer, tokens: list[AddedToken]) -> None:
    # The tokenizers stub types the list's items as unknown; they are AddedToken or str.
    add_tokens = cast(Callable[[list[AddedToken]], int], getattr(tokenizer, "add_tokens"))  # noqa: B009
    add_tokens(tokens)


def _token_or_none(tokens: list[str], token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(metadata: GgufMetadata, output_dir: Path, *, context_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json."""
    tokenizer = build_tokenizer(metadata)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    tokens = metadata.string_list("tokenizer.ggml.tokens")
    ids = special_token_ids(metadata)
    tokenizer_config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_or_none(tokens, ids.bos),
        "eos_token": _token_or_none(tokens, ids.eos),
        "pad_token": _token_or_none(tokens, ids.padding),
        "unk_token": _token_or_none(tokens, ids.unknown),
        "add_bos_token": metadata.optional_boolean("tokenizer.ggml.add_bos_token") or False,
        "add_eos_token": metadata.optional_boolean("tokenizer.ggml.add_eos_token") or False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    chat_template = metadata.optional_string("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    _write_json(output_dir / "tokenizer_config.json", tokenizer_config)
    generation_config: dict[str, object] = {"eos_token_id": ids.eos_ids()}
    if ids.bos is not None:
        generation_config["bos_token_id"] = ids.bos
    if ids.padding is not None:
        generation_config["pad_token_id"] = ids.padding
    _write_json(output_dir / "generation_config.json", generation_config)
