"""Config of mla_convert's Paraformer (FunASR's non-autoregressive ASR model) as an HF config.

Three parts, every choice here:

- the **encoder**: the Conformer model's blocks (all of :class:`ConformerConfig`'s keys:
  ``hidden_size``, ``num_hidden_layers``, ``attention`` ...);
- the **CIF predictor** (continuous integrate-and-fire, FunASR's ``CifPredictorV2``): a
  convolution over ``predictor_l_order + 1 + predictor_r_order`` encoder frames, ReLU, a linear
  layer and a sigmoid give each frame a weight; the weights are summed frame by frame and a token
  fires each time the sum crosses ``predictor_threshold``. ``predictor_tail_threshold`` is added
  after the last frame at inference so that a last token integrated past that share still fires;
  ``predictor_weight`` scales the quantity loss ``|target length - sum of weights|``;
  ``predictor_bias`` = 1 appends ``eos_token_id`` to every target (FunASR's Paraformer-large);
- the **decoder**: ``decoder_layers`` non-autoregressive layers over the fired embeddings, each
  self-attention, cross-attention to the encoder and a feed-forward (``decoder_intermediate_size``),
  with ``decoder_attention_heads`` heads of ``hidden_size``.

Attention: ``attention`` (encoder self-attention), ``decoder_attention`` (decoder self-attention)
and ``cross_attention`` take the variants of the Conformer config (``{"type": "mha"}``,
``{"type": "mla", "latent_dim": 64}``, ``{"type": "gqa", "kv_heads": 2}``, ``{"type": "linear"}``);
converted layers are listed in ``attention_conversion["layers"]`` under their path in the base
model (``encoder.layers.0.self_attn``, ``decoder.layers.0.self_attn``, ``decoder.layers.0.src_attn``).

Training: ``lsm_weight`` label smoothing of the decoder's cross-entropy, ``sampling_ratio`` the
glancing (GLM) sampler's share of wrongly predicted positions given their reference embedding in a
second decoder pass (0 = off), ``ctc_weight`` an optional CTC loss on the encoder (0 = no CTC head).
``pad_token_id`` (0, the tokenizer's ``<blank>``) is what positions past a sequence's tokens decode
to.
"""

from __future__ import annotations

from typing import Any

from .configuration_conformer import (
    ConfigValueError,
    ConformerConfig,
    _positive,
    _rate,
    attention_layer_dict,
    normalize_attention,
)

# where each attention role's layers are, relative to the base model (ParaformerModel)
ROLE_PATHS = {
    "encoder": "encoder.layers.{}.self_attn",
    "decoder": "decoder.layers.{}.self_attn",
    "cross": "decoder.layers.{}.src_attn",
}


