"""Fixtures shared by the cross-service tests."""

from pathlib import Path

import pytest
from shoal_worker.models.default_model import ensure_default_model

from .hf_standin import StandardRepos, build_standard_repos


@pytest.fixture(scope="session")
def bundled_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M, converted once per session to a 4-bit MLX directory."""
    return ensure_default_model(tmp_path_factory.getbasetemp() / "bundled-models", "quantized")


@pytest.fixture(scope="session")
def standin_repos(
    tmp_path_factory: pytest.TempPathFactory, bundled_mlx_model: Path
) -> StandardRepos:
    """A Hub stand-in root with the split bundled model, a private copy and an unsupported repo."""
    return build_standard_repos(bundled_mlx_model, tmp_path_factory.mktemp("hub-root"))
