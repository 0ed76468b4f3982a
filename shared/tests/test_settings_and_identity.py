import subprocess
import sys
from pathlib import Path

import pytest
from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCardError, builtin_cards, parse_card
from shoal_shared.node_identity import InvalidNodeIdError, load_or_create_node_id
from shoal_shared.settings import SettingsError, resolve_settings, settings_environment


def test_defaults(tmp_path: Path) -> None:
    settings = resolve_settings({"home": tmp_path}, environment={})
    assert settings.api_port == 52415
    assert settings.nats_url.endswith("@127.0.0.1:52416")
    assert settings.place_default_model


def test_flags_override_environment(tmp_path: Path) -> None:
    environment = {"SHOAL_HOME": str(tmp_path), "SHOAL_API_PORT": "8000"}
    assert resolve_settings({}, environment).api_port == 8000
    assert resolve_settings({"api_port": 9000}, environment).api_port == 9000
    assert resolve_settings({"api_port": None}, environment).api_port == 8000


def test_environment_round_trip(tmp_path: Path) -> None:
    settings = resolve_settings(
        {"home": tmp_path, "place_default_model": False, "nats_port": 4000}, environment={}
    )
    assert resolve_settings({}, settings_environment(settings)) == settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SHOAL_API_PORT", "eighty"), ("SHOAL_PLACE_DEFAULT_MODEL", "perhaps")],
)
def test_bad_environment_values_are_named(variable: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=variable):
        resolve_settings({"home": tmp_path}, environment={variable: value})


def test_node_id_persists(tmp_path: Path) -> None:
    first = load_or_create_node_id(tmp_path)
    assert load_or_create_node_id(tmp_path) == first
    assert (tmp_path / "node_id").read_text() == first


def test_racing_processes_agree_on_one_node_id(tmp_path: Path) -> None:
    program = (
        "import sys; from pathlib import Path; "
        "from shoal_shared.node_identity import load_or_create_node_id; "
        "print(load_or_create_node_id(Path(sys.argv[1])))"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", program, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    ids = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert len(ids) == 1
    assert ids == {(tmp_path / "node_id").read_text()}


def test_a_corrupt_node_id_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("not a valid id!\n")
    with pytest.raises(InvalidNodeIdError, match="node_id"):
        load_or_create_node_id(tmp_path)


def test_builtin_cards_load() -> None:
    card = builtin_cards()[ModelId("smollm2-135m")]
    assert (card.layers, card.attention_heads, card.kv_heads) == (30, 9, 3)


def test_bad_cards_are_reported_with_their_origin() -> None:
    with pytest.raises(ModelCardError, match=r"broken\.toml"):
        parse_card("model_id = ", "broken.toml")
    with pytest.raises(ModelCardError, match=r"odd\.toml"):
        parse_card('model_id = "x"', "odd.toml")