def _number(key: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    bad = not isinstance(value, (int, float)) or isinstance(value, bool)
    if bad or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigValueError(f"{key}: must be a number {relation} {minimum}, got {value!r}")


class ParaformerConfig(ConformerConfig):
    """Paraformer: a Conformer encoder, a CIF predictor and a non-autoregressive decoder."""

    model_type = "mla_paraformer"

    def __init__(
        self,
        decoder_layers: int = 2,
        decoder_attention_heads: int = 4,
        decoder_intermediate_size: int = 576,
        decoder_attention: dict | str | None = None,
        cross_attention: dict | str | None = None,
        predictor_threshold: float = 1.0,
        predictor_l_order: int = 1,
        predictor_r_order: int = 1,
        predictor_tail_threshold: float = 0.45,
        predictor_smooth_factor: float = 1.0,
        predictor_noise_threshold: float = 0.0,
        predictor_weight: float = 1.0,
        predictor_bias: int = 0,
        sampling_ratio: float = 0.75,
        lsm_weight: float = 0.1,
        ctc_weight: float = 0.0,
        eos_token_id: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(eos_token_id=eos_token_id, **kwargs)
        for key in ("decoder_layers", "decoder_attention_heads", "decoder_intermediate_size"):
            _positive(key, locals()[key])
        if self.hidden_size % decoder_attention_heads:
            raise ConfigValueError(
                f"decoder_attention_heads: {decoder_attention_heads} heads do not divide the decoder's "
                f"d_model (hidden_size) {self.hidden_size}"
            )
        _number("predictor_threshold", predictor_threshold, strict=True)
        for key in ("predictor_l_order", "predictor_r_order"):
            value = locals()[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigValueError(f"{key}: must be a whole number of frames >= 0, got {value!r}")
        for key in ("predictor_tail_threshold", "predictor_noise_threshold", "predictor_weight", "ctc_weight"):
            _number(key, locals()[key])
        _number("predictor_smooth_factor", predictor_smooth_factor, strict=True)
        _rate("lsm_weight", lsm_weight)
        _number("sampling_ratio", sampling_ratio)
        if sampling_ratio > 1:
            raise ConfigValueError(f"sampling_ratio: a share of the wrong positions, in [0, 1], got {sampling_ratio!r}")
        if predictor_bias not in (0, 1):
            raise ConfigValueError(
                f"predictor_bias: 0 (targets as they are) or 1 (eos appended), got {predictor_bias!r}"
            )
        if predictor_bias and (eos_token_id is None or not 0 <= eos_token_id < self.vocab_size):
            raise ConfigValueError(
                f"eos_token_id: predictor_bias 1 appends eos to every target; it must be a token id below "
                f"vocab_size {self.vocab_size}, got {eos_token_id!r}"
            )
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.decoder_attention = self._role_attention("decoder_attention", decoder_attention)
        self.cross_attention = self._role_attention("cross_attention", cross_attention)
        self.predictor_threshold = float(predictor_threshold)
        self.predictor_l_order = predictor_l_order
        self.predictor_r_order = predictor_r_order
        self.predictor_tail_threshold = float(predictor_tail_threshold)
        self.predictor_smooth_factor = float(predictor_smooth_factor)
        self.predictor_noise_threshold = float(predictor_noise_threshold)
        self.predictor_weight = float(predictor_weight)
        self.predictor_bias = predictor_bias
        self.sampling_ratio = float(sampling_ratio)
        self.lsm_weight = float(lsm_weight)
        self.ctc_weight = float(ctc_weight)
        self.is_encoder_decoder = True

    def _role_attention(self, key: str, attention: dict | str | None) -> dict:
        try:
            return normalize_attention(attention, self.hidden_size, self.decoder_attention_heads)
        except ConfigValueError as error:
            raise ConfigValueError(f"{key}.{str(error).removeprefix('attention.')}") from None

    def role_attention(self, role: str) -> dict:
        """The trained attention choice of ``role`` (``encoder``, ``decoder`` or ``cross``)."""
        return {"encoder": self.attention, "decoder": self.decoder_attention, "cross": self.cross_attention}[role]

    def role_of(self, path: str) -> str:
        """The role of the attention at ``path`` (a path in the base model, or, as the shared
        encoder blocks ask, relative to the encoder)."""
        path = self.full_path(path)
        for role, template in ROLE_PATHS.items():
            prefix, suffix = template.split("{}")
            if path.startswith(prefix) and path.endswith(suffix):
                return role
        raise ValueError(f"{path!r} is not an attention path of a Paraformer")

    @staticmethod
    def full_path(path: str) -> str:
        return path if path.startswith(("encoder.", "decoder.")) else f"encoder.{path}"

    def layer_attention(self, path: str) -> dict:
        """The layer dict of the attention at ``path``: its converted entry, else its role's choice."""
        path = self.full_path(path)
        layers = (self.attention_conversion or {}).get("layers", {})
        return layers.get(path) or attention_layer_dict(self.role_attention(self.role_of(path)))

    @property
    def streaming(self) -> bool:
        return False  # a Paraformer decodes whole utterances


ParaformerConfig.register_for_auto_class()
