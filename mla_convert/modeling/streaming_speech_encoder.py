"""Chunk-by-chunk (streaming) inference of mla_convert's Conformer / Branchformer CTC models.

A :class:`StreamingSession` takes raw audio in pieces of any size and returns partial CTC
hypotheses as chunks complete. What it carries between pieces is a :class:`StreamingState`:

* the front end's pending samples (the log-mel frames are the ones the whole-utterance feature
  extractor computes, reflect padding included: the end is padded at :meth:`StreamingSession.finish`);
* the log-mel frames the subsampling convolutions have not consumed yet, and the subsampled
  frames that do not fill a chunk yet;
* per layer (:class:`LayerStreamState`): the attention variant's own state of the left context
  (MHA: keys and values, ``2·d`` values per frame; GQA: ``kv_heads`` heads, ``2·d·kv/h``; MLA: the
  latent, ``d_c``; linear: the running sums, constant in the length), trimmed to
  ``num_left_chunks`` chunks, and the ``kernel - 1`` frames the causal depthwise convolution needs.

The outputs equal the chunk-masked whole-sequence forward (``model(input_features)`` of a model
whose config has ``chunk_size``), which is what the model was trained with. A state can be saved
(``safetensors``) and restored, so that a server can hold many sessions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .modeling_speech_encoder import LayerStreamState

logger = logging.getLogger(__name__)

STATE_FORMAT = "mla_convert.streaming_state/1"


class StreamingConfigError(ValueError):
    """Streaming settings that cannot work with this model (one line, naming the setting)."""


@dataclass
class StreamingState:
    """Everything a stream carries between audio pieces (batch of one utterance)."""

    layers: list[LayerStreamState]
    frames: int = 0  # encoder frames already through the layers
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0))  # padded audio not yet framed
    head: np.ndarray = field(default_factory=lambda: np.zeros(0))  # audio before the first frame can start
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the last n_fft/2 + 1 samples (end padding)
    started: bool = False
    features: torch.Tensor | None = None  # [1, n, F] log-mel frames not yet subsampled
    pending: torch.Tensor | None = None  # [1, n, d] subsampled frames not yet a whole chunk
    token_ids: list[int] = field(default_factory=list)  # greedy CTC ids of every frame so far
    finished: bool = False

    def attention_bytes(self) -> int:
        """Bytes held by the attention state of every layer (the live tensors)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.attention or ()))

    def conv_bytes(self) -> int:
        """Bytes held by the causal convolutions' caches."""
        return sum(layer.conv.numel() * layer.conv.element_size() for layer in self.layers if layer.conv is not None)

    def save(self, path: str | Path) -> None:
        """Write the state to one ``.safetensors`` file (tensors + a JSON header of the rest)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        layout: list[dict] = []
        for index, layer in enumerate(self.layers):
            attention = layer.attention or ()
            for part, tensor in enumerate(attention):
                tensors[f"layers.{index}.attention.{part}"] = tensor.contiguous()
            if layer.conv is not None:
                tensors[f"layers.{index}.conv"] = layer.conv.contiguous()
            layout.append({"attention": len(attention) if layer.attention is not None else None})
        for name in ("features", "pending"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        for name in ("samples", "head", "tail"):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        header = {
            "format": STATE_FORMAT,
            "layers": layout,
            "frames": self.frames,
            "started": self.started,
            "finished": self.finished,
            "token_ids": self.token_ids,
        }
        save_file(tensors, str(path), metadata={"state": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> StreamingState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("state", "{}"))
            if header.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a saved streaming state ({STATE_FORMAT})")
            names = set(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
        layers = []
        for index, entry in enumerate(header["layers"]):
            count = entry["attention"]
            attention = None if count is None else tuple(tensors[f"layers.{index}.attention.{i}"] for i in range(count))
            layers.append(LayerStreamState(attention=attention, conv=tensors.get(f"layers.{index}.conv")))
        return cls(
            layers=layers,
            frames=int(header["frames"]),
            samples=tensors["samples"].numpy(),
            head=tensors["head"].numpy(),
            tail=tensors["tail"].numpy(),
            started=bool(header["started"]),
            features=tensors.get("features"),
            pending=tensors.get("pending"),
            token_ids=[int(i) for i in header["token_ids"]],
            finished=bool(header["finished"]),
        )


@dataclass
class StreamingOutput:
    """What one piece of audio produced: the logits of the frames it completed, their greedy CTC
    ids, and the hypothesis of the whole stream so far (``text``, with a tokenizer)."""

    logits: torch.Tensor  # [1, n, vocab]
    token_ids: list[int]
    text: str | None


def attention_cache_values(model, frames: int, chunk_size: int, left_chunks: int | None) -> int:
    """Numbers the attention state of all layers holds after ``frames`` encoder frames streamed in
    chunks of ``chunk_size``, by THE formula of each layer's variant (``state_values_per_token``,
    ``fixed_state_values``): the per-token state of the kept left context (``left_chunks`` chunks,
    or every frame), or linear attention's fixed sums (one summed chunk with all the left context,
    else one per kept chunk)."""
    chunks = -(-frames // chunk_size)
    total = 0
    for layer in model.encoder.layers:
        attention = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        fixed = attention.fixed_state_values()
        if fixed:
            total += fixed * (min(1, chunks) if left_chunks is None else min(left_chunks, chunks))
        else:
            kept = frames if left_chunks is None else min(frames, left_chunks * chunk_size)
            total += kept * attention.state_values_per_token()
    return total


class StreamingFeatures:
    """The log-mel front end, incrementally: the frames :class:`ConformerFeatureExtractor` gives
    the whole waveform, each as soon as its window is complete (the end padding waits for
    :meth:`finish`). Works on a :class:`StreamingState`'s audio buffers."""

    def __init__(self, extractor) -> None:
        self.extractor = extractor
        self.pad = extractor.n_fft // 2

    def push(self, state: StreamingState, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float64).reshape(-1)
        state.tail = np.concatenate([state.tail, audio])[-(self.pad + 1) :]
        if not state.started:
            state.head = np.concatenate([state.head, audio])
            if state.head.shape[0] <= self.pad:  # the left reflection needs pad + 1 samples
                return self._none()
            state.samples = np.concatenate([state.head[1 : self.pad + 1][::-1], state.head])
            state.head, state.started = np.zeros(0), True
        else:
            state.samples = np.concatenate([state.samples, audio])
        return self._frames(state)

    def finish(self, state: StreamingState) -> np.ndarray:
        if not state.started:
            raise ValueError(
                f"the stream has {state.head.shape[0]} samples: too short, reflect padding needs > {self.pad}"
            )
        state.samples = np.concatenate([state.samples, state.tail[:-1][::-1]])
        return self._frames(state)

    def _none(self) -> np.ndarray:
        return np.zeros((0, self.extractor.feature_size), dtype=np.float32)

    def _frames(self, state: StreamingState) -> np.ndarray:
        n_fft, hop = self.extractor.n_fft, self.extractor.hop_length
        if state.samples.shape[0] < n_fft:
            return self._none()
        count = (state.samples.shape[0] - n_fft) // hop + 1
        frames = np.lib.stride_tricks.sliding_window_view(state.samples, n_fft)[::hop][:count]
        features = self.extractor.normalize(self.extractor.log_mel_of_frames(frames)).astype(np.float32)
        state.samples = state.samples[count * hop :]
        return features


