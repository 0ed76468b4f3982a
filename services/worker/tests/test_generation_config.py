import pytest
from shoal_shared.model_card import SamplingDefaults
from shoal_worker.downloads.added_model import sampling_from_generation_config

DEFAULTS = SamplingDefaults()


def test_the_repos_recommendation_is_taken() -> None:
    generation = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_from_generation_config(generation) == SamplingDefaults(
        temperature=0.6, top_p=0.95
    )


def test_an_integer_temperature_counts() -> None:
    assert sampling_from_generation_config({"temperature": 1}).temperature == 1.0


@pytest.mark.parametrize(
    "generation",
    [
        {},
        {"bos_token_id": 1, "eos_token_id": [2]},
        {"temperature": "0.6", "top_p": None},
        {"temperature": True},
        {"temperature": 5.0, "top_p": 0.0},
        {"temperature": -1, "top_p": 1.5},
    ],
)
def test_what_is_missing_or_out_of_range_keeps_the_defaults(
    generation: dict[str, object],
) -> None:
    assert sampling_from_generation_config(generation) == DEFAULTS


def test_each_value_stands_on_its_own() -> None:
    sampling = sampling_from_generation_config({"temperature": 9.0, "top_p": 0.8})
    assert sampling == SamplingDefaults(temperature=DEFAULTS.temperature, top_p=0.8)
