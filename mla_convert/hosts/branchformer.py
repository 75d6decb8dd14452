"""Host adapter for mla_convert's own Branchformer CTC model (``mla_branchformer``): the Conformer
adapter with the attention branch's name (``attn``) and the Branchformer classes."""

from __future__ import annotations

from ..modeling import modeling_branchformer as modeling
from ..modeling.configuration_branchformer import BranchformerConfig
from .conformer import ConformerAdapter


class BranchformerAdapter(ConformerAdapter):
    name = "branchformer"
    converted_config = BranchformerConfig
    modeling = modeling
    attention_name = "attn"
    model_classes = (modeling.BranchformerModel, modeling.BranchformerForCTC)
