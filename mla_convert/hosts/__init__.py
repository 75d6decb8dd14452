"""Host adapters: one per architecture whose attention mla_convert can convert."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionSite, AttentionWeights, HostAdapter
from .branchformer import BranchformerAdapter
from .conformer import ConformerAdapter
from .paraformer import ParaformerAdapter
from .wav2vec2_conformer import Wav2Vec2ConformerAdapter
from .whisper import WhisperAdapter

ADAPTERS: list[HostAdapter] = [
    Wav2Vec2ConformerAdapter(),
    WhisperAdapter(),
    ConformerAdapter(),
    BranchformerAdapter(),
    ParaformerAdapter(),
]

for _adapter in ADAPTERS:
    _adapter.register_auto_classes()


def adapter_for(model: nn.Module) -> HostAdapter:
    return adapter_for_config(getattr(model, "config", None))


def adapter_for_config(config) -> HostAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(config):
            return adapter
    model_type = getattr(config, "model_type", type(config).__name__)
    supported = ", ".join(adapter.name for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"no attention this tool can convert in a {model_type!r} model (supported: {supported})"
    )


__all__ = ["ADAPTERS", "AttentionSite", "AttentionWeights", "HostAdapter", "adapter_for", "adapter_for_config"]
