"""Which files of a model repository a shard needs. Pure: no I/O.

A pipeline shard keeps the weights of its own layers plus every tensor outside the layers
(embedding, final norm, head: the runner keeps those on every rank), so it needs the weight
files that hold any of those, and the small files every load reads (config, tokenizer).
"""

import re
from collections.abc import Iterable, Mapping
from typing import Final

_LAYER_TENSOR: Final = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WEIGHT_SUFFIXES: Final = (".safetensors",)
# Small files a load may read; anything else (README, images, other weight formats) is
# never fetched.
_SUPPORT_SUFFIXES: Final = (".json", ".txt", ".model", ".jinja", ".tiktoken")
INDEX_FILE: Final = "model.safetensors.index.json"


def layer_of(tensor_name: str) -> int | None:
    match = _LAYER_TENSOR.search(tensor_name)
    return int(match.group(1)) if match is not None else None


def is_weight_file(path: str) -> bool:
    return path.endswith(_WEIGHT_SUFFIXES)


def is_support_file(path: str) -> bool:
    return "/" not in path and path.endswith(_SUPPORT_SUFFIXES)


def weight_files_for_layers(
    weight_map: Mapping[str, str], start_layer: int, end_layer: int
) -> frozenset[str]:
    """Files holding a tensor of layers [start_layer, end_layer) or a tensor outside layers."""
    needed: set[str] = set()
    for tensor_name, file_name in weight_map.items():
        layer = layer_of(tensor_name)
        if layer is None or start_layer <= layer < end_layer:
            needed.add(file_name)
    return frozenset(needed)


def files_for_shard(
    repo_files: Iterable[str],
    weight_map: Mapping[str, str] | None,
    start_layer: int,
    end_layer: int,
) -> frozenset[str]:
    """Everything the shard needs from the repository's file list.

    Without an index (one `model.safetensors`) every shard needs the single weight file.
    """
    files = tuple(repo_files)
    support = {path for path in files if is_support_file(path)}
    if weight_map is None:
        weights = {path for path in files if is_weight_file(path) and "/" not in path}
    else:
        weights = set(weight_files_for_layers(weight_map, start_layer, end_layer))
    return frozenset(support | weights)


def layers_present(
    weight_map: Mapping[str, str],
    present_files: Iterable[str],
    layer_count: int,
    around: int | None = None,
) -> tuple[int, int] | None:
    """The run of layers [start, end) whose files (and the non-layer ones) are all present:
    the one holding layer `around` if given, else the longest; None if there is none."""
    present = set(present_files)
    missing_layers: set[int] = set()
    for tensor_name, file_name in weight_map.items():
        if file_name in present:
            continue
        layer = layer_of(tensor_name)
        if layer is None:
            return None
        missing_layers.add(layer)
    best: tuple[int, int] | None = None
    start: int | None = None
    for layer in range(layer_count + 1):
        if layer < layer_count and layer not in missing_layers:
            if start is None:
                start = layer
            continue
        if start is not None:
            if around is not None:
                if start <= around < layer:
                    return (start, layer)
            elif best is None or layer - start > best[1] - best[0]:
                best = (start, layer)
        start = None
    return best
