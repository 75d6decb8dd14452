"""Paraformer (Gao et al. 2022; FunASR's ``Paraformer``) with any attention variant.

``model(input_features, attention_mask)`` decodes without ``generate()``: the Conformer encoder
(the Conformer model's own blocks), the CIF predictor that turns the encoder frames into one
acoustic embedding per token it counts, and a non-autoregressive decoder that reads all of them at
once (self-attention over the tokens, cross-attention to the encoder). ``logits`` is
``[B, N, vocab]`` with one row per fired token; rows past a sequence's ``token_lengths`` are the
blank (``pad_token_id``), so ``logits.argmax(-1)`` decodes with the tokenizer as it is, padded
batches included.

With ``labels`` (padded with -100) the predictor is scaled to fire exactly the target's number of
tokens, an optional glancing sampler (``sampling_ratio``) replaces some acoustic embeddings by the
reference token's embedding for a second decoder pass, and the loss is the decoder's
label-smoothed cross-entropy + ``predictor_weight`` x the quantity loss
``mean |target length - sum of CIF weights|``; with ``ctc_weight`` > 0, FunASR's mix
``(1 - ctc_weight) x decoder + ctc_weight x CTC on the encoder + predictor_weight x quantity``.

Every attention (``encoder.layers.N.self_attn``, ``decoder.layers.N.self_attn``,
``decoder.layers.N.src_attn``) is built by ``build_attention`` from the config: MHA, MLA, GQA or
linear, the conversion core's modules. Names follow FunASR where they have one (``predictor.
cif_conv1d``, ``cif_output``, ``decoder.layers.N.norm1..3``, ``feed_forward.w_1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .attention_base import AttentionGeometry, ConvertedAttention
from .attention_build import build_attention
from .configuration_paraformer import ROLE_PATHS, ParaformerConfig
from .modeling_conformer import ConformerModel
from .modeling_speech_encoder import FeedForward, SpeechEncoderPreTrainedModel, zero_padding

# ------------------------------------------------------------------------------------ CIF predictor


@dataclass
class CifOutput:
    """What continuous integrate-and-fire gives for a batch."""

    embeddings: torch.Tensor  # [B, N, d]: one integrated embedding per fired token (zeros past it)
    token_lengths: torch.Tensor  # [B] long: tokens fired per sequence
    fires: torch.Tensor  # [B, T]: the running sum at each frame, before a fire subtracts the threshold


def cif(hidden: torch.Tensor, alphas: torch.Tensor, threshold: float, width: int | None = None) -> CifOutput:
    """Continuous integrate-and-fire over ``hidden`` ``[B, T, d]`` with frame weights ``alphas``
    ``[B, T]``: the weights are summed frame by frame; when the sum reaches ``threshold`` a token
    fires, its embedding is the weighted sum of the frames since the last fire (the frame that
    crossed contributes just the share that completed the threshold), and the rest of that frame's
    weight starts the next token. ``width``: pad the embeddings to at least that many tokens."""
    batch, frames, size = hidden.shape
    accumulated = alphas.new_zeros(batch)
    embedding = hidden.new_zeros(batch, size)
    sums, integrated = [], []
    for t in range(frames):
        alpha = alphas[:, t]
        completion = threshold - accumulated
        accumulated = accumulated + alpha
        sums.append(accumulated)
        fired = accumulated >= threshold
        accumulated = torch.where(fired, accumulated - threshold, accumulated)
        share = torch.where(fired, completion, alpha)
        embedding = embedding + share[:, None] * hidden[:, t]
        integrated.append(embedding)
        embedding = torch.where(fired[:, None], (alpha - share)[:, None] * hidden[:, t], embedding)
    fires = torch.stack(sums, 1) if frames else alphas.new_zeros(batch, 0)
    fired = fires >= threshold
    lengths = fired.sum(1)
    count = max(int(lengths.max()) if batch else 0, width or 0)
    embeddings = hidden.new_zeros(batch, count, size)
    if frames:
        stacked = torch.stack(integrated, 1)
        for row in range(batch):
            embeddings[row, : int(lengths[row])] = stacked[row][fired[row]]
    return CifOutput(embeddings, lengths, fires)


@dataclass
class PredictorOutput(CifOutput):
    alphas: torch.Tensor | None = None  # [B, T] the frame weights (scaled to the targets in training)
    token_counts: torch.Tensor | None = None  # [B] the sum of the unscaled weights (the quantity)


class CifPredictor(nn.Module):
    """FunASR's ``CifPredictorV2``: frame weights ``relu(sigmoid(W relu(conv(h))) * smooth - noise)``
    from a convolution over ``l_order`` frames before and ``r_order`` after each frame."""

    def __init__(self, config: ParaformerConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.l_order, self.r_order = config.predictor_l_order, config.predictor_r_order
        self.cif_conv1d = nn.Conv1d(hidden, hidden, self.l_order + self.r_order + 1)
        self.cif_output = nn.Linear(hidden, 1)

    def frame_weights(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, T]`` weights, 0 on padded frames."""
        context = nn.functional.pad(hidden.transpose(1, 2), (self.l_order, self.r_order))
        states = torch.relu(self.cif_conv1d(context)).transpose(1, 2)
        alphas = torch.sigmoid(self.cif_output(states)).squeeze(-1)
        alphas = torch.relu(alphas * self.config.predictor_smooth_factor - self.config.predictor_noise_threshold)
        return alphas if frame_mask is None else alphas * frame_mask.to(alphas.dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        frame_mask: torch.Tensor | None,
        target_lengths: torch.Tensor | None = None,
    ) -> PredictorOutput:
        config = self.config
        alphas = self.frame_weights(hidden, frame_mask)
        counts = alphas.sum(-1)
        if target_lengths is not None:
            # training: the weights scaled so that exactly the target's tokens fire
            target = target_lengths.to(alphas.dtype)
            alphas = alphas * (target / counts.clamp_min(torch.finfo(alphas.dtype).tiny))[:, None]
            fired = cif(hidden, alphas, config.predictor_threshold, width=int(target_lengths.max()))
            lengths = target_lengths.long()
            return PredictorOutput(fired.embeddings, lengths, fired.fires, alphas, counts)
        if config.predictor_tail_threshold > 0:
            hidden, alphas = self.with_tail(hidden, alphas, frame_mask)
        fired = cif(hidden, alphas, config.predictor_threshold)
        return PredictorOutput(fired.embeddings, fired.token_lengths, fired.fires, alphas, counts)

    def with_tail(
        self, hidden: torch.Tensor, alphas: torch.Tensor, frame_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero frame of weight ``predictor_tail_threshold`` after each sequence's last frame, so
        that a last token whose weight got that close to the threshold still fires."""
        batch, frames = alphas.shape
        lengths = frame_mask.sum(-1) if frame_mask is not None else alphas.new_full((batch,), frames)
        tail = nn.functional.one_hot(lengths.long(), frames + 1).to(alphas.dtype)
        alphas = torch.cat([alphas, alphas.new_zeros(batch, 1)], dim=1) + tail * self.config.predictor_tail_threshold
        return torch.cat([hidden, hidden.new_zeros(batch, 1, hidden.shape[-1])], dim=1), alphas


# ------------------------------------------------------------------------------------------ decoder


def decoder_geometry(config: ParaformerConfig) -> AttentionGeometry:
    return AttentionGeometry(hidden_size=config.hidden_size, num_heads=config.decoder_attention_heads)


def role_attention(config: ParaformerConfig, role: str, index: int) -> ConvertedAttention:
    """The attention of ``role`` in decoder layer ``index``, of the variant the config names."""
    return build_attention(
        config.layer_attention(ROLE_PATHS[role].format(index)),
        decoder_geometry(config),
        "none",
        config,
        dropout=config.attention_dropout,
    )


class ParaformerDecoderLayer(nn.Module):
    """FunASR's ``DecoderLayer`` (``normalize_before``): self-attention over the token embeddings,
    cross-attention (``src_attn``) to the encoder output, feed-forward; pre-norm residuals."""

    def __init__(self, config: ParaformerConfig, index: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = role_attention(config, "decoder", index)
        self.src_attn = role_attention(config, "cross", index)
        self.feed_forward = FeedForward(hidden, config.decoder_intermediate_size, "relu", config.dropout)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.norm3 = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        states: torch.Tensor,
        token_mask: torch.Tensor | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(self.norm1(states), attention_mask=token_mask)
        states = states + self.dropout(attended)
        attended, _ = self.src_attn(self.norm2(states), attention_mask=memory_mask, key_value_states=memory)
        states = states + self.dropout(attended)
        return states + self.dropout(self.feed_forward(self.norm3(states)))


class ParaformerDecoder(nn.Module):
    """The layers, a final LayerNorm and the output projection; ``embed_tokens`` gives the glancing
    sampler the reference tokens' embeddings (it is not used at inference)."""

    def __init__(self, config: ParaformerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ParaformerDecoderLayer(config, index) for index in range(config.decoder_layers)])
        self.after_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        embeddings: torch.Tensor,
        token_lengths: torch.Tensor,
        memory: torch.Tensor,
        frame_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits ``[B, N, vocab]`` of the ``N`` token embeddings (``token_lengths`` real ones)."""
        tokens = torch.arange(embeddings.shape[1], device=embeddings.device)[None, :] < token_lengths[:, None]
        token_mask = tokens[:, None, None, :]
        memory_mask = None if frame_mask is None else frame_mask[:, None, None, :]
        states = embeddings
        for layer in self.layers:
            states = layer(states, token_mask, memory, memory_mask)
        return self.output_layer(self.after_norm(states))


# --------------------------------------------------------------------------------------------- model


@dataclass
class ParaformerOutput(ModelOutput):
    """``logits`` ``[B, N, vocab]`` (blank past ``token_lengths``), the predictor's view and the
    encoder's output; ``loss`` (and its parts) with ``labels``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_lengths: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_lengths: torch.Tensor | None = None
    decoder_loss: torch.Tensor | None = None
    quantity_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None


