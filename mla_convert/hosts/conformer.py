"""Host adapter for mla_convert's own Conformer CTC model (``mla_conformer``).

The model builds its attention from its config, so a trained multi-head Conformer is converted
like any host: each ``MultiHeadAttention`` is replaced by the variant the spec asks for, and the
config records the new layers in ``attention_conversion`` (the model class stays the same: it
reads that entry when it is built). Branchformer subclasses this with another attention name.
"""

from __future__ import annotations

from collections.abc import Iterator

import transformers
from torch import nn

from ..modeling import modeling_conformer as modeling
from ..modeling.attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from ..modeling.attention_build import build_attention
from ..modeling.configuration_conformer import ConformerConfig, attention_layer_dict, normalize_attention
from ..modeling.feature_extraction_conformer import ConformerFeatureExtractor
from ..modeling.modeling_speech_encoder import attention_geometry
from .base import AttentionSite, AttentionWeights, HostAdapter, SiteInputs, linear_bias


class ConformerAdapter(HostAdapter):
    name = "conformer"
    roles = ("encoder",)
    default_roles = ("encoder",)
    converted_config = ConformerConfig
    modeling = modeling
    attention_name = "self_attn"
    model_classes: tuple[type, ...] = (modeling.ConformerModel, modeling.ConformerForCTC)

    def matches(self, config) -> bool:
        # by model_type: a model loaded from its saved remote code has a config class of its own
        return getattr(config, "model_type", None) == self.converted_config.model_type

    def geometry(self, config, role: str) -> tuple[int, int]:
        return config.hidden_size, config.num_attention_heads

    def attention_geometry(self, config, role: str) -> AttentionGeometry:
        """The geometry of ``role``'s attention (ESPnet: biases on q/k/v/out)."""
        return attention_geometry(config)

    def position_mode(self, config, role: str) -> str:
        return config.position_mode

    def layer_count(self, config, role: str) -> int:
        return config.num_hidden_layers

    def site_path(self, role: str, index: int) -> str:
        return f"layers.{index}.{self.attention_name}"

    chooses_attention = True

    def layer_attention(self, config, path: str) -> dict | None:
        converted = super().layer_attention(config, path)
        trained = normalize_attention(config.attention, *self.geometry(config, "encoder"))
        return converted or attention_layer_dict(trained)

    def sites(self, model: nn.Module, roles: tuple[str, ...]) -> list[AttentionSite]:
        base = self.base_model(model)
        found = []
        for role in roles:
            for index in range(self.layer_count(model.config, role)):
                path = self.site_path(role, index)
                module = base.get_submodule(path)
                if getattr(module, "variant", None) == "mha":  # converted (or trained-as-MLA) layers are left alone
                    found.append(AttentionSite(path, module, index, role))
        return found

    def read_weights(self, site: AttentionSite, config) -> AttentionWeights:
        module = site.module
        relative = module.position_mode == "relative"
        return AttentionWeights(
            geometry=self.attention_geometry(config, site.role),
            position_mode=self.position_mode(config, site.role),
            q_weight=module.q_proj.weight.detach(),
            q_bias=linear_bias(module.q_proj),
            k_weight=module.k_proj.weight.detach(),
            k_bias=linear_bias(module.k_proj),
            v_weight=module.v_proj.weight.detach(),
            v_bias=linear_bias(module.v_proj),
            o_weight=module.out_proj.weight.detach(),
            o_bias=linear_bias(module.out_proj),
            pos_weight=module.pos_proj.weight.detach() if relative else None,
            pos_bias_u=module.pos_bias_u.detach() if relative else None,
            pos_bias_v=module.pos_bias_v.detach() if relative else None,
        )

    def build_module(self, config, layer_spec: LayerSpec, site: AttentionSite) -> nn.Module:
        return build_attention(
            layer_spec,
            self.attention_geometry(config, site.role),
            self.position_mode(config, site.role),
            config,
            dropout=config.attention_dropout,
        )

    def attention_of(self, replacement: nn.Module) -> ConvertedAttention:
        return replacement  # the layer holds the variant module itself

    def site_inputs(self, site: AttentionSite, args: tuple, kwargs: dict) -> SiteInputs:
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        key_value_states = kwargs.get("key_value_states")  # cross-attention (the Paraformer's decoder)
        key_value = hidden_states if key_value_states is None else key_value_states
        return SiteInputs(hidden_states, key_value, kwargs.get("position_embeddings"))

    def calibration_inputs(self, model: nn.Module, processor, rows: list[dict], use_text: bool) -> Iterator[dict]:
        extractor = getattr(processor, "feature_extractor", processor)
        for row in rows:
            features = extractor(row["audio"], sampling_rate=extractor.sampling_rate, return_tensors="pt")
            yield {"input_features": features.input_features.to(model.device, model.dtype)}

    def is_converted(self, model: nn.Module) -> bool:
        return bool(getattr(model.config, "attention_conversion", None))

    def converted_classes(self) -> list[type]:
        return list(self.model_classes)

    def mark_converted(self, model: nn.Module, attention_conversion: dict) -> None:
        """Record the replaced layers; the class already builds them from ``attention_conversion``
        (and keeps its ``auto_map``, so the saved remote code is the same)."""
        model.config.attention_conversion = attention_conversion

    def register_auto_classes(self) -> None:
        config_class = self.converted_config
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        base, ctc = self.model_classes
        transformers.AutoModel.register(config_class, base, exist_ok=True)
        transformers.AutoModelForCTC.register(config_class, ctc, exist_ok=True)
        transformers.AutoFeatureExtractor.register(config_class, ConformerFeatureExtractor, exist_ok=True)
