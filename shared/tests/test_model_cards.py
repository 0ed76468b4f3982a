"""The model catalogue: every TOML card loads, is self-consistent and matches its sources."""

import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Final, TypedDict, cast

import pytest
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard, ModelCardError, builtin_cards, parse_card

# Rows of reference/model-facts.jsonl (measured from the mlx-community repos) for the models the
# catalogue lists, copied so the test never depends on a file outside the repository.
FACTS_SUBSET: Final = Path(__file__).parent / "model_facts_subset.jsonl"

HUB_ORG: Final = "mlx-community/"
REQUIRED_FAMILIES: Final = frozenset(
    {"llama", "qwen", "gemma", "mistral", "deepseek", "gpt-oss", "smollm"}
)
KNOWN_FAMILIES: Final = REQUIRED_FAMILIES | {"kimi", "glm", "minimax"}

# Bits stored per parameter, counting the per-group scales and biases of MLX quantization.
BITS_PER_PARAMETER: Final[Mapping[str, float]] = {
    "4bit": 4.5,
    "5bit": 5.5,
    "6bit": 6.5,
    "8bit": 8.5,
    "mxfp4": 4.25,
    "bf16": 16.0,
    "fp16": 16.0,
}
# Two quantizations of one base model: their stored sizes differ by the ratio of their bit
# widths, give or take this much (embeddings and norms are often kept at higher precision).
RATIO_TOLERANCE: Final = 0.35

# Context lengths that are not powers of two but are real (Qwen3 40K, DeepSeek 160K, MiniMax
# 192K, GLM 198K).
KNOWN_CONTEXT_LENGTHS: Final = frozenset({40_960, 163_840, 196_608, 202_752})

MIN_STORAGE_BYTES: Final = 100_000_000
MAX_STORAGE_BYTES: Final = 2_000_000_000_000

ESTIMATE_COMMENT: Final = re.compile(
    r"^# storage_bytes estimated: (?P<params>\d+) parameters at (?P<bits>[\d.]+) bits$",
    re.MULTILINE,
)


class FactsRow(TypedDict):
    model_id: str
    n_layers: int
    hidden_size: int
    num_key_value_heads: int | None
    storage_bytes: int
    context_length: int
    supports_tensor: bool


def card_files() -> dict[str, str]:
    """File name -> text for every TOML card shipped in shoal_shared.model_cards."""
    return {
        entry.name: entry.read_text()
        for entry in resources.files("shoal_shared.model_cards").iterdir()
        if entry.name.endswith(".toml")
    }


def parsed_files() -> dict[str, ModelCard]:
    return {name: parse_card(text, name) for name, text in card_files().items()}


def hub_cards() -> list[ModelCard]:
    return [card for card in builtin_cards().values() if card.source == "huggingface"]


def hub_repo(card: ModelCard) -> str:
    assert card.hf_repo is not None, f"{card.model_id}: a hub card without hf_repo"
    return card.hf_repo


def repo_name(card: ModelCard) -> str:
    return hub_repo(card).rsplit("/", 1)[-1]


def load_facts() -> dict[str, FactsRow]:
    rows = [
        cast("FactsRow", json.loads(line))
        for line in FACTS_SUBSET.read_text().splitlines()
        if line.strip()
    ]
    return {row["model_id"]: row for row in rows}


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def card_id(card: ModelCard) -> str:
    return card.model_id


# 1. Loading


def test_every_card_file_loads_and_builtin_cards_holds_them_all() -> None:
    files = parsed_files()
    cards = builtin_cards()
    assert len(files) >= 31
    assert len(cards) == len(files), "two card files share a model_id"
    assert {card.model_id for card in files.values()} == set(cards)
    for card in files.values():
        assert cards[card.model_id] == card


def test_file_names_follow_the_repo_or_bundled_id() -> None:
    for file_name, card in parsed_files().items():
        if card.source == "huggingface":
            assert file_name == f"{repo_name(card).lower()}.toml", card.model_id
        else:
            assert file_name == f"{card.model_id}.toml"


def test_names_are_unique_per_quantization() -> None:
    labels = [(card.name, card.quantization) for card in builtin_cards().values()]
    assert len(labels) == len(set(labels))


# 2. Internal consistency


@pytest.mark.parametrize("card", list(builtin_cards().values()), ids=card_id)
def test_card_numbers_are_consistent(card: ModelCard) -> None:
    assert card.layers >= 1
    assert card.kv_heads <= card.attention_heads
    assert card.attention_heads % card.kv_heads == 0
    assert card.hidden_size >= card.attention_heads
    assert card.hidden_size % 64 == 0 or card.hidden_size % card.attention_heads == 0
    assert MIN_STORAGE_BYTES <= card.storage_bytes <= MAX_STORAGE_BYTES
    assert card.bytes_per_layer * card.layers >= card.storage_bytes
    assert card.context_length >= 2048
    assert is_power_of_two(card.context_length) or card.context_length in KNOWN_CONTEXT_LENGTHS
    assert {"text", "chat"} <= set(card.capabilities)
    assert len(card.capabilities) == len(set(card.capabilities))
    assert card.family in KNOWN_FAMILIES
    assert 0.0 < card.sampling.temperature <= 1.5


@pytest.mark.parametrize("card", hub_cards(), ids=card_id)
def test_hub_cards_name_their_mlx_community_repo(card: ModelCard) -> None:
    repo = hub_repo(card)
    assert repo == card.model_id
    assert repo.startswith(HUB_ORG)
    assert repo.count("/") == 1
    assert card.quantization in BITS_PER_PARAMETER
    assert card.quantization.lower() in repo_name(card).lower()


