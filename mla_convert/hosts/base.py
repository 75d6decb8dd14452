"""What a host adapter tells the converter about one architecture."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType

import torch
import transformers
from torch import nn

from ..errors import UnsupportedModelError
from ..modeling.attention_base import AttentionGeometry, ConvertedAttention, LayerSpec


@dataclass
class AttentionWeights:
    """The trained tensors of one multi-head attention, in ``nn.Linear`` layout ``[out, in]``."""

    geometry: AttentionGeometry
    position_mode: str
    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    pos_weight: torch.Tensor | None = None
    pos_bias_u: torch.Tensor | None = None
    pos_bias_v: torch.Tensor | None = None


@dataclass
class AttentionSite:
    """One attention module to convert; ``path`` is relative to the host's base model."""

    path: str
    module: nn.Module
    layer_index: int
    role: str


@dataclass
class SiteInputs:
    """What one attention call saw: the query-side input, the key/value-side input (they differ for
    cross-attention) and the position embeddings (``None`` when the host has none)."""

    query: torch.Tensor
    key_value: torch.Tensor
    positions: torch.Tensor | None = None


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def retarget_config(model: nn.Module, config_class: type):
    """Give ``model`` (and every submodule that shares its config) a copy of the config as
    ``config_class``: the caller's config object may be shared with other models, so it is not
    mutated."""
    old = model.config
    new = copy.deepcopy(old)
    new.__class__ = config_class
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    return new


class HostAdapter(ABC):
    """One small class per architecture: where its attention is, and how it is saved.

    ``modeling`` is the host's file in ``mla_convert/modeling`` (the remote code); its
    ``CONVERTED_CLASSES`` maps each stock class to ``(converted class, auto class name)``.
    """

    name: str
    roles: tuple[str, ...]
    default_roles: tuple[str, ...]
    converted_config: type
    modeling: ModuleType

    @abstractmethod
    def matches(self, config) -> bool:
        """Whether this adapter handles models with this config (checked before loading weights)."""

    @abstractmethod
    def geometry(self, config, role: str) -> tuple[int, int]:
        """``(hidden_size, num_heads)`` of the attention, to validate a spec before loading weights."""

    @abstractmethod
    def layer_count(self, config, role: str) -> int:
        """How many attention layers of ``role`` a model with this config has."""

    @abstractmethod
    def site_path(self, role: str, index: int) -> str:
        """Where attention layer ``index`` of ``role`` is, relative to the base model."""

    def attention_layout(self, config) -> dict[str, tuple[str, AttentionGeometry]]:
        """Every attention module a model with this config has, converted or not:
        ``path -> (role, geometry)`` (read off the config alone, for K/V-state accounting)."""
        layout = {}
        for role in self.roles:
            hidden, heads = self.geometry(config, role)
            for index in range(self.layer_count(config, role)):
                layout[self.site_path(role, index)] = (role, AttentionGeometry(int(hidden), int(heads)))
        return layout

    # whether the config itself chooses each layer's attention (mla_convert's own model families),
    # so that even an unconverted model has a K/V-state size worth reporting
    chooses_attention: bool = False

    def layer_attention(self, config, path: str) -> dict | None:
        """The stored layer dict of the attention at ``path``; ``None`` for multi-head attention."""
        return ((getattr(config, "attention_conversion", None) or {}).get("layers") or {}).get(path)

    @abstractmethod
    def sites(self, model: nn.Module, roles: tuple[str, ...]) -> list[AttentionSite]:
        """The original (not yet converted) attention modules of the given roles."""

    @abstractmethod
    def read_weights(self, site: AttentionSite, config) -> AttentionWeights: ...

    @abstractmethod
    def build_module(self, config, layer_spec: LayerSpec, site: AttentionSite) -> nn.Module:
        """The module that replaces ``site.module`` (it owns a ``ConvertedAttention``)."""

    @abstractmethod
    def site_inputs(self, site: AttentionSite, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kv_input, position_embeddings)`` from a forward call of ``site.module``."""

    def measurement_batches(self, model: nn.Module, sites: list[AttentionSite], batches: list[dict]) -> list[dict]:
        """The batches to measure attention swaps at ``sites`` on; a host may precompute whatever
        those sites cannot change (so repeated measurements only rerun what they can)."""
        return list(batches)

    def attention_of(self, replacement: nn.Module) -> ConvertedAttention:
        return replacement.attention

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def is_converted(self, model: nn.Module) -> bool:
        return isinstance(model.config, self.converted_config)

    def converted_classes(self) -> list[type]:
        return [converted for converted, _ in self.modeling.CONVERTED_CLASSES.values()]

    def mark_converted(self, model: nn.Module, attention_conversion: dict) -> None:
        """Turn the model and its config into the converted classes (in place), with an
        ``auto_map`` so that ``save_pretrained`` writes the remote code next to the weights."""
        classes = self.modeling.CONVERTED_CLASSES
        if type(model) not in classes:
            supported = ", ".join(cls.__name__ for cls in classes)
            raise UnsupportedModelError(f"{type(model).__name__} has no converted counterpart; supported: {supported}")
        converted_class, auto_class = classes[type(model)]
        config = retarget_config(model, self.converted_config)
        config.attention_conversion = attention_conversion
        config.architectures = [converted_class.__name__]
        config_file = self.converted_config.__module__.rsplit(".", 1)[-1]
        model_file = self.modeling.__name__.rsplit(".", 1)[-1]
        config.auto_map = {"AutoConfig": f"{config_file}.{self.converted_config.__name__}"}
        for converted, auto in classes.values():
            if converted is converted_class or auto == "AutoModel":
                config.auto_map[auto] = f"{model_file}.{converted.__name__}"
        model.__class__ = converted_class

    def register_auto_classes(self) -> None:
        """Let ``AutoModel*.from_pretrained`` find converted models when mla_convert is imported.

        A converted config that keeps its host's ``model_type`` (Whisper: pipelines dispatch on it)
        must not take that name over for every model of the host: it is found through ``auto_map``
        (``trust_remote_code=True``) or :func:`mla_convert.load` instead.
        """
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if self.converted_config.model_type not in CONFIG_MAPPING_NAMES:
            transformers.AutoConfig.register(self.converted_config.model_type, self.converted_config, exist_ok=True)
        for converted, auto in self.modeling.CONVERTED_CLASSES.values():
            getattr(transformers, auto).register(self.converted_config, converted, exist_ok=True)
