"""What mla_convert's own CTC encoders share: subsampling, positions, SpecAugment, the CTC head.

The pieces follow ESPnet2 so that ESPnet checkpoints import one to one: ``Conv2dSubsampling``
(x4, x6, x8), the ``latest`` relative positional encoding (``RelPositionalEncoding``: the input
is scaled by sqrt(d), positions run from T-1 to -(T-1)), absolute sinusoids, and a CTC head. A
family (Conformer, Branchformer) supplies only its layer; its attention is built by
``build_attention`` from the config, so MHA, MLA, GQA and linear attention are the conversion
core's modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .attention_base import AttentionGeometry, ConvertedAttention
from .attention_build import build_attention

# (kernel, stride) of each convolution of the subsampling front
SUBSAMPLING_LAYERS = {"conv2d": ((3, 2), (3, 2)), "conv2d6": ((3, 2), (5, 3)), "conv2d8": ((3, 2), (3, 2), (3, 2))}


def conv_output_length(length, kernel: int, stride: int):
    return (length - kernel) // stride + 1


class Conv2dSubsampling(nn.Module):
    """ESPnet's ``Conv2dSubsampling{,6,8}``: 2-D convolutions over (time, frequency), ReLU after
    each, then a linear layer to ``hidden_size``. ``conv.{0,2,4}`` and ``out`` are its weights."""

    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.layers = SUBSAMPLING_LAYERS[config.subsampling]
        modules: list[nn.Module] = []
        frequencies = config.input_dim
        for index, (kernel, stride) in enumerate(self.layers):
            modules += [nn.Conv2d(1 if index == 0 else hidden, hidden, kernel, stride), nn.ReLU()]
            frequencies = conv_output_length(frequencies, kernel, stride)
        if frequencies <= 0:
            raise ValueError(f"input_dim {config.input_dim} is too small for {config.subsampling} subsampling")
        self.conv = nn.Sequential(*modules)
        self.out = nn.Linear(hidden * frequencies, hidden)

    def output_lengths(self, lengths):
        for kernel, stride in self.layers:
            lengths = conv_output_length(lengths, kernel, stride)
        return lengths

    @property
    def stride(self) -> int:
        """Input frames per output frame (4, 6 or 8)."""
        return math.prod(stride for _, stride in self.layers)

    @property
    def minimum_frames(self) -> int:
        """The shortest input that still gives one output frame."""
        length = 1
        for kernel, stride in reversed(self.layers):
            length = (length - 1) * stride + kernel
        return length

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        states = self.conv(features.unsqueeze(1))
        batch, channels, frames, frequencies = states.shape
        return self.out(states.transpose(1, 2).reshape(batch, frames, channels * frequencies))


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[len(positions), dim]``: sin on even, cos on odd channels (float32, as ESPnet)."""
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[:, None] * div_term
    table = torch.zeros(len(positions), dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class PositionalEncoding(nn.Module):
    """The input scaled by sqrt(d) (ESPnet ``xscale``) plus what the attention needs:

    * ``rel_pos``: the ``[1, 2T-1, d]`` relative sinusoids (positions T-1 ... -(T-1));
    * ``abs_pos``: absolute sinusoids added to the input; nothing for the attention;
    * ``rotary``: the input unscaled; cos/sin tables ``[2, T, 1, 1, head_dim]`` for the attention.

    A streamed chunk passes ``offset`` (the absolute position of its first frame) and ``left``
    (the cached frames its queries also see): absolute sinusoids start at ``offset``, relative ones
    cover the distances ``left+T-1 ... -(T-1)`` and rotary tables the key positions
    ``offset-left ... offset+T-1``, the same values the whole-sequence forward gives those frames.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.kind = config.position_embedding
        self.hidden_size = config.hidden_size
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_base = float(config.rotary_embedding_base)
        self.dropout = nn.Dropout(config.positional_dropout)

    def forward(self, states: torch.Tensor, offset: int = 0, left: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        length = states.shape[1]
        device = states.device
        if self.kind == "rotary":
            channels = torch.arange(0, self.head_dim, 2, device=device).float()
            inv_freq = 1.0 / self.rotary_base ** (channels / self.head_dim)
            positions = torch.arange(offset - left, offset + length, device=device).float()
            angles = torch.outer(positions, inv_freq)
            angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]
            return self.dropout(states), torch.stack([angles.cos(), angles.sin()]).to(states.dtype)
        states = states * math.sqrt(self.hidden_size)
        if self.kind == "abs_pos":
            table = sinusoids(torch.arange(offset, offset + length), self.hidden_size).to(device, states.dtype)
            return self.dropout(states + table[None]), None
        positions = torch.cat([torch.arange(left + length - 1, -1, -1), -torch.arange(1, length)])
        table = sinusoids(positions, self.hidden_size).to(device, states.dtype)[None]
        return self.dropout(states), self.dropout(table)


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, config) -> torch.Tensor:
    """Frequency and time masking (Park et al. 2019, ESPnet's ``mask_freq`` / ``mask_time``) of
    normalised features ``[B, T, F]``: masked bins are set to 0, the features' mean."""
    features = features.clone()
    batch, frames, bins = features.shape
    for row in range(batch):
        for _ in range(config.freq_mask_count):
            width = int(torch.randint(0, config.freq_mask_width + 1, ()))
            start = int(torch.randint(0, max(1, bins - width + 1), ()))
            features[row, :, start : start + width] = 0.0
        valid = int(lengths[row])
        max_width = int(config.time_mask_ratio * valid)
        for _ in range(config.time_mask_count):
            width = int(torch.randint(0, max_width + 1, ()))
            start = int(torch.randint(0, max(1, valid - width + 1), ()))
            features[row, start : start + width, :] = 0.0
    return features


def zero_padding(states: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Padded frames set to 0 before a convolution over time, so that they never leak into real
    frames (a batched utterance gets the logits it gets alone)."""
    return states if frame_mask is None else states.masked_fill(~frame_mask[..., None], 0.0)


def chunk_mask(length: int, chunk_size: int, left_chunks: int | None, device=None) -> torch.Tensor:
    """``[T, T]`` bool, True where frame i may attend to frame j: j's chunk of ``chunk_size``
    frames is i's own or one of the ``left_chunks`` before it (all of them with ``None``)."""
    chunk = torch.arange(length, device=device) // chunk_size
    allowed = chunk[None, :] <= chunk[:, None]
    if left_chunks is not None:
        allowed &= chunk[None, :] >= chunk[:, None] - left_chunks
    return allowed


@dataclass
class LayerStreamState:
    """What one layer keeps between streamed chunks: its attention variant's state of the left
    context (MHA / GQA: keys and values, MLA: the latent, linear: the running sums) and the last
    ``kernel - 1`` input frames of its causal depthwise convolution."""

    attention: tuple[torch.Tensor, ...] | None = None
    conv: torch.Tensor | None = None


@dataclass
class StreamContext:
    """A layer's view of the chunk being streamed: its state (updated in place) and the chunking."""

    layer: LayerStreamState
    chunk_size: int
    left_chunks: int | None


def run_attention(
    attention: ConvertedAttention,
    states: torch.Tensor,
    position_embeddings: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    stream: StreamContext | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The self-attention of a layer, over the whole sequence or, streaming, over one chunk."""
    if stream is None:
        return attention(states, attention_mask=attention_mask, position_embeddings=position_embeddings)
    output, stream.layer.attention = attention.stream(
        states, stream.layer.attention, position_embeddings, stream.chunk_size, stream.left_chunks
    )
    return output, None


def depthwise_conv(
    conv: nn.Conv1d, states: torch.Tensor, causal: bool, stream: StreamContext | None = None
) -> torch.Tensor:
    """``conv`` over time of ``[B, C, T]``. Causal: left-padded with ``kernel - 1`` frames, zeros
    at the start of an utterance, the previous chunk's last frames when streaming (kept in
    ``stream.layer.conv`` for the next)."""
    if not causal:
        return conv(states)
    context = conv.kernel_size[0] - 1
    past = None if stream is None else stream.layer.conv
    if past is None:
        past = states.new_zeros(states.shape[0], states.shape[1], context)
    padded = torch.cat([past, states], dim=2)
    if stream is not None:
        stream.layer.conv = padded[:, :, padded.shape[2] - context :]
    return conv(padded)


def conv_padding(kernel: int, causal: bool) -> int:
    """The symmetric padding of a same-length convolution; none when causal (see depthwise_conv)."""
    return 0 if causal else (kernel - 1) // 2


def attention_geometry(config) -> AttentionGeometry:
    """ESPnet attention: biases on q/k/v/out, none on the position projection."""
    return AttentionGeometry(hidden_size=config.hidden_size, num_heads=config.num_attention_heads)


def self_attention(config, path: str) -> ConvertedAttention:
    """The self-attention at ``path`` (relative to the base model), of the variant the config names."""
    return build_attention(
        config.layer_attention(path),
        attention_geometry(config),
        config.position_mode,
        config,
        dropout=config.attention_dropout,
    )


class FeedForward(nn.Module):
    """ESPnet ``PositionwiseFeedForward``: ``w_2(dropout(act(w_1 x)))``."""

    def __init__(self, hidden_size: int, inner_size: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(states))))


ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class EncoderInputs:
    """The subsampled input of the layers: states, position embeddings, masks."""

    states: torch.Tensor
    position_embeddings: torch.Tensor | None
    frame_mask: torch.Tensor | None  # [B, T'] bool, True = real frame
    attention_mask: torch.Tensor | None  # [B, 1, 1, T'] bool


class SpeechEncoderPreTrainedModel(PreTrainedModel):
    """Weights init, output lengths and the encoder loop shared by the families."""

    base_model_prefix = "encoder"
    main_input_name = "input_features"
    input_modalities = "audio"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own defaults (what ESPnet trains with), written through transformers'
        # init functions so that weights loaded from a checkpoint are left alone
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, ConvertedAttention) and hasattr(module, "pos_bias_u"):
            init.xavier_uniform_(module.pos_bias_u)
            init.xavier_uniform_(module.pos_bias_v)

    def _get_feat_extract_output_lengths(self, input_lengths):
        """Encoder frames for ``input_lengths`` feature frames (what CTC decodes)."""
        lengths = input_lengths
        for kernel, stride in SUBSAMPLING_LAYERS[self.config.subsampling]:
            lengths = conv_output_length(lengths, kernel, stride)
        return lengths


class SpeechEncoderModel(SpeechEncoderPreTrainedModel):
    """Front (SpecAugment in training, subsampling, positions), ``layers``, final LayerNorm.
    A family's model sets ``layer_class``: ``layer_class(config, index)``, called as
    ``layer(states, position_embeddings, attention_mask, frame_mask)``."""

    layer_class: type[nn.Module]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.embed = Conv2dSubsampling(config)
        self.positions = PositionalEncoding(config)
        self.layers = nn.ModuleList([self.layer_class(config, index) for index in range(config.num_hidden_layers)])
        self.after_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The convolutional subsampling that turns feature frames into hidden states (the model
        has no token embedding; accelerate's FSDP2 shards this as a unit of its own)."""
        return self.embed

    def embed_inputs(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None) -> EncoderInputs:
        frames = input_features.shape[1]
        if frames < self.embed.minimum_frames:
            raise ValueError(
                f"the input has {frames} feature frames; {self.config.subsampling} subsampling needs "
                f"at least {self.embed.minimum_frames}"
            )
        if attention_mask is None:
            lengths = torch.full((input_features.shape[0],), frames, device=input_features.device)
        else:
            lengths = attention_mask.sum(-1)
        if self.training and self.config.specaugment:
            input_features = spec_augment(input_features, lengths, self.config)
        states, position_embeddings = self.positions(self.embed(input_features))
        chunking = self.attention_chunking()
        chunks = None if chunking is None else chunk_mask(states.shape[1], *chunking, device=states.device)[None, None]
        if attention_mask is None:
            return EncoderInputs(states, position_embeddings, None, chunks)
        output_lengths = self._get_feat_extract_output_lengths(lengths)
        frame_mask = torch.arange(states.shape[1], device=states.device)[None, :] < output_lengths[:, None]
        mask = frame_mask[:, None, None, :]
        return EncoderInputs(states, position_embeddings, frame_mask, mask if chunks is None else mask & chunks)

    def forward_chunk(
        self,
        embedded: torch.Tensor,
        offset: int,
        layers: list[LayerStreamState],
        chunk_size: int,
        left_chunks: int | None,
    ) -> torch.Tensor:
        """The layers over one streamed chunk: ``embedded`` ``[B, T, d]`` is the subsampling's
        output for encoder frames ``offset .. offset+T-1``; ``layers`` hold each layer's state of
        the frames before (updated in place). Returns the final-normed states of the chunk."""
        left = offset if left_chunks is None else min(offset, left_chunks * chunk_size)
        states, position_embeddings = self.positions(embedded, offset=offset, left=left)
        for layer, layer_state in zip(self.layers, layers, strict=True):
            context = StreamContext(layer_state, chunk_size, left_chunks)
            states, _ = layer(states, position_embeddings, None, None, context)
        return self.after_norm(states)

    def attention_chunking(self) -> tuple[int, int | None] | None:
        """``(chunk_size, left_chunks)`` of this forward's chunk mask, ``None`` for full context.
        With ``dynamic_chunk_training``, a training batch sees the full context half of the time,
        else a chunk of 1 .. ``max_dynamic_chunk_size`` frames (WeNet's U2)."""
        config = self.config
        left = None if config.num_left_chunks < 0 else config.num_left_chunks
        if self.training and config.dynamic_chunk_training:
            if torch.rand(()) < 0.5:
                return None
            return int(torch.randint(1, config.max_dynamic_chunk_size + 1, ())), left
        return (config.chunk_size, left) if config.chunk_size else None

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        inputs = self.embed_inputs(input_features, attention_mask)
        states = inputs.states
        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(states)
            states, weights = layer(states, inputs.position_embeddings, inputs.attention_mask, inputs.frame_mask)
            if output_attentions and weights is not None:
                attentions.append(weights)
        states = self.after_norm(states)
        if output_hidden_states:
            hidden_states.append(states)
        output = BaseModelOutput(
            last_hidden_state=states,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()


class SpeechEncoderForCTC(SpeechEncoderPreTrainedModel):
    """The encoder plus ESPnet's CTC head (``lm_head`` = ESPnet ``ctc.ctc_lo``); ``labels`` are
    padded with -100 and ``pad_token_id`` is the blank, as in ``Wav2Vec2ForCTC``."""

    model_class: type[SpeechEncoderModel]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.encoder = self.model_class(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple:
        encoded = self.encoder(
            input_features,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.lm_head(self.dropout(encoded.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.ctc_loss(logits, labels, attention_mask, input_features.shape[1])
        output = CausalLMOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return output if return_dict is not False else output.to_tuple()

    def stream(
        self,
        processor=None,
        *,
        feature_extractor=None,
        tokenizer=None,
        chunk_size: int | None = None,
        num_left_chunks: int | None = None,
        state=None,
    ):
        """A :class:`~.streaming_speech_encoder.StreamingSession` over this model: feed it audio
        in pieces (``session.feed(audio)``, then ``session.finish()``) for partial CTC hypotheses.
        ``processor`` (or ``feature_extractor`` + ``tokenizer``) is the model's; chunking defaults
        to the config's; ``state`` resumes a saved :class:`~.streaming_speech_encoder.StreamingState`."""
        from .streaming_speech_encoder import StreamingSession

        if processor is not None:
            feature_extractor = feature_extractor or processor.feature_extractor
            tokenizer = tokenizer or getattr(processor, "tokenizer", None)
        if feature_extractor is None:
            raise ValueError("streaming needs the model's feature extractor (pass its processor)")
        return StreamingSession(self, feature_extractor, tokenizer, chunk_size, num_left_chunks, state)

    def ctc_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None, frames: int
    ) -> torch.Tensor:
        if labels.max() >= self.config.vocab_size:
            raise ValueError(f"label ids must be below vocab_size {self.config.vocab_size}")
        if attention_mask is None:
            feature_lengths = torch.full((logits.shape[0],), frames, device=logits.device)
        else:
            feature_lengths = attention_mask.sum(-1)
        input_lengths = self._get_feat_extract_output_lengths(feature_lengths).long()
        valid = labels >= 0
        target_lengths = valid.sum(-1)
        targets = labels.masked_select(valid)
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(
                log_probs,
                targets,
                input_lengths,
                target_lengths,
                blank=self.config.pad_token_id,
                reduction=self.config.ctc_loss_reduction,
                zero_infinity=self.config.ctc_zero_infinity,
            )
