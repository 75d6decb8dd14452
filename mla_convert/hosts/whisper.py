"""Host adapter for ``transformers`` Whisper: decoder self-attention (default), cross-attention
and encoder self-attention, chosen with ``targets`` (like PEFT's ``target_modules``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..modeling import modeling_converted_whisper as modeling
from ..modeling.attention_base import LayerSpec
from ..modeling.configuration_converted_whisper import ConvertedWhisperConfig
from .base import AttentionSite, AttentionWeights, HostAdapter, SiteInputs, linear_bias


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

    def site_path(self, role: str, index: int) -> str:
        return modeling.ROLES[role].format(index)

    def sites(self, model: nn.Module, roles: tuple[str, ...]) -> list[AttentionSite]:
        base = self.base_model(model)
        found = []
        for role in roles:
            for index in range(self.layer_count(model.config, role)):
                path = self.site_path(role, index)
                module = base.get_submodule(path)
                if isinstance(module, WhisperAttention) and not isinstance(module, modeling.ConvertedWhisperAttention):
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

    def build_module(self, config, layer_spec: LayerSpec, site: AttentionSite) -> nn.Module:
        return modeling.ConvertedWhisperAttention(config, layer_spec, site.path)

    def measurement_batches(self, model: nn.Module, sites: list[AttentionSite], batches: list[dict]) -> list[dict]:
        """Decoder-side sites cannot change the encoder output: compute it once per batch."""
        if any(site.role == "encoder" for site in sites) or not hasattr(model, "get_encoder"):
            return list(batches)
        encoder = model.get_encoder()
        prepared = []
        for batch in batches:
            batch = dict(batch)
            features = batch.pop("input_features")
            batch["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder(features).last_hidden_state)
            prepared.append(batch)
        return prepared

    def site_inputs(self, site: AttentionSite, args: tuple, kwargs: dict) -> SiteInputs:
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        key_value_states = kwargs.get("key_value_states")
        return SiteInputs(hidden_states, hidden_states if key_value_states is None else key_value_states)

    def calibration_inputs(self, model: nn.Module, processor, rows: list[dict], use_text: bool) -> Iterator[dict]:
        """One teacher-forced forward per utterance: the prompt plus either the model's own greedy
        transcript (label-free) or the reference text, so the decoder sees the token sequences it
        will really decode."""
        config = model.generation_config
        prompt = [config.decoder_start_token_id]
        if getattr(config, "no_timestamps_token_id", None) is not None:
            prompt.append(config.no_timestamps_token_id)
        for row in rows:
            features = processor.feature_extractor(row["audio"], sampling_rate=16000, return_tensors="pt")
            features = features.input_features.to(model.device, model.dtype)
            if use_text:
                text = " " + row["text"].strip().lower().capitalize()
                tokens = processor.tokenizer(text, add_special_tokens=False).input_ids
            else:
                with torch.inference_mode():
                    generated = model.generate(features, num_beams=1, do_sample=False)
                tokens = [t for t in generated[0].tolist() if t not in prompt]
            ids = prompt + tokens
            if config.eos_token_id is not None and ids[-1] != config.eos_token_id:
                ids.append(config.eos_token_id)
            ids = ids[: model.config.max_target_positions]
            yield {"input_features": features, "decoder_input_ids": torch.tensor([ids], device=model.device)}
