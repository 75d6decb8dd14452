"""``mla-convert stream``: stream audio files through a Conformer / Branchformer CTC model chunk
by chunk, printing the partial hypotheses as they grow and what the stream held.

The work is :meth:`SpeechEncoderForCTC.stream` (``modeling/streaming_speech_encoder.py``); this
module loads the model and processor, decodes the audio, feeds it in ``piece_ms`` pieces and
reports, per file: the final transcript, the encoder frames, the attention-cache bytes measured
from the live tensors next to the formula, the convolution-cache bytes, the real-time factor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import MlaConvertError, UnsupportedModelError


class StreamingError(MlaConvertError):
    """Streaming settings this model cannot stream with (chunk size, causal convolutions)."""


def load_streaming_model(model_id: str) -> tuple[Any, Any]:
    """``(model, processor)`` of an mla_convert Conformer / Branchformer directory or Hub id."""
    from transformers import AutoProcessor

    from .loading import load_config, load_pretrained

    config = load_config(model_id)
    if getattr(config, "model_type", None) not in ("mla_conformer", "mla_branchformer"):
        raise UnsupportedModelError(
            f"{model_id} is a {getattr(config, 'model_type', '?')} model; only mla_convert's Conformer and "
            "Branchformer CTC models stream (train one with `mla-convert train`, or import one from ESPnet)"
        )
    model = load_pretrained(model_id, config=config).eval()
    processor = AutoProcessor.from_pretrained(str(Path(model_id).expanduser()) if Path(model_id).exists() else model_id)
    return model, processor


def stream_files(
    model_id: str,
    audio_files: Sequence[str],
    *,
    chunk_size: int | None = None,
    num_left_chunks: int | None = None,
    piece_ms: int = 160,
    on_partial: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Stream each file; ``on_partial(file, text)`` is called whenever the hypothesis changes.
    Returns a JSON-ready report (settings, and per file the transcript, frames, cache bytes, RTF)."""
    import torch

    from .data.audio import decode_audio
    from .modeling.streaming_speech_encoder import StreamingConfigError, attention_cache_values

    if not audio_files:
        raise StreamingError("no audio files to stream")
    if piece_ms <= 0:
        raise StreamingError(f"--piece-ms: must be a positive number of milliseconds, got {piece_ms}")
    model, processor = load_streaming_model(model_id)
    extractor = processor.feature_extractor
    piece = max(1, extractor.sampling_rate * piece_ms // 1000)
    files = []
    for file in audio_files:
        audio = decode_audio(file, sampling_rate=extractor.sampling_rate)
        try:
            session = model.stream(processor, chunk_size=chunk_size, num_left_chunks=num_left_chunks)
        except StreamingConfigError as error:
            raise StreamingError(str(error)) from None
        text, peak, compute = "", 0, 0.0
        with torch.inference_mode():
            for start in range(0, audio.shape[0], piece):
                began = time.perf_counter()
                output = session.feed(audio[start : start + piece])
                compute += time.perf_counter() - began
                peak = max(peak, session.state.attention_bytes())
                if output.text is not None and output.text != text:
                    text = output.text
                    if on_partial is not None:
                        on_partial(file, text)
            frames, attention_bytes = session.state.frames, session.state.attention_bytes()
            began = time.perf_counter()
            output = session.finish()
            compute += time.perf_counter() - began
        element = next(model.parameters()).element_size()
        formula = element * attention_cache_values(model, frames, session.chunk_size, session.left_chunks)
        files.append({
            "file": str(file), "seconds": audio.shape[0] / extractor.sampling_rate, "text": output.text,
            "encoder_frames": session.state.frames, "attention_cache_bytes": attention_bytes,
            "attention_cache_formula_bytes": formula, "attention_cache_peak_bytes": peak,
            "conv_cache_bytes": session.state.conv_bytes(),
            "rtf": compute / max(audio.shape[0] / extractor.sampling_rate, 1e-9),
        })  # fmt: skip
    frame_ms = model.config.subsampling_factor * extractor.hop_length * 1000 / extractor.sampling_rate
    return {
        "model": model_id,
        "attention": model.config.attention,
        "converted": bool(model.config.attention_conversion),
        "chunk_size": session.chunk_size,
        "chunk_ms": session.chunk_size * frame_ms,
        "num_left_chunks": -1 if session.left_chunks is None else session.left_chunks,
        "piece_ms": piece_ms,
        "files": files,
    }


def format_stream_report(report: dict[str, Any]) -> str:
    lines = [
        f"chunks of {report['chunk_size']} encoder frames ({report['chunk_ms']:.0f} ms), "
        f"left context {report['num_left_chunks']} chunks, audio fed in {report['piece_ms']} ms pieces"
    ]
    for entry in report["files"]:
        lines += [
            f"{entry['file']}: {entry['text']}",
            f"  {entry['encoder_frames']} frames, {entry['seconds']:.1f} s; attention cache "
            f"{entry['attention_cache_bytes']:,} B (formula {entry['attention_cache_formula_bytes']:,} B), "
            f"conv cache {entry['conv_cache_bytes']:,} B, RTF {entry['rtf']:.3f}",
        ]
    return "\n".join(lines)
