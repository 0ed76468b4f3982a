"""A model card made from a repository's config.json and safetensors index: for models
beyond the catalogue (`POST /models/add`) and for GGUF imports."""

import importlib
import importlib.util
import json
import logging
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, cast

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import ValidationError
from shoal_shared.ids import ModelId
from shoal_shared.model_card import Capability, ModelCard, ModelCardError, SamplingDefaults

from shoal_worker.downloads.hub import HubAccess, HubError, TransferHook, fetch_file, list_repo
from shoal_worker.downloads.shard_files import INDEX_FILE, is_weight_file

logger = logging.getLogger(__name__)

_DTYPE_NAMES: Final = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
GENERATION_CONFIG: Final = "generation_config.json"


def mlx_architecture(model_type: str) -> str | None:
    """The mlx-lm module that implements `model_type`, or None when mlx-lm has none."""
    from mlx_lm.utils import MODEL_REMAPPING

    remapping = cast("Mapping[str, str]", MODEL_REMAPPING)
    module = remapping.get(model_type, model_type)
    if not module.replace("_", "").isalnum():
        return None
    return module if importlib.util.find_spec(f"mlx_lm.models.{module}") is not None else None


def supports_tensor_parallel(architecture: str) -> bool:
    module = importlib.import_module(f"mlx_lm.models.{architecture}")
    model_class = cast("type | None", getattr(module, "Model", None))
    return model_class is not None and hasattr(model_class, "shard")


def _number(config: Mapping[str, object], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def card_from_config(
    config: Mapping[str, object],
    *,
    model_id: str,
    source: Literal["huggingface", "local"],
    storage_bytes: int,
    chat: bool,
    sampling: SamplingDefaults | None = None,
) -> ModelCard:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise HubError(f"{model_id}: config.json has no model_type")
    architecture = mlx_architecture(model_type)
    if architecture is None:
        raise HubError(
            f"{model_id}: architecture {model_type!r} is not supported by mlx-lm "
            "(no mlx_lm.models module implements it)"
        )
    text = cast("Mapping[str, object]", config.get("text_config") or config)
    layers = _number(text, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _number(text, "hidden_size", "n_embd", "d_model")
    heads = _number(text, "num_attention_heads", "n_head")
    if layers is None or hidden is None or heads is None:
        raise HubError(
            f"{model_id}: config.json lacks num_hidden_layers, hidden_size or num_attention_heads"
        )
    kv_heads = _number(text, "num_key_value_heads", "n_kv_head") or heads
    context = _number(text, "max_position_embeddings", "n_positions", "seq_length") or 4096
    quantization_config = config.get("quantization")
    if isinstance(quantization_config, dict):
        bits = cast("dict[str, object]", quantization_config).get("bits")
        quantization = f"{bits}bit"
    else:
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        quantization = _DTYPE_NAMES.get(dtype, dtype)
    capabilities: tuple[Capability, ...] = ("text", "chat") if chat else ("text",)
    try:
        return ModelCard(
            model_id=ModelId(model_id),
            name=model_id.rsplit("/", 1)[-1],
            family=model_type,
            architecture=architecture,
            source=source,
            hf_repo=model_id if source == "huggingface" else None,
            quantization=quantization,
            layers=layers,
            hidden_size=hidden,
            attention_heads=heads,
            kv_heads=kv_heads,
            storage_bytes=max(storage_bytes, 1),
            context_length=context,
            capabilities=capabilities,
            supports_tensor=supports_tensor_parallel(architecture),
            sampling=sampling or SamplingDefaults(),
        )
    except (ValueError, ModelCardError) as error:
        raise HubError(f"{model_id}: config.json does not make a valid card: {error}") from error


def sampling_from_generation_config(generation: Mapping[str, object]) -> SamplingDefaults:
    """The temperature and top_p a repo's generation_config.json recommends, as vLLM takes
    them by default; Shoal's own defaults for what it leaves out or gives out of range."""
    sampling = SamplingDefaults()
    for name in ("temperature", "top_p"):
        value = generation.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        try:
            sampling = sampling.model_validate({**sampling.model_dump(), name: float(value)})
        except ValidationError:
            continue
    return sampling


def _json_object(path: Path, model_id: str) -> dict[str, object]:
    try:
        loaded: object = json.loads(path.read_bytes())
    except ValueError as error:
        raise HubError(f"{model_id}: {path.name} is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise HubError(f"{model_id}: {path.name} is not a JSON object")
    return cast("dict[str, object]", loaded)


def card_from_hub(access: HubAccess, model_id: str) -> ModelCard:
    """Fetch config.json (and read the listing's sizes) and make the model's card."""
    if model_id.count("/") != 1 or not all(model_id.split("/")):
        raise HubError(f"{model_id!r} is not a Hugging Face repository id (owner/name)")
    try:
        validate_repo_id(model_id)
    except HFValidationError as error:
        raise HubError(f"{model_id!r} is not a Hugging Face repository id: {error}") from None
    if access.offline:
        raise HubError(f"cannot add {model_id}: this node is offline")
    listing = list_repo(access, model_id)
    names = {remote.path for remote in listing.files}
    if "config.json" not in names:
        raise HubError(f"{model_id} has no config.json")
    if INDEX_FILE not in names and "model.safetensors" not in names:
        raise HubError(f"{model_id} has no safetensors weights (model.safetensors or its index)")
    storage = sum(remote.size for remote in listing.files if is_weight_file(remote.path))
    never = TransferHook(lambda _initial, _total: None, lambda _count: None, threading.Event())
    with tempfile.TemporaryDirectory(prefix="shoal-add-") as scratch:
        config_path = fetch_file(access, listing, "config.json", Path(scratch), hook=never)
        config = _json_object(config_path, model_id)
        chat = "chat_template.jinja" in names
        if not chat and "tokenizer_config.json" in names:
            tokenizer_path = fetch_file(
                access, listing, "tokenizer_config.json", Path(scratch), hook=never
            )
            chat = "chat_template" in _json_object(tokenizer_path, model_id)
        sampling = SamplingDefaults()
        if GENERATION_CONFIG in names:
            generation_path = fetch_file(
                access, listing, GENERATION_CONFIG, Path(scratch), hook=never
            )
            try:
                sampling = sampling_from_generation_config(_json_object(generation_path, model_id))
            except HubError as error:
                # Only a recommendation: the model is added with Shoal's defaults.
                logger.warning("%s; using default sampling", error)
    return card_from_config(
        config,
        model_id=model_id,
        source="huggingface",
        storage_bytes=storage,
        chat=chat,
        sampling=sampling,
    )
