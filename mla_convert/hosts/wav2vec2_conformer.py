"""Host adapter for ``transformers`` wav2vec2-conformer (``facebook/wav2vec2-conformer-*``)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import Wav2Vec2ConformerConfig
from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import Wav2Vec2ConformerSelfAttention

from ..modeling import modeling_converted_wav2vec2_conformer as modeling
from ..modeling.attention_base import LayerSpec
from ..modeling.configuration_converted_wav2vec2_conformer import ConvertedWav2Vec2ConformerConfig
from .base import AttentionSite, AttentionWeights, HostAdapter, SiteInputs, linear_bias


class Wav2Vec2ConformerAdapter(HostAdapter):
    name = "wav2vec2_conformer"
    roles = ("encoder",)
    default_roles = ("encoder",)
    converted_config = ConvertedWav2Vec2ConformerConfig
    modeling = modeling

    def matches(self, config) -> bool:
        return isinstance(config, Wav2Vec2ConformerConfig)

    def geometry(self, config, role: str) -> tuple[int, int]:
        return config.hidden_size, config.num_attention_heads

    def layer_count(self, config, role: str) -> int:
        return config.num_hidden_layers

    def site_path(self, role: str, index: int) -> str:
        return f"encoder.layers.{index}.self_attn"

    def sites(self, model: nn.Module, roles: tuple[str, ...]) -> list[AttentionSite]:
        layers = self.base_model(model).encoder.layers
        return [
            AttentionSite(self.site_path("encoder", index), layer.self_attn, index, "encoder")
            for index, layer in enumerate(layers)
            if isinstance(layer.self_attn, Wav2Vec2ConformerSelfAttention)
        ]

    def read_weights(self, site: AttentionSite, config) -> AttentionWeights:
        module = site.module
        relative = getattr(module, "position_embeddings_type", None) == "relative"
        return AttentionWeights(
            geometry=modeling.conformer_geometry(config),
            position_mode=modeling.conformer_position_mode(config),
            q_weight=module.linear_q.weight.detach(),
            q_bias=linear_bias(module.linear_q),
            k_weight=module.linear_k.weight.detach(),
            k_bias=linear_bias(module.linear_k),
            v_weight=module.linear_v.weight.detach(),
            v_bias=linear_bias(module.linear_v),
            o_weight=module.linear_out.weight.detach(),
            o_bias=linear_bias(module.linear_out),
            pos_weight=module.linear_pos.weight.detach() if relative else None,
            pos_bias_u=module.pos_bias_u.detach() if relative else None,
            pos_bias_v=module.pos_bias_v.detach() if relative else None,
        )

    def build_module(self, config, layer_spec: LayerSpec, site: AttentionSite) -> nn.Module:
        return modeling.ConvertedConformerSelfAttention(config, layer_spec)

    def site_inputs(self, site: AttentionSite, args: tuple, kwargs: dict) -> SiteInputs:
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        return SiteInputs(hidden_states, hidden_states, kwargs.get("relative_position_embeddings"))

    def calibration_inputs(self, model: nn.Module, processor, rows: list[dict], use_text: bool) -> Iterator[dict]:
        extractor = getattr(processor, "feature_extractor", processor)
        for row in rows:
            features = extractor(row["audio"], sampling_rate=extractor.sampling_rate, return_tensors="pt")
            yield {"input_values": features.input_values.to(model.device, model.dtype)}
