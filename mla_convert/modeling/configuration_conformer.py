"""Config of mla_convert's Conformer CTC model (ESPnet2 ``ConformerEncoder`` + CTC head).

The attention of every layer is chosen by ``attention``, the same variants the conversion core
builds (``{"type": "mha"}``, ``{"type": "mla", "latent_dim": 128}``, ``{"type": "gqa",
"kv_heads": 2}``, ``{"type": "linear", "feature_map": "elu"}``). A model converted after training
keeps ``attention`` as it was trained and lists the replaced layers in ``attention_conversion``
(``layers``: module path -> layer dict), like every converted host.

Streaming (``chunk_size`` > 0 and ``causal_conv``): every layer's attention sees its own chunk
of ``chunk_size`` encoder frames and ``num_left_chunks`` chunks before it (-1: all), and the
depthwise convolutions see only the past, as WeNet's U2; ``dynamic_chunk_training`` samples the
chunk size per batch in training (1 .. ``max_dynamic_chunk_size``, or full context). Chunk by chunk
inference (``model.stream``) then equals the chunk-masked forward.

Every choice is checked when the config is built, with a message that names the key.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ATTENTION_TYPES = ("mha", "mla", "gqa", "linear")
# the fields each attention type accepts (besides "type"), with their defaults
ATTENTION_FIELDS: dict[str, dict[str, Any]] = {
    "mha": {},
    "mla": {"latent_dim": None, "latent_layout": "joint"},
    "gqa": {"kv_heads": None},
    "linear": {"feature_map": "elu"},
}
LATENT_LAYOUTS = ("joint", "split")
FEATURE_MAPS = ("elu", "relu", "hedgehog")
POSITION_EMBEDDINGS = ("rel_pos", "rotary", "abs_pos")
SUBSAMPLING_FACTORS = {"conv2d": 4, "conv2d6": 6, "conv2d8": 8}
ACTIVATIONS = ("swish", "relu", "gelu")


class ConfigValueError(ValueError):
    """A config value that cannot build a model; the message starts with the key it is about."""


def normalize_attention(attention: dict | str | None, hidden_size: int, num_heads: int) -> dict:
    """The attention choice as a complete, checked dict (``{"type": ..., field: value}``)."""
    if attention is None or attention == "mha":
        attention = {"type": "mha"}
    if isinstance(attention, str):
        attention = {"type": attention}
    if not isinstance(attention, dict):
        raise ConfigValueError(f"attention: expected a mapping with a 'type', got {attention!r}")
    kind = attention.get("type")
    if kind not in ATTENTION_TYPES:
        known = ", ".join(ATTENTION_TYPES)
        raise ConfigValueError(f"attention.type: unknown attention type {kind!r}; choose one of {known}")
    allowed = ATTENTION_FIELDS[kind]
    unknown = sorted(set(attention) - {"type"} - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "no other keys"
        raise ConfigValueError(f"attention.{unknown[0]}: not a {kind} attention setting (it takes {known})")
    result: dict[str, Any] = {"type": kind, **allowed}
    result.update({key: value for key, value in attention.items() if key in allowed})
    head_dim = hidden_size // num_heads
    if kind == "mla":
        latent = result["latent_dim"]
        if result["latent_layout"] not in LATENT_LAYOUTS:
            raise ConfigValueError(
                f"attention.latent_layout: unknown layout {result['latent_layout']!r}; "
                f"choose one of {', '.join(LATENT_LAYOUTS)}"
            )
        limit = hidden_size if result["latent_layout"] == "joint" else 2 * hidden_size
        if not isinstance(latent, int) or isinstance(latent, bool) or not 0 < latent <= limit:
            raise ConfigValueError(
                f"attention.latent_dim: must be an integer in 1..{limit} (the lossless size of a "
                f"{result['latent_layout']} latent for hidden_size {hidden_size}), got {latent!r}"
            )
        if result["latent_layout"] == "split" and latent % 2:
            raise ConfigValueError(f"attention.latent_dim: a split latent needs an even size, got {latent}")
    if kind == "gqa":
        heads = result["kv_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or num_heads % heads:
            raise ConfigValueError(f"attention.kv_heads: must divide num_attention_heads={num_heads}, got {heads!r}")
    if kind == "linear" and result["feature_map"] not in FEATURE_MAPS:
        raise ConfigValueError(
            f"attention.feature_map: unknown feature map {result['feature_map']!r}; "
            f"choose one of {', '.join(FEATURE_MAPS)}"
        )
    if head_dim * num_heads != hidden_size:
        raise ConfigValueError(f"num_attention_heads: {num_heads} heads do not divide hidden_size {hidden_size}")
    return result


def attention_layer_dict(attention: dict) -> dict:
    """The per-layer dict ``build_attention`` takes (``{"attention": "mla", "latent_dim": 128, ...}``)."""
    fields = {key: value for key, value in attention.items() if key != "type"}
    return {"attention": attention["type"], **fields}


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigValueError(f"{key}: unknown value {value!r}; choose one of {', '.join(map(str, choices))}")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigValueError(f"{key}: must be a positive integer, got {value!r}")


def _rate(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigValueError(f"{key}: must be a probability in [0, 1), got {value!r}")


class SpeechEncoderCTCConfig(PretrainedConfig):
    """What Conformer and Branchformer share: the front end, subsampling, positions, attention,
    SpecAugment and the CTC head. ``pad_token_id`` is the CTC blank."""

    def __init__(
        self,
        vocab_size: int = 32,
        input_dim: int = 80,
        hidden_size: int = 144,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        attention: dict | str | None = None,
        position_embedding: str = "rel_pos",
        rotary_embedding_base: float = 10000.0,
        subsampling: str = "conv2d",
        dropout: float = 0.1,
        positional_dropout: float = 0.1,
        attention_dropout: float = 0.0,
        final_dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        specaugment: bool = True,
        freq_mask_count: int = 2,
        freq_mask_width: int = 27,
        time_mask_count: int = 2,
        time_mask_ratio: float = 0.05,
        ctc_loss_reduction: str = "mean",
        ctc_zero_infinity: bool = True,
        pad_token_id: int = 0,
        attention_conversion: dict | None = None,
        chunk_size: int = 0,
        num_left_chunks: int = -1,
        causal_conv: bool = False,
        dynamic_chunk_training: bool = False,
        max_dynamic_chunk_size: int = 25,
        **kwargs,
    ) -> None:
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
            raise ConfigValueError(
                f"chunk_size: must be a whole number of encoder frames >= 0 (0 = full context), got {chunk_size!r}"
            )
        if not isinstance(num_left_chunks, int) or isinstance(num_left_chunks, bool) or num_left_chunks < -1:
            raise ConfigValueError(f"num_left_chunks: must be -1 (all) or a count >= 0, got {num_left_chunks!r}")
        _positive("max_dynamic_chunk_size", max_dynamic_chunk_size)
        for key in ("vocab_size", "input_dim", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _positive(key, locals()[key])
        for key in ("dropout", "positional_dropout", "attention_dropout", "final_dropout"):
            _rate(key, locals()[key])
        _choice("position_embedding", position_embedding, POSITION_EMBEDDINGS)
        _choice("subsampling", subsampling, SUBSAMPLING_FACTORS)
        _choice("ctc_loss_reduction", ctc_loss_reduction, ("mean", "sum"))
        if hidden_size % num_attention_heads:
            raise ConfigValueError(
                f"num_attention_heads: {num_attention_heads} heads do not divide hidden_size {hidden_size}"
            )
        if position_embedding == "rotary" and (hidden_size // num_attention_heads) % 2:
            raise ConfigValueError(
                f"position_embedding: rotary needs an even head size, got {hidden_size // num_attention_heads} "
                f"(hidden_size {hidden_size} / {num_attention_heads} heads)"
            )
        if not 0 <= pad_token_id < vocab_size:
            raise ConfigValueError(f"pad_token_id: the CTC blank must be a token id below vocab_size {vocab_size}")
        self.vocab_size = vocab_size
        self.input_dim = input_dim
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.attention = normalize_attention(attention, hidden_size, num_attention_heads)
        self.position_embedding = position_embedding
        self.rotary_embedding_base = rotary_embedding_base
        self.subsampling = subsampling
        self.dropout = dropout
        self.positional_dropout = positional_dropout
        self.attention_dropout = attention_dropout
        self.final_dropout = final_dropout
        self.layer_norm_eps = layer_norm_eps
        self.specaugment = specaugment
        self.freq_mask_count = freq_mask_count
        self.freq_mask_width = freq_mask_width
        self.time_mask_count = time_mask_count
        self.time_mask_ratio = time_mask_ratio
        self.ctc_loss_reduction = ctc_loss_reduction
        self.ctc_zero_infinity = ctc_zero_infinity
        self.attention_conversion = attention_conversion
        self.chunk_size = chunk_size
        self.num_left_chunks = num_left_chunks
        self.causal_conv = bool(causal_conv)
        self.dynamic_chunk_training = bool(dynamic_chunk_training)
        self.max_dynamic_chunk_size = max_dynamic_chunk_size

    @property
    def subsampling_factor(self) -> int:
        return SUBSAMPLING_FACTORS[self.subsampling]

    @property
    def position_mode(self) -> str:
        """How the attention modules take positions (see ``attention_positions``)."""
        return {"rel_pos": "relative", "rotary": "rotary", "abs_pos": "none"}[self.position_embedding]

    @property
    def streaming(self) -> bool:
        """Trained for chunk-by-chunk inference: chunk-masked attention and causal convolutions."""
        return self.causal_conv and (self.chunk_size > 0 or self.dynamic_chunk_training)

    def layer_attention(self, path: str) -> dict:
        """The layer dict of the attention at ``path`` (relative to the base model): its entry in
        ``attention_conversion["layers"]`` once converted, else the trained ``attention``."""
        layers = (self.attention_conversion or {}).get("layers", {})
        return layers.get(path) or attention_layer_dict(self.attention)


class ConformerConfig(SpeechEncoderCTCConfig):
    """ESPnet2 ``ConformerEncoder`` (``rel_pos_type: latest``) + CTC, as an HF config.

    ``intermediate_size`` is ESPnet's ``linear_units``; ``conv_kernel_size`` its
    ``cnn_module_kernel``; ``macaron_style`` adds the first half-step feed-forward.
    """

    model_type = "mla_conformer"

    def __init__(
        self,
        intermediate_size: int = 576,
        conv_kernel_size: int = 15,
        macaron_style: bool = True,
        use_cnn_module: bool = True,
        hidden_act: str = "swish",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _positive("intermediate_size", intermediate_size)
        _positive("conv_kernel_size", conv_kernel_size)
        if conv_kernel_size % 2 == 0:
            raise ConfigValueError(
                f"conv_kernel_size: must be odd (same-length depthwise convolution), got {conv_kernel_size}"
            )
        _choice("hidden_act", hidden_act, ACTIVATIONS)
        self.intermediate_size = intermediate_size
        self.conv_kernel_size = conv_kernel_size
        self.macaron_style = macaron_style
        self.use_cnn_module = use_cnn_module
        self.hidden_act = hidden_act


ConformerConfig.register_for_auto_class()