def quantization_variants() -> list[tuple[ModelCard, ModelCard]]:
    by_base: defaultdict[str, list[ModelCard]] = defaultdict(list)
    for card in hub_cards():
        base = repo_name(card).lower().replace(card.quantization.lower(), "", 1)
        by_base[base].append(card)
    return [
        (low, high)
        for variants in by_base.values()
        for low in variants
        for high in variants
        if BITS_PER_PARAMETER[low.quantization] < BITS_PER_PARAMETER[high.quantization]
    ]


def test_the_catalogue_has_quantization_variants_to_compare() -> None:
    assert len(quantization_variants()) >= 10


@pytest.mark.parametrize(
    ("low", "high"),
    quantization_variants(),
    ids=lambda card: cast("ModelCard", card).model_id,
)
def test_quantization_variants_scale_with_their_bit_widths(low: ModelCard, high: ModelCard) -> None:
    expected = BITS_PER_PARAMETER[high.quantization] / BITS_PER_PARAMETER[low.quantization]
    actual = high.storage_bytes / low.storage_bytes
    assert expected * (1 - RATIO_TOLERANCE) <= actual <= expected * (1 + RATIO_TOLERANCE)
    shape = ("layers", "hidden_size", "attention_heads", "kv_heads", "architecture", "family")
    for field in shape:
        assert getattr(low, field) == getattr(high, field), field


# 3. Architectures


@pytest.mark.parametrize("card", hub_cards(), ids=card_id)
def test_every_architecture_is_an_mlx_lm_module(card: ModelCard) -> None:
    assert importlib.util.find_spec(f"mlx_lm.models.{card.architecture}") is not None


# 4. Coverage


def test_the_catalogue_covers_the_families_and_sizes() -> None:
    cards = hub_cards()
    assert {card.family for card in cards} >= REQUIRED_FAMILIES
    sizes = [card.storage_bytes for card in cards]
    assert min(sizes) < 2_000_000_000
    assert max(sizes) > 200_000_000_000


# 5. Errors

VALID_CARD: Final = """
model_id = "mlx-community/Tiny-4bit"
name = "Tiny"
family = "llama"
architecture = "llama"
source = "huggingface"
hf_repo = "mlx-community/Tiny-4bit"
quantization = "4bit"
layers = 2
hidden_size = 64
attention_heads = 4
kv_heads = 2
storage_bytes = 1000000
context_length = 2048
capabilities = ["text", "chat"]
supports_tensor = true
"""


def test_the_inline_card_is_valid() -> None:
    card = parse_card(VALID_CARD, "tiny.toml")
    assert card.model_id == ModelId("mlx-community/Tiny-4bit")
    assert card.sampling.temperature == 0.7


def test_bad_toml_is_reported() -> None:
    with pytest.raises(ModelCardError, match=r"^broken\.toml: not valid TOML"):
        parse_card(VALID_CARD + "layers = = 3\n", "broken.toml")


def test_a_missing_field_is_reported() -> None:
    text = VALID_CARD.replace("hidden_size = 64\n", "")
    with pytest.raises(ModelCardError, match=r"(?s)^missing\.toml: .*hidden_size.*Field required"):
        parse_card(text, "missing.toml")


def test_heads_that_kv_heads_do_not_divide_are_reported() -> None:
    text = VALID_CARD.replace("kv_heads = 2", "kv_heads = 3")
    with pytest.raises(
        ModelCardError,
        match=r"(?s)^heads\.toml: .*4 attention heads are not a multiple of 3 KV heads",
    ):
        parse_card(text, "heads.toml")


def test_an_unknown_capability_is_reported() -> None:
    text = VALID_CARD.replace('["text", "chat"]', '["text", "chat", "code"]')
    with pytest.raises(ModelCardError, match=r"(?s)^caps\.toml: .*capabilities"):
        parse_card(text, "caps.toml")


# 6. Sources of the numbers


def test_the_facts_subset_lists_only_catalogued_models() -> None:
    facts = load_facts()
    assert len(facts) >= 20
    assert set(facts) <= set(builtin_cards())


@pytest.mark.parametrize("card", hub_cards(), ids=card_id)
def test_cards_match_the_measured_facts(card: ModelCard) -> None:
    row = load_facts().get(card.model_id)
    if row is None:
        return  # checked by test_estimated_sizes_say_so
    assert card.layers == row["n_layers"]
    assert card.hidden_size == row["hidden_size"]
    assert card.kv_heads == row["num_key_value_heads"]
    assert card.storage_bytes == row["storage_bytes"]
    assert card.context_length == row["context_length"]
    assert card.supports_tensor == row["supports_tensor"]


def test_estimated_sizes_say_so() -> None:
    """A card not in the facts carries its estimate, and the estimate gives its storage_bytes."""
    facts = load_facts()
    files = card_files()
    for file_name, card in parsed_files().items():
        if card.source != "huggingface":
            continue
        estimate = ESTIMATE_COMMENT.search(files[file_name])
        if card.model_id in facts:
            assert estimate is None, file_name
            continue
        assert estimate is not None, f"{file_name}: neither measured nor marked as estimated"
        bits = float(estimate["bits"])
        assert bits == BITS_PER_PARAMETER[card.quantization], file_name
        assert card.storage_bytes == pytest.approx(int(estimate["params"]) * bits / 8, rel=0.01)
