"""Repos for the Hub stand-in, built from the bundled model (SmolLM2-135M converted to MLX).

A repo is a directory `<root>/<org>/<name>/` of plain files; the stand-in serves it as is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import mlx.core as mx

from .snapshots import SETTINGS_FILE, read_settings

INDEX_FILE: Final = "model.safetensors.index.json"
GITATTRIBUTES: Final = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
NOT_COPIED: Final = frozenset({"shoal-gguf-import.json"})
UNSUPPORTED_MODEL_TYPE: Final = "not_a_real_arch"
_LAYER: Final = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# mlx's stub leaves the return type of save_safetensors unannotated; it returns None.
_save_safetensors = cast(
    Callable[[str, dict[str, mx.array], dict[str, str]], None],
    getattr(mx, "save_safetensors"),  # noqa: B009 (typed re-binding)
)


def repo_dir(root: Path, repo_id: str) -> Path:
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:
        raise ValueError(f"a repo id is 'org/name', not {repo_id!r}")
    return root / org / name


def _fresh(root: Path, repo_id: str) -> Path:
    directory = repo_dir(root, repo_id)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / ".gitattributes").write_text(GITATTRIBUTES)
    return directory


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _load_weights(source_dir: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    weights: dict[str, mx.array] = {}
    metadata: dict[str, str] = {}
    files = sorted(source_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {source_dir}")
    for path in files:
        loaded = cast(
            tuple[dict[str, mx.array], dict[str, str]], mx.load(str(path), return_metadata=True)
        )
        weights.update(loaded[0])
        metadata.update(loaded[1])
    return weights, metadata


def build_split_repo(
    source_dir: Path,
    root: Path,
    repo_id: str,
    *,
    layers_per_file: int = 10,
    not_copied: Collection[str] = NOT_COPIED,
) -> Path:
    """An MLX model split into shards plus `model.safetensors.index.json`, as on the Hub.

    Shard 1 holds every tensor outside the transformer layers (embeddings, final norm, lm_head
    if any); the layers (`...layers.{i}.`) follow in contiguous ranges of `layers_per_file`,
    one shard per range: 30 layers by 10 give `model-00001-of-00004.safetensors` ... `-00004`.
    The other files of `source_dir` (config, tokenizer) are copied, except `not_copied`.
    """
    if layers_per_file < 1:
        raise ValueError("layers_per_file must be at least 1")
    weights, metadata = _load_weights(source_dir)
    by_layer: dict[int, dict[str, mx.array]] = {}
    outside: dict[str, mx.array] = {}
    for name, array in weights.items():
        match = _LAYER.search(name)
        if match is None:
            outside[name] = array
        else:
            by_layer.setdefault(int(match[1]), {})[name] = array
    layers = sorted(by_layer)
    ranges = [layers[i : i + layers_per_file] for i in range(0, len(layers), layers_per_file)]
    groups: list[dict[str, mx.array]] = [outside]
    for layer_range in ranges:
        groups.append({name: a for layer in layer_range for name, a in by_layer[layer].items()})

    directory = _fresh(root, repo_id)
    for path in sorted(source_dir.iterdir()):
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name != INDEX_FILE
            and path.name not in not_copied
        ):
            shutil.copyfile(path, directory / path.name)
    weight_map: dict[str, str] = {}
    for index, group in enumerate(groups, start=1):
        name = shard_name(index, len(groups))
        _save_safetensors(str(directory / name), group, {"format": "mlx", **metadata})
        weight_map.update(dict.fromkeys(group, name))
    total_size = sum(array.nbytes for array in weights.values())
    index_json = {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
    return directory


def build_unsupported_repo(
    root: Path, repo_id: str, model_type: str = UNSUPPORTED_MODEL_TYPE
) -> Path:
    """A tiny repo whose `model_type` is no mlx-lm architecture, with one shard and its index."""
    directory = _fresh(root, repo_id)
    config = {
        "model_type": model_type,
        "architectures": ["NotARealArchForCausalLM"],
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "vocab_size": 16,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        "model.embed_tokens.weight": mx.zeros((16, 8), dtype=mx.float16),
        "model.layers.0.weight": mx.ones((8, 8), dtype=mx.float16),
    }
    name = shard_name(1, 1)
    _save_safetensors(str(directory / name), tensors, {"format": "mlx"})
    index_json = {
        "metadata": {"total_size": sum(array.nbytes for array in tensors.values())},
        "weight_map": dict.fromkeys(sorted(tensors), name),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
    return directory


def build_repo(root: Path, repo_id: str, files: Mapping[str, bytes | str]) -> Path:
    """A repo of the given files (paths may have folders)."""
    directory = _fresh(root, repo_id)
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return directory


def clone_repo(root: Path, source_id: str, repo_id: str) -> Path:
    """A copy of another repo under a new id; files are hard links where the filesystem allows."""
    source = repo_dir(root, source_id)
    directory = repo_dir(root, repo_id)
    if directory.exists():
        shutil.rmtree(directory)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, directory, copy_function=link)
    return directory


def mark_private(root: Path, repo_id: str, token: str) -> None:
    """Make a repo private: the stand-in answers it only to `Authorization: Bearer <token>`."""
    repo_dir(root, repo_id)  # validates the id
    settings: dict[str, Any] = read_settings(root)
    private = cast(dict[str, str], settings.setdefault("private", {}))
    private[repo_id] = token
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


@dataclass(frozen=True)
class StandardRepos:
    """The repos `build_standard_repos` makes."""

    root: Path
    split: str
    """The bundled model in 4 shards (non-layer tensors, then layers 0-9, 10-19, 20-29)."""
    unsupported: str
    """A tiny repo with `model_type` "not_a_real_arch"."""
    private: str
    """The split repo again, private: needs `private_token`."""
    private_token: str


SPLIT_REPO: Final = "shoal-test/smollm2-135m-mlx-4bit-split"
UNSUPPORTED_REPO: Final = "shoal-test/not-a-real-arch"
PRIVATE_REPO: Final = "shoal-test/smollm2-135m-private"
PRIVATE_TOKEN: Final = "hf_standin_private_token"


def build_standard_repos(source_dir: Path, root: Path) -> StandardRepos:
    build_split_repo(source_dir, root, SPLIT_REPO, layers_per_file=10)
    build_unsupported_repo(root, UNSUPPORTED_REPO)
    clone_repo(root, SPLIT_REPO, PRIVATE_REPO)
    mark_private(root, PRIVATE_REPO, PRIVATE_TOKEN)
    return StandardRepos(root, SPLIT_REPO, UNSUPPORTED_REPO, PRIVATE_REPO, PRIVATE_TOKEN)
