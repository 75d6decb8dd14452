"""Host adapter for ``transformers`` Whisper: decoder self-attention (default), cross-attention
and encoder self-attention, chosen with ``targets`` (like PEFT's ``target_modules``)."""

from __future__ import annotations

from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..modeling import modeling_converted_whisper as modeling
from ..modeling.configuration_converted_whisper import ConvertedWhisperConfig
from .base import AttentionSite, AttentionWeights, HostAdapter, linear_bias


class WhisperAdapter(HostAdapter):
    name = "whisper"
    roles = ("decoder", "cross", "encoder")
    default_roles = ("decoder",)
    converted_config = ConvertedWhisperConfig
    modeling = modeling

    def matches(self, config) -> bool:
        return isinstance(config, WhisperConfig)

    def geometry(self, config, role: str) -> tuple[int, int]:
        return config.d_model, modeling.whisper_geometry(config, role).num_heads

    def layer_count(self, config, role: str) -> int:
        return config.encoder_layers if role == "encoder" else config.decoder_layers

    def sites(self, model: nn.Module, roles: tuple[str, ...]) -> list[AttentionSite]:
        base = self.base_model(model)
        found = []
        for role in roles:
            template = modeling.ROLES[role]
            for index in range(self.layer_count(model.config, role)):
                path = template.format(index)
                module = base.get_submodule(path)
                if isinstance(module, WhisperAttention):
                    found.append(AttentionSite(path, module, index, role))
        return found

    def read_weights(self, site: AttentionSite, config) -> AttentionWeights:
        module = site.module
        return AttentionWeights(
            geometry=modeling.whisper_geometry(config, site.role),
            position_mode="none",
            q_weight=module.q_proj.weight.detach(),
            q_bias=linear_bias(module.q_proj),
            k_weight=module.k_proj.weight.detach(),
            k_bias=linear_bias(module.k_proj),
            v_weight=module.v_proj.weight.detach(),
            v_bias=linear_bias(module.v_proj),
            o_weight=module.out_proj.weight.detach(),
            o_bias=linear_bias(module.out_proj),
        )

    def build_module(self, config, layer_spec: dict, site: AttentionSite) -> nn.Module:
        return modeling.ConvertedWhisperAttention(config, layer_spec, site.path)

    def site_inputs(self, site: AttentionSite, args: tuple, kwargs: dict):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        key_value_states = kwargs.get("key_value_states")
        return (hidden_states if key_value_states is None else key_value_states), None
