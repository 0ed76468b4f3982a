"""`shoal models import`: a GGUF file becomes a local model, converted into
`<models>/local/<model id>/` next to the card (`shoal-card.toml`) that announces it.

The GGUF's quantization is kept: Q4_0, Q4_1 and Q8_0 weights stay MLX-quantized, F16 and
F32 weights stay float. The directory is built under a staging directory outside `local/` and
renamed into place, card included, so a node scanning `local/` never finds half an import.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Final, cast

from shoal_shared.model_card import ModelCard, builtin_cards

from shoal_worker.downloads.added_model import card_from_config
from shoal_worker.downloads.hub import HubError
from shoal_worker.downloads.local_models import CARD_FILE
from shoal_worker.downloads.store import local_model_dir
from shoal_worker.models.card_toml import card_toml
from shoal_worker.models.gguf_import import STALE_STAGING_SECONDS, WEIGHTS_FILE, convert_gguf
from shoal_worker.models.gguf_metadata import (
    SUPPORTED_TENSOR_TYPES,
    GgufHeader,
    GgufImportError,
    GgufTensorInfo,
    reject_unsupported_architecture,
    reject_unsupported_tensor_types,
    scan_header,
)

__all__ = ["MODEL_ID_PATTERN", "default_model_id", "gguf_quantization", "import_gguf_model"]

# A model id names a directory under `local/`: no separators, no leading dot.
MODEL_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_ID_MAX_LENGTH: Final = 64
_NOT_IN_SLUG: Final = re.compile(r"[^a-z0-9._]+")
_FALLBACK_SLUG: Final = "model"
# Under the models directory (the same file system, so the final rename is atomic), but
# outside `local/`, where an unfinished import's card would be found.
_STAGING_DIR: Final = ".gguf-imports"


def import_gguf_model(gguf_path: Path, models_dir: Path, model_id: str | None = None) -> ModelCard:
    """Convert `gguf_path` into `<models_dir>/local/<model_id>/` with its card, replacing
    any model of that id, and return the card."""
    header = scan_header(gguf_path)
    reject_unsupported_architecture(gguf_path, header)
    reject_unsupported_tensor_types(gguf_path, header.tensors)
    quantization = gguf_quantization(header.tensors)
    chosen_id = (
        default_model_id(gguf_path, header, quantization)
        if model_id is None
        else _validated_model_id(model_id)
    )
    staging_root = models_dir / _STAGING_DIR
    staging_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_imports(staging_root)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{chosen_id}-", dir=staging_root))
    try:
        converted = work_dir / "model"
        convert_gguf(gguf_path, converted, weight_format="quantized")
        card = _card(converted, chosen_id, header.name, quantization)
        comment = f"Imported by `shoal models import` from {gguf_path.name!r}."
        (converted / CARD_FILE).write_text(card_toml(card, comment=comment), encoding="utf-8")
        _replace(local_model_dir(models_dir, chosen_id), converted, work_dir / "previous")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return card


def gguf_quantization(tensors: list[GgufTensorInfo]) -> str:
    """The storage type of most 2-D weights, in lower case ("q4_1"): the norms are always
    F32, and a file's embedding often has a wider type than the rest."""
    matrices = [info for info in tensors if len(info.shape) >= 2] or tensors
    if not matrices:
        raise GgufImportError("the GGUF file holds no tensors")
    ggml_type = Counter(info.ggml_type for info in matrices).most_common(1)[0][0]
    return SUPPORTED_TENSOR_TYPES[ggml_type].lower()


def _slug(text: str) -> str:
    return _NOT_IN_SLUG.sub("-", text.lower()).strip("-._")


def default_model_id(gguf_path: Path, header: GgufHeader, quantization: str) -> str:
    """From `general.name` (else the file name), lower case, with the quantization appended
    unless the name already says it: "My Model" as Q8_0 becomes "my-model-q8_0"."""
    base = _slug(header.name or "") or _slug(gguf_path.stem) or _FALLBACK_SLUG
    if re.search(rf"(^|[^a-z0-9]){re.escape(quantization)}($|[^a-z0-9])", base):
        return base[:_MODEL_ID_MAX_LENGTH].rstrip("-._")
    suffix = f"-{quantization}"
    return base[: _MODEL_ID_MAX_LENGTH - len(suffix)].rstrip("-._") + suffix


def _validated_model_id(model_id: str) -> str:
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise GgufImportError(
            f"invalid model id {model_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if model_id in builtin_cards():
        raise GgufImportError(f"model id {model_id!r} belongs to a catalogue model")
    return model_id


def _card(directory: Path, model_id: str, name: str | None, quantization: str) -> ModelCard:
    config = cast(dict[str, object], json.loads((directory / "config.json").read_text()))
    tokenizer_config = cast(
        dict[str, object], json.loads((directory / "tokenizer_config.json").read_text())
    )
    try:
        card = card_from_config(
            config,
            model_id=model_id,
            source="local",
            storage_bytes=(directory / WEIGHTS_FILE).stat().st_size,
            chat="chat_template" in tokenizer_config,
        )
    except HubError as error:
        raise GgufImportError(str(error)) from error
    # card_from_config names the quantization from config.json ("4bit", or "bf16" when
    # there is none); the GGUF's own type name is the more precise one.
    return card.model_copy(update={"quantization": quantization, "name": name or model_id})


def _replace(target: Path, staged: Path, previous: Path) -> None:
    """Move `staged` to `target`, moving an existing `target` out of the way first.

    Each step is one rename: a reader sees the old model, or the new one, or (for the
    instant between the two) none, never a mix of files. POSIX has no portable exchange of
    two non-empty directories.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        target.rename(previous)
    try:
        staged.rename(target)
    except OSError:
        if previous.exists():
            previous.rename(target)
        raise


def _remove_stale_imports(staging_root: Path) -> None:
    """Delete what a killed import left; young entries may be an import in progress."""
    now = time.time()
    for entry in staging_root.iterdir():
        try:
            if now - entry.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            continue
