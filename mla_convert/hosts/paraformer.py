"""Host adapter for mla_convert's own Paraformer (``mla_paraformer``): encoder self-attention,
decoder self-attention and decoder cross-attention, chosen with ``targets`` as for Whisper
(default: all three). Like the Conformer, the model builds each attention from its config, so a
converted layer is recorded in ``attention_conversion`` under its path in the base model and the
class stays the same."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import transformers
from torch import nn

from ..modeling import modeling_paraformer as modeling
from ..modeling.attention_base import AttentionGeometry
from ..modeling.configuration_paraformer import ROLE_PATHS, ParaformerConfig
from ..modeling.feature_extraction_conformer import ConformerFeatureExtractor
from ..modeling.tokenization_paraformer import ParaformerTokenizer
from .conformer import ConformerAdapter


class ParaformerAdapter(ConformerAdapter):
    """The Conformer adapter with three roles: the decoder's attention has its own head count and
    no positions; finding, reading, building and calibrating sites are the Conformer's."""

    name = "paraformer"
    roles = ("encoder", "decoder", "cross")
    default_roles = ("encoder", "decoder", "cross")
    converted_config = ParaformerConfig
    modeling = modeling
    model_classes = (modeling.ParaformerModel, modeling.ParaformerForASR)

    def geometry(self, config, role: str) -> tuple[int, int]:
        heads = config.num_attention_heads if role == "encoder" else config.decoder_attention_heads
        return config.hidden_size, heads

    def attention_geometry(self, config, role: str) -> AttentionGeometry:
        return AttentionGeometry(*self.geometry(config, role))

    def layer_count(self, config, role: str) -> int:
        return config.num_hidden_layers if role == "encoder" else config.decoder_layers

    def site_path(self, role: str, index: int) -> str:
        return ROLE_PATHS[role].format(index)

    def position_mode(self, config, role: str) -> str:
        return config.position_mode if role == "encoder" else "none"

    def layer_attention(self, config, path: str) -> dict | None:
        return config.layer_attention(path)  # converted, else the role's trained choice

    def calibration_inputs(self, model: nn.Module, processor, rows: list[dict], use_text: bool) -> Iterator[dict]:
        """One forward per utterance: label-free, the predictor's own token count (what decoding
        sees); with ``use_text``, the reference transcript's tokens (teacher-forced count)."""
        tokenizer = getattr(processor, "tokenizer", None)
        for batch, row in zip(super().calibration_inputs(model, processor, rows, use_text), rows, strict=True):
            if use_text and tokenizer is not None:
                ids = tokenizer(row["text"].strip().upper()).input_ids
                batch["labels"] = torch.tensor([ids], device=model.device)
            yield batch

    def register_auto_classes(self) -> None:
        config_class = self.converted_config
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        base, asr = self.model_classes
        transformers.AutoModel.register(config_class, base, exist_ok=True)
        transformers.AutoModelForSpeechSeq2Seq.register(config_class, asr, exist_ok=True)
        transformers.AutoFeatureExtractor.register(config_class, ConformerFeatureExtractor, exist_ok=True)
        transformers.AutoTokenizer.register(config_class, slow_tokenizer_class=ParaformerTokenizer, exist_ok=True)
