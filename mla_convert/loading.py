"""Loading models: converted checkpoints, and any model id the CLI accepts (Hub id or directory).

Hub ids go through the normal ``from_pretrained`` path (cache first). When the Hub cannot be
reached, the user gets one line at once instead of minutes of retries.
"""

from __future__ import annotations

import os
from pathlib import Path

import transformers
from transformers import AutoConfig, PreTrainedModel

from .errors import ModelNotFoundError, UnsupportedModelError
from .hosts import ADAPTERS
from .hub.access import hub_offline, hub_reachable


def load(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a model converted by mla_convert with the installed package's classes."""
    config = load_config(str(path))
    names = config.architectures or []
    for adapter in ADAPTERS:
        for cls in adapter.converted_classes():
            if cls.__name__ in names:
                return cls.from_pretrained(str(path), **kwargs)
    raise UnsupportedModelError(f"{path} is not a model converted by mla_convert (architectures: {names})")


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def resolve_model_id(model_id: str) -> str:
    """``bundled:NAME`` -> the local directory it is imported to (once); other ids unchanged."""
    from .importers.bundled import resolve_bundled

    return resolve_bundled(model_id)


def load_config(model_id: str, **kwargs):
    """The config of a local directory or Hub id; a one-line ``ModelNotFoundError`` otherwise."""
    model_id = resolve_model_id(model_id)
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{model_id} has no config.json: not a saved Hugging Face model")
        return AutoConfig.from_pretrained(str(path), **kwargs)
    if _looks_like_path(model_id):
        raise ModelNotFoundError(f"no such model directory: {model_id}")
    try:
        return AutoConfig.from_pretrained(model_id, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if hub_offline():
        raise ModelNotFoundError(
            f"{model_id!r} is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    if not hub_reachable():
        raise ModelNotFoundError(
            f"{model_id!r} is not a local directory or cached, and the Hugging Face Hub cannot be reached"
        )
    try:
        return AutoConfig.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load {model_id!r} from the Hub: {str(error).splitlines()[0]}") from error


def model_class_for(config) -> type[PreTrainedModel]:
    """The concrete class named by ``config.architectures`` (e.g. ``Wav2Vec2ConformerForCTC``)."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
        for adapter in ADAPTERS:
            for converted in adapter.converted_classes():
                if converted.__name__ == name:
                    return converted
    return transformers.AutoModel._model_mapping[type(config)]


def load_pretrained(model_id: str, config=None, **kwargs) -> PreTrainedModel:
    """Load a model for conversion, keeping the checkpoint's dtype."""
    model_id = resolve_model_id(model_id)
    config = config or load_config(model_id)
    cls = model_class_for(config)
    local = Path(model_id).expanduser().exists()
    source = str(Path(model_id).expanduser()) if local else model_id
    try:
        return cls.from_pretrained(source, config=config, dtype="auto", **kwargs)
    except OSError as error:
        raise ModelNotFoundError(f"cannot load the weights of {model_id!r}: {str(error).splitlines()[0]}") from error
