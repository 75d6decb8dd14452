"""Config of mla_convert's Branchformer CTC model (ESPnet2 ``BranchformerEncoder`` + CTC head).

Shares the front end, positions, attention choice and CTC settings with the Conformer config;
adds the cgMLP branch and how the two branches are merged.
"""

from __future__ import annotations

from .configuration_conformer import ConfigValueError, SpeechEncoderCTCConfig, _choice, _positive

MERGE_METHODS = ("concat", "learned_ave", "fixed_ave")
GATE_ACTIVATIONS = ("identity", "swish", "relu", "gelu")


class BranchformerConfig(SpeechEncoderCTCConfig):
    """ESPnet2 ``BranchformerEncoder`` (``rel_pos_type: latest``) + CTC, as an HF config.

    ``cgmlp_linear_units`` / ``cgmlp_conv_kernel`` / ``use_linear_after_conv`` /
    ``gate_activation`` shape the convolutional gating MLP branch; ``merge_method`` is
    ``concat`` (a linear layer over both branches), ``learned_ave`` (weights from attention
    pooling of each branch) or ``fixed_ave`` (``cgmlp_weight`` for the cgMLP branch).
    """

    model_type = "mla_branchformer"

    def __init__(
        self,
        cgmlp_linear_units: int = 576,
        cgmlp_conv_kernel: int = 15,
        use_linear_after_conv: bool = False,
        gate_activation: str = "identity",
        merge_method: str = "concat",
        cgmlp_weight: float = 0.5,
        attn_branch_drop_rate: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _positive("cgmlp_linear_units", cgmlp_linear_units)
        if cgmlp_linear_units % 2:
            raise ConfigValueError(
                f"cgmlp_linear_units: must be even (the gating unit splits it in halves), got {cgmlp_linear_units}"
            )
        _positive("cgmlp_conv_kernel", cgmlp_conv_kernel)
        if cgmlp_conv_kernel % 2 == 0:
            raise ConfigValueError(f"cgmlp_conv_kernel: must be odd (same-length convolution), got {cgmlp_conv_kernel}")
        _choice("gate_activation", gate_activation, GATE_ACTIVATIONS)
        _choice("merge_method", merge_method, MERGE_METHODS)
        if not isinstance(cgmlp_weight, (int, float)) or not 0.0 < cgmlp_weight < 1.0:
            raise ConfigValueError(
                f"cgmlp_weight: must be strictly between 0 and 1 (both branches kept), got {cgmlp_weight!r}"
            )
        if not 0.0 <= attn_branch_drop_rate < 1.0:
            raise ConfigValueError(f"attn_branch_drop_rate: must be in [0, 1), got {attn_branch_drop_rate!r}")
        if merge_method == "learned_ave" and (self.chunk_size or self.causal_conv or self.dynamic_chunk_training):
            raise ConfigValueError(
                "merge_method: learned_ave pools each branch over the whole utterance and cannot stream; "
                "use concat or fixed_ave with chunk_size / causal_conv"
            )
        self.cgmlp_linear_units = cgmlp_linear_units
        self.cgmlp_conv_kernel = cgmlp_conv_kernel
        self.use_linear_after_conv = use_linear_after_conv
        self.gate_activation = gate_activation
        self.merge_method = merge_method
        self.cgmlp_weight = float(cgmlp_weight)
        self.attn_branch_drop_rate = attn_branch_drop_rate


BranchformerConfig.register_for_auto_class()