class ParaformerPreTrainedModel(SpeechEncoderPreTrainedModel):
    config_class = ParaformerConfig
    base_model_prefix = "model"
    _no_split_modules = ["ConformerLayer", "ParaformerDecoderLayer"]  # FSDP / device_map: one unit per layer

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Embedding):
            from transformers import initialization as init

            init.normal_(module.weight)


class ParaformerModel(ParaformerPreTrainedModel):
    """Encoder (the Conformer model's blocks), CIF predictor and decoder (without the loss)."""

    def __init__(self, config: ParaformerConfig) -> None:
        super().__init__(config)
        self.encoder = ConformerModel(config)
        self.predictor = CifPredictor(config)
        self.decoder = ParaformerDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The decoder's token embedding (as in HF encoder-decoder models)."""
        return self.decoder.embed_tokens

    def encode(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(encoder output [B, T', d], frame mask [B, T'] or None)``."""
        if input_features.shape[1] == 0:
            raise ValueError("the input has no audio (0 feature frames)")
        encoded = self.encoder(input_features, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            return encoded, None
        lengths = self._get_feat_extract_output_lengths(attention_mask.sum(-1))
        frame_mask = torch.arange(encoded.shape[1], device=encoded.device)[None, :] < lengths[:, None]
        # padded frames zeroed: the predictor's convolution and its tail frame must not see them
        return zero_padding(encoded, frame_mask), frame_mask


class ParaformerForASR(ParaformerPreTrainedModel):
    """Paraformer with its losses; ``model(input_features)`` decodes (see the module's docstring)."""

    def __init__(self, config: ParaformerConfig) -> None:
        super().__init__(config)
        self.model = ParaformerModel(config)
        self.ctc_head = nn.Linear(config.hidden_size, config.vocab_size) if config.ctc_weight > 0 else None
        self.post_init()

    def get_encoder(self) -> ConformerModel:
        return self.model.encoder

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ParaformerOutput | tuple:
        config = self.config
        encoded, frame_mask = self.model.encode(input_features, attention_mask)
        targets = None if labels is None else self.targets(labels)
        target_lengths = None if targets is None else (targets != -100).sum(-1)
        predicted = self.model.predictor(encoded, frame_mask, target_lengths)
        embeddings = predicted.embeddings
        if targets is not None and self.training and config.sampling_ratio > 0:
            embeddings = self.glance(embeddings, predicted.token_lengths, targets, encoded, frame_mask)
        logits = self.model.decoder(embeddings, predicted.token_lengths, encoded, frame_mask)
        output = ParaformerOutput(
            token_lengths=predicted.token_lengths,
            token_counts=predicted.token_counts,
            alphas=predicted.alphas,
            encoder_last_hidden_state=encoded,
            encoder_lengths=None if frame_mask is None else frame_mask.sum(-1),
        )
        if targets is not None:
            self.add_losses(output, logits, targets, predicted, encoded, frame_mask)
            output.logits = logits
        else:
            output.logits = self.blank_past_tokens(logits, predicted.token_lengths)
        return output if return_dict is not False else output.to_tuple()

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's targets: ``labels`` (-100 = padding), with eos appended when ``predictor_bias``."""
        if labels.max() >= self.config.vocab_size:
            raise ValueError(f"label ids must be below vocab_size {self.config.vocab_size}")
        if not self.config.predictor_bias:
            return labels
        lengths = (labels != -100).sum(-1)
        targets = torch.cat([labels, labels.new_full((labels.shape[0], 1), -100)], dim=1)
        targets[torch.arange(labels.shape[0], device=labels.device), lengths] = self.config.eos_token_id
        return targets

    def blank_past_tokens(self, logits: torch.Tensor, token_lengths: torch.Tensor) -> torch.Tensor:
        """Rows past each sequence's tokens (and, with ``predictor_bias``, its eos) set to decode
        as the blank, which every tokenizer of these models drops."""
        keep = token_lengths - self.config.predictor_bias
        past = torch.arange(logits.shape[1], device=logits.device)[None, :] >= keep[:, None]
        blank = torch.full_like(logits[0, 0], torch.finfo(logits.dtype).min)
        blank[self.config.pad_token_id] = 0.0
        return torch.where(past[..., None], blank, logits)

    @torch.no_grad()
    def _first_pass_tokens(self, embeddings, token_lengths, encoded, frame_mask) -> torch.Tensor:
        return self.model.decoder(embeddings, token_lengths, encoded, frame_mask).argmax(-1)

    def glance(
        self,
        embeddings: torch.Tensor,
        token_lengths: torch.Tensor,
        targets: torch.Tensor,
        encoded: torch.Tensor,
        frame_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The glancing sampler (FunASR's ``sampler``): a first decoder pass without gradients;
        for each sequence, ``sampling_ratio`` x its wrongly predicted count of positions, drawn at
        random, get the reference token's embedding instead of the acoustic one."""
        predicted = self._first_pass_tokens(embeddings, token_lengths, encoded, frame_mask)
        real = targets != -100
        wrong = ((predicted != targets) & real).sum(-1)
        glimpse = torch.zeros_like(real)
        for row in range(targets.shape[0]):
            count = int((wrong[row].float() * self.config.sampling_ratio).long())
            if count > 0:
                chosen = torch.randperm(int(real[row].sum()), device=targets.device)[:count]
                glimpse[row, chosen] = True
        reference = self.model.decoder.embed_tokens(targets.clamp_min(0))
        return torch.where(glimpse[..., None], reference.to(embeddings.dtype), embeddings)

    def add_losses(self, output, logits, targets, predicted, encoded, frame_mask) -> None:
        config = self.config
        real = targets != -100
        decoder_loss = nn.functional.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=-100, label_smoothing=config.lsm_weight,
            reduction="sum",
        ) / targets.shape[0]  # fmt: skip
        quantity = (real.sum(-1).to(predicted.token_counts.dtype) - predicted.token_counts).abs().mean()
        loss = (1.0 - config.ctc_weight) * decoder_loss + config.predictor_weight * quantity
        if self.ctc_head is not None:
            output.ctc_loss = self.ctc(encoded, frame_mask, targets)
            loss = loss + config.ctc_weight * output.ctc_loss
        output.loss, output.decoder_loss, output.quantity_loss = loss, decoder_loss, quantity

    def ctc(self, encoded: torch.Tensor, frame_mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        log_probs = nn.functional.log_softmax(self.ctc_head(encoded), dim=-1, dtype=torch.float32).transpose(0, 1)
        frames = (
            frame_mask.sum(-1)
            if frame_mask is not None
            else torch.full((encoded.shape[0],), encoded.shape[1], device=encoded.device)
        )
        real = targets != -100
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(
                log_probs, targets.masked_select(real), frames.long(), real.sum(-1),
                blank=self.config.pad_token_id, reduction="mean", zero_infinity=True,
            )  # fmt: skip


ParaformerModel.register_for_auto_class("AutoModel")
ParaformerForASR.register_for_auto_class("AutoModelForSpeechSeq2Seq")