def check_streaming(config, chunk_size: int, num_left_chunks: int) -> None:
    """One-line errors for settings that cannot stream this model."""
    uses_conv = getattr(config, "use_cnn_module", True)
    if uses_conv and not config.causal_conv:
        raise StreamingConfigError(
            "causal_conv: this model's depthwise convolutions look ahead (causal_conv is false), so it cannot "
            "stream; train it with causal_conv: true and a chunk_size"
        )
    if getattr(config, "merge_method", None) == "learned_ave":
        raise StreamingConfigError("merge_method: learned_ave pools over the whole utterance and cannot stream")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise StreamingConfigError(f"chunk_size: streaming needs a chunk of >= 1 encoder frames, got {chunk_size!r}")
    if not isinstance(num_left_chunks, int) or num_left_chunks < -1:
        raise StreamingConfigError(f"num_left_chunks: must be -1 (all) or a count >= 0, got {num_left_chunks!r}")


def chunking_difference(model, chunk_size: int, left_chunks: int | None, frames: int = 512) -> tuple[float, float]:
    """How far a model's outputs move when its attention is chunked differently from its
    training: ``(max |Δ log-prob|, share of frames whose best token changes)`` between its own
    attention pattern and the requested one, on a fixed pseudo-random input of ``frames`` log-mel
    frames (a measurement, not a bound)."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, frames, config.input_dim, generator=generator)
    trained = (config.chunk_size, config.num_left_chunks)
    with torch.no_grad():
        reference = model(input_features=features).logits.log_softmax(-1)
        try:  # the model's own forward, with the requested chunk mask
            config.chunk_size, config.num_left_chunks = chunk_size, -1 if left_chunks is None else left_chunks
            chunked = model(input_features=features).logits.log_softmax(-1)
        finally:
            config.chunk_size, config.num_left_chunks = trained
    changed = (reference.argmax(-1) != chunked.argmax(-1)).float().mean().item()
    return float((reference - chunked).abs().max()), changed


class StreamingSession:
    """Stream one utterance through a Conformer / Branchformer CTC model.

    ``chunk_size`` / ``num_left_chunks`` default to the model's config. A model trained without
    chunk masks, or streamed with other chunking than it was trained with, streams with a warning
    that says how far its outputs move; one whose convolutions look ahead cannot stream.
    """

    def __init__(
        self,
        model,
        feature_extractor,
        tokenizer=None,
        chunk_size: int | None = None,
        num_left_chunks: int | None = None,
        state: StreamingState | None = None,
    ) -> None:
        config = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chunk_size = config.chunk_size if chunk_size is None else chunk_size
        left = config.num_left_chunks if num_left_chunks is None else num_left_chunks
        check_streaming(config, self.chunk_size, left)
        self.left_chunks = None if left < 0 else left
        if self.chunk_size != config.chunk_size or left != config.num_left_chunks or config.dynamic_chunk_training:
            self._warn_chunking(config, left)
        self.features = StreamingFeatures(feature_extractor)
        self.receptive_field = model.encoder.embed.minimum_frames
        self.stride = model.encoder.embed.stride
        self.state = state or StreamingState(layers=[LayerStreamState() for _ in model.encoder.layers])

    def _warn_chunking(self, config, left: int) -> None:
        if config.dynamic_chunk_training and not config.chunk_size:
            return  # trained for any chunk size: no single training pattern to differ from
        difference, changed = chunking_difference(self.model, self.chunk_size, self.left_chunks)
        trained = f"chunk_size {config.chunk_size}, num_left_chunks {config.num_left_chunks}"
        if not config.chunk_size:
            trained = "full-context attention (chunk_size 0)"
        logger.warning(
            f"streaming with chunk_size {self.chunk_size}, num_left_chunks {left}, but the model was trained with "
            f"{trained}: on a test input its log-probabilities move by up to {difference:.3g} and "
            f"{100 * changed:.1f}% of frames change their best token"
        )

    # -- the pipeline: audio -> log-mel -> subsampling -> chunks of layers -> CTC ------------------
    def feed(self, audio: np.ndarray) -> StreamingOutput:
        """Take the next piece of audio (any length, the extractor's sampling rate)."""
        if self.state.finished:
            raise RuntimeError("this stream is finished; start a new session")
        return self._advance(self.features.push(self.state, audio), final=False)

    def finish(self) -> StreamingOutput:
        """End of the utterance: the end padding, the last (possibly short) chunk."""
        if self.state.finished:
            raise RuntimeError("this stream is finished; start a new session")
        output = self._advance(self.features.finish(self.state), final=True)
        self.state.finished = True
        return output

    def _advance(self, features: np.ndarray, final: bool) -> StreamingOutput:
        state = self.state
        parameter = next(self.model.parameters())  # the model's device and dtype (a GPU, fp16)
        new = torch.from_numpy(features)[None].to(parameter.device, parameter.dtype)
        state.features = new if state.features is None else torch.cat([state.features, new], dim=1)
        embedded = self._subsample()
        if embedded is not None:
            state.pending = embedded if state.pending is None else torch.cat([state.pending, embedded], dim=1)
        outputs = []
        while state.pending is not None and state.pending.shape[1] >= (1 if final else self.chunk_size):
            chunk, rest = state.pending[:, : self.chunk_size], state.pending[:, self.chunk_size :]
            state.pending = rest if rest.shape[1] else None
            outputs.append(self._layers(chunk))
        vocab = self.model.config.vocab_size
        logits = torch.cat(outputs, dim=1) if outputs else parameter.new_zeros(1, 0, vocab)
        ids = logits[0].argmax(-1).tolist()
        state.token_ids.extend(ids)
        text = None if self.tokenizer is None else self.tokenizer.decode(state.token_ids)
        return StreamingOutput(logits=logits, token_ids=ids, text=text)

    def _subsample(self) -> torch.Tensor | None:
        """The subsampled frames the buffered log-mel frames complete (the rest waits)."""
        state = self.state
        available = 0 if state.features is None else state.features.shape[1]
        if available < self.receptive_field:
            return None
        count = (available - self.receptive_field) // self.stride + 1
        used = self.stride * (count - 1) + self.receptive_field
        with torch.no_grad():
            embedded = self.model.encoder.embed(state.features[:, :used])
        state.features = state.features[:, self.stride * count :]
        return embedded

    def _layers(self, chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            states = self.model.encoder.forward_chunk(
                chunk, self.state.frames, self.state.layers, self.chunk_size, self.left_chunks
            )
            logits = self.model.lm_head(states)
        self.state.frames += chunk.shape[1]
        return logits
