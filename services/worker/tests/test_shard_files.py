from shoal_worker.downloads.shard_files import (
    files_for_shard,
    layer_of,
    layers_present,
    weight_files_for_layers,
)

# Like a split repository: the tensors outside layers in file 1, ten layers per other file.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-00001-of-00004.safetensors",
    "model.norm.weight": "model-00001-of-00004.safetensors",
    **{
        f"model.layers.{layer}.{part}": f"model-0000{2 + layer // 10}-of-00004.safetensors"
        for layer in range(30)
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.scales")
    },
}
REPO_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
    "README.md",
    ".gitattributes",
    "original/consolidated.safetensors",
    *sorted(set(WEIGHT_MAP.values())),
)


def test_layer_numbers_come_from_the_tensor_name() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("language_model.model.layers.3.self_attn.k_proj.biases") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None


def test_a_shard_needs_its_layers_files_and_the_shared_tensors() -> None:
    assert weight_files_for_layers(WEIGHT_MAP, 0, 15) == {
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
    }
    assert weight_files_for_layers(WEIGHT_MAP, 20, 30) == {
        "model-00001-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    }


def test_support_files_come_along_but_nothing_else() -> None:
    needed = files_for_shard(REPO_FILES, WEIGHT_MAP, 20, 30)
    assert needed == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    }


def test_without_an_index_the_single_weight_file_is_needed() -> None:
    needed = files_for_shard(("config.json", "model.safetensors", "README.md"), None, 3, 7)
    assert needed == {"config.json", "model.safetensors"}


def test_layers_present_finds_the_run_around_a_layer() -> None:
    files = ("model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors")
    assert layers_present(WEIGHT_MAP, files, 30) == (0, 10)
    both_ends = (*files, "model-00004-of-00004.safetensors")
    assert layers_present(WEIGHT_MAP, both_ends, 30, around=25) == (20, 30)
    assert layers_present(WEIGHT_MAP, both_ends, 30, around=15) is None
    # Without the shared tensors no layer can run.
    assert layers_present(WEIGHT_MAP, files[1:], 30) is None
