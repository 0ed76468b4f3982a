"""`import_gguf_model`: a GGUF file becomes `<models>/local/<id>/` with a card that the node's
scan of imported models accepts, and whose numbers are the GGUF's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, cast

import gguf
import pytest
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard, SamplingDefaults, parse_card
from shoal_worker.downloads.local_models import CARD_FILE, imported_cards
from shoal_worker.models.card_toml import card_toml
from shoal_worker.models.default_model import bundled_gguf_path
from shoal_worker.models.gguf_card import (
    MODEL_ID_PATTERN,
    default_model_id,
    import_gguf_model,
)
from shoal_worker.models.gguf_import import COMPLETE_MARKER
from shoal_worker.models.gguf_metadata import GgufHeader, GgufImportError

from services.worker.tests.tiny_gguf import (
    TINY,
    TINY_TYPES,
    TinyType,
    write_single_tensor_gguf,
    write_tiny_llama,
)

MODEL_FILES: Final = {
    CARD_FILE,
    COMPLETE_MARKER,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_q8_0(gguf_dir: Path) -> Path:
    path = gguf_dir / "tiny-Q8_0.gguf"
    write_tiny_llama(path, "Q8_0")
    return path


@pytest.fixture(scope="module")
def tiny_f16(gguf_dir: Path) -> Path:
    path = gguf_dir / "tiny-F16.gguf"
    write_tiny_llama(path, "F16", name=None)
    return path


def _assert_only_model(models_dir: Path, model_id: str) -> None:
    """One model directory under local/, and nothing left in the staging area."""
    assert [path.name for path in (models_dir / "local").iterdir()] == [model_id]
    assert list((models_dir / ".gguf-imports").iterdir()) == []


# --- the directory and the card ------------------------------------------------------------


def test_import_writes_a_card_the_node_finds(tmp_path: Path, tiny_q8_0: Path) -> None:
    card = import_gguf_model(tiny_q8_0, tmp_path)
    directory = tmp_path / "local" / card.model_id
    assert {path.name for path in directory.iterdir()} == MODEL_FILES
    card_text = (directory / CARD_FILE).read_text(encoding="utf-8")
    assert parse_card(card_text, CARD_FILE) == card
    assert imported_cards(tmp_path) == {card.model_id: (card, directory)}
    _assert_only_model(tmp_path, card.model_id)


def test_card_numbers_are_the_gguf_numbers(tmp_path: Path, tiny_q8_0: Path) -> None:
    card = import_gguf_model(tiny_q8_0, tmp_path, "tiny")
    directory = tmp_path / "local" / "tiny"
    config = cast(dict[str, object], json.loads((directory / "config.json").read_text()))
    assert card == ModelCard(
        model_id=ModelId("tiny"),
        name="Tiny Llama",
        family="llama",
        architecture="llama",
        source="local",
        quantization="q8_0",
        layers=TINY.layers,
        hidden_size=TINY.hidden,
        attention_heads=TINY.heads,
        kv_heads=TINY.kv_heads,
        storage_bytes=(directory / "model.safetensors").stat().st_size,
        context_length=TINY.context,
        capabilities=("text", "chat"),
        supports_tensor=True,
        sampling=SamplingDefaults(),
    )
    assert config["quantization"] == {"group_size": 32, "bits": 8}
    assert "hf_repo" not in (directory / CARD_FILE).read_text()


@pytest.mark.parametrize("tensor_type", TINY_TYPES)
def test_quantization_is_named_and_kept(
    tmp_path: Path, gguf_dir: Path, tensor_type: TinyType
) -> None:
    path = gguf_dir / f"kept-{tensor_type}.gguf"
    write_tiny_llama(path, tensor_type)
    card = import_gguf_model(path, tmp_path)
    assert card.quantization == tensor_type.lower()
    assert card.model_id == f"tiny-llama-{tensor_type.lower()}"
    config = json.loads((tmp_path / "local" / card.model_id / "config.json").read_text())
    # F16 and F32 stay float: no quantization entry, so mlx-lm builds plain Linear layers.
    assert ("quantization" in config) == tensor_type.startswith("Q")


def test_no_chat_template_means_text_only(tmp_path: Path, gguf_dir: Path) -> None:
    path = gguf_dir / "no-template.gguf"
    write_tiny_llama(path, "Q4_0", chat_template=False)
    card = import_gguf_model(path, tmp_path, "plain")
    assert card.capabilities == ("text",)


def test_bundled_gguf_imports_with_its_own_numbers(tmp_path: Path) -> None:
    card = import_gguf_model(bundled_gguf_path(), tmp_path)
    # general.name is "Smollm2 135M 8k Lc100K Mix1 Ep2"; most weights are Q4_1 (the
    # embedding is Q8_0).
    assert card.model_id == "smollm2-135m-8k-lc100k-mix1-ep2-q4_1"
    assert card.quantization == "q4_1"
    assert (card.layers, card.hidden_size, card.attention_heads, card.kv_heads) == (30, 576, 9, 3)
    assert card.context_length == 8192
    assert card.capabilities == ("text", "chat")


# --- ids -------------------------------------------------------------------------------------


def _header(name: str | None) -> GgufHeader:
    general = {"general.architecture": "llama"}
    if name is not None:
        general["general.name"] = name
    return GgufHeader(general=general, tensors=[])


@pytest.mark.parametrize(
    ("name", "file_name", "quantization", "expected"),
    [
        ("My Model", "x.gguf", "q8_0", "my-model-q8_0"),
        ("SmolLM2 135M Instruct Q4_1", "x.gguf", "q4_1", "smollm2-135m-instruct-q4_1"),
        (None, "Foo-Bar.Q4_0.gguf", "q4_0", "foo-bar.q4_0"),
        (None, "Foo Bar (v2).gguf", "f16", "foo-bar-v2-f16"),
        ("模型", "Qwen-Tiny.gguf", "f32", "qwen-tiny-f32"),
        ("模型", "模型.gguf", "f32", "model-f32"),
        ("a" * 80, "x.gguf", "q4_0", "a" * 59 + "-q4_0"),
    ],
)
def test_default_model_id(
    name: str | None, file_name: str, quantization: str, expected: str
) -> None:
    model_id = default_model_id(Path(file_name), _header(name), quantization)
    assert model_id == expected
    assert MODEL_ID_PATTERN.fullmatch(model_id)


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("../escape", "invalid model id"),
        ("a/b", "invalid model id"),
        (".hidden", "invalid model id"),
        ("", "invalid model id"),
        ("has space", "invalid model id"),
        ("x" * 65, "invalid model id"),
        ("smollm2-135m", "belongs to a catalogue model"),
    ],
)
def test_bad_model_id_is_refused(
    tmp_path: Path, tiny_q8_0: Path, model_id: str, message: str
) -> None:
    with pytest.raises(GgufImportError, match=message):
        import_gguf_model(tiny_q8_0, tmp_path, model_id)
    assert not (tmp_path / "local").exists()


# --- replacing ------------------------------------------------------------------------------


def test_reimport_replaces_the_model(tmp_path: Path, tiny_q8_0: Path, tiny_f16: Path) -> None:
    import_gguf_model(tiny_q8_0, tmp_path, "same")
    card = import_gguf_model(tiny_f16, tmp_path, "same")
    assert card.quantization == "f16"
    assert card.name == "same"  # the F16 file has no general.name
    assert imported_cards(tmp_path) == {"same": (card, tmp_path / "local" / "same")}
    config = json.loads((tmp_path / "local" / "same" / "config.json").read_text())
    assert "quantization" not in config
    _assert_only_model(tmp_path, "same")


def test_failed_import_keeps_the_existing_model(tmp_path: Path, tiny_q8_0: Path) -> None:
    card = import_gguf_model(tiny_q8_0, tmp_path, "keep")
    broken = tmp_path / "broken.gguf"
    write_single_tensor_gguf(broken, architecture="llama", qtype=gguf.GGMLQuantizationType.Q6_K)
    with pytest.raises(GgufImportError, match="Q6_K"):
        import_gguf_model(broken, tmp_path, "keep")
    assert imported_cards(tmp_path) == {"keep": (card, tmp_path / "local" / "keep")}
    _assert_only_model(tmp_path, "keep")


# --- the TOML ---------------------------------------------------------------------------------


def test_card_toml_round_trips_awkward_strings() -> None:
    card = ModelCard(
        model_id=ModelId("odd"),
        name='Quote " backslash \\ tab \t newline \n del \x7f bell \x07 emoji 🤖 ünï',
        family="llama",
        architecture="llama",
        source="local",
        quantization="q4_0",
        layers=1,
        hidden_size=8,
        attention_heads=2,
        kv_heads=1,
        storage_bytes=1,
        context_length=16,
        capabilities=("text",),
        supports_tensor=True,
        sampling=SamplingDefaults(temperature=0.25, top_p=0.95),
    )
    text = card_toml(card, comment="two\nlines")
    assert text.startswith("# two\n# lines\n")
    assert parse_card(text, "odd") == card
