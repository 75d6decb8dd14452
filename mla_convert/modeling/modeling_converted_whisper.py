"""Whisper with converted attention (MLA / GQA / linear), loadable as remote code.

The replacement module speaks ``WhisperAttention``'s calling convention, including its
``EncoderDecoderCache``. What goes into the cache is the variant's per-token *state*: for MLA the
latent (``d_c`` numbers per token and layer, stored as the cache's "keys" with an empty "values"
tensor), for GQA the ``kv_heads`` key/value heads. So the memory ``generate()`` holds really shrinks;
keys and values are rebuilt from the state at each step. Causal linear attention keeps no per-token state
at all: its cache layer holds the running sums of the recurrent form.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration, WhisperModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import WhisperAttention

from .attention_base import AttentionGeometry, ConvertedAttention, LayerSpec
from .attention_build import build_attention
from .attention_linear import LinearAttention, running_summary_layer
from .configuration_converted_whisper import ConvertedWhisperConfig

ROLES = {
    "encoder": "encoder.layers.{}.self_attn",
    "decoder": "decoder.layers.{}.self_attn",
    "cross": "decoder.layers.{}.encoder_attn",
}


def role_of(path: str) -> str:
    if path.startswith("encoder."):
        return "encoder"
    return "cross" if path.endswith("encoder_attn") else "decoder"


def whisper_geometry(config, role: str) -> AttentionGeometry:
    """Whisper's k_proj has no bias, and it scales the query before the dot product."""
    heads = config.encoder_attention_heads if role == "encoder" else config.decoder_attention_heads
    return AttentionGeometry(hidden_size=config.d_model, num_heads=heads, k_bias=False, scale_query=True)


def pack_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer holds (keys, values); a one-tensor state (MLA latent) gets empty values."""
    return (state[0], state[0][..., :0]) if len(state) == 1 else (state[0], state[1])


def unpack_state(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (keys,) if values.shape[-1] == 0 else (keys, values)


class ConvertedWhisperAttention(WhisperAttention):
    """Drop-in for ``WhisperAttention``: cache plumbing here, attention math in the variant.

    It subclasses ``WhisperAttention`` (without its projections) so that everything transformers
    finds by class keeps finding it: ``output_attentions`` recording, attention-implementation
    checks. The cache arrives as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (earlier
    releases); both are accepted.
    """

    def __init__(self, config, layer_spec: LayerSpec | dict, path: str) -> None:
        nn.Module.__init__(self)
        self.config = config
        role = role_of(path)
        geometry = whisper_geometry(config, role)
        self.layer_idx = int(path.split(".")[2])
        self.is_cross_attention = role == "cross"
        self.embed_dim, self.num_heads, self.head_dim = geometry.hidden_size, geometry.num_heads, geometry.head_dim
        self.is_decoder, self.is_causal = role != "encoder", role == "decoder"
        self.attention: ConvertedAttention = build_attention(
            layer_spec,
            geometry,
            "none",
            config,
            is_causal=role == "decoder",
            dropout=config.attention_dropout,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        reuse = False
        if isinstance(self.attention, LinearAttention) and self.attention.is_causal and cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            summary = running_summary_layer(cache, self.layer_idx)  # O(1) state, not per-token K/V
            return self.attention(
                hidden_states,
                attention_mask=attention_mask,
                running_summary=summary,
                output_attentions=output_attentions,
                **kwargs,
            )
        if isinstance(cache, EncoderDecoderCache):
            if key_value_states is not None:
                reuse = bool(cache.is_updated.get(self.layer_idx))
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        state, state_update = None, None
        if cache is not None and reuse:
            layer = cache.layers[self.layer_idx]
            state = unpack_state(layer.keys, layer.values)
        elif cache is not None:

            def state_update(new_state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                return unpack_state(*cache.update(*pack_state(new_state), self.layer_idx))

        return self.attention(
            hidden_states,
            attention_mask=attention_mask,
            key_value_states=key_value_states,
            state=state,
            state_update=state_update,
            output_attentions=output_attentions,
            **kwargs,
        )


def apply_attention_conversion(base_model: nn.Module, config) -> None:
    conversion = getattr(config, "attention_conversion", None) or {}
    for path, layer_spec in conversion.get("layers", {}).items():
        parent_path, _, name = path.rpartition(".")
        setattr(base_model.get_submodule(parent_path), name, ConvertedWhisperAttention(config, layer_spec, path))


class _ConvertedAttentionMixin:
    config_class = ConvertedWhisperConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        apply_attention_conversion(self.base_model, config)


class ConvertedWhisperModel(_ConvertedAttentionMixin, WhisperModel):
    pass


class ConvertedWhisperForConditionalGeneration(_ConvertedAttentionMixin, WhisperForConditionalGeneration):
    pass


CONVERTED_CLASSES = {
    WhisperModel: (ConvertedWhisperModel, "AutoModel"),
    WhisperForConditionalGeneration: (ConvertedWhisperForConditionalGeneration, "AutoModelForSpeechSeq2Seq"),
}

for _converted, _auto_class in CONVERTED_CLASSES.values():
    _converted.register_for_auto_class(_auto_class)
