"""Chunk-by-chunk streaming of the Conformer / Branchformer CTC models: the streamed outputs are
the chunk-masked whole-utterance outputs, and the attention cache holds each variant's own state
(MHA 2·d, GQA 2·d·kv/h, MLA d_c values per frame and layer; linear a constant)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import librispeech_utterances
from helpers import run_without_mla_convert
from test_speech_encoders import tiny_model

import mla_convert
from mla_convert.data.audio import decode_audio
from mla_convert.frontend import build_processor, char_vocabulary
from mla_convert.modeling.configuration_conformer import ConfigValueError
from mla_convert.modeling.streaming_speech_encoder import (
    StreamingConfigError,
    StreamingState,
    attention_cache_values,
)
from mla_convert.specs import GQASpec, MLASpec

ATTENTIONS = {
    "mha": {"type": "mha"},
    "mla": {"type": "mla", "latent_dim": 24},
    "gqa": {"type": "gqa", "kv_heads": 2},
    "linear": {"type": "linear", "feature_map": "elu"},
}
STREAMING = dict(causal_conv=True, vocab_size=30)


@pytest.fixture(scope="module")
def processor():
    return build_processor(char_vocabulary([]), [-6.0] * 80, [3.0] * 80, win_length=400, hop_length=160)


@pytest.fixture(scope="module")
def audio(dev_clean_audio) -> np.ndarray:
    return dev_clean_audio


def streaming_model(family: str, attention: str = "mha", **overrides):
    extra = {"merge_method": "concat"} if family == "branchformer" else {}
    settings = {"chunk_size": 8, "num_left_chunks": -1, **STREAMING, **extra, **overrides}
    return tiny_model(family, attention=ATTENTIONS[attention], **settings)


def stream_in_pieces(session, audio: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Feed ``audio`` in pieces of random odd sizes (1 .. 2999 samples); all logits."""
    rng = np.random.default_rng(seed)
    outputs, start = [], 0
    while start < audio.shape[0]:
        size = int(rng.integers(1, 1500)) * 2 + 1
        outputs.append(session.feed(audio[start : start + size]).logits)
        start += size
    outputs.append(session.finish().logits)
    return torch.cat(outputs, dim=1)


def full_forward(model, processor, audio) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor(audio, sampling_rate=16000, return_tensors="pt")).logits


@pytest.mark.parametrize("family", ["conformer", "branchformer"])
@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("chunk_size,num_left_chunks", [(8, -1), (5, 2), (11, 3), (100, -1)])
def test_streamed_outputs_equal_the_chunk_masked_forward(
    family, attention, chunk_size, num_left_chunks, processor, audio
):
    # 99 encoder frames: chunks of 8 and 5 do not divide them, 11 does, one of 100 holds them all
    model = streaming_model(family, attention, chunk_size=chunk_size, num_left_chunks=num_left_chunks)
    expected = full_forward(model, processor, audio)
    streamed = stream_in_pieces(model.stream(processor), audio)
    assert streamed.shape == expected.shape
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("position_embedding", ["rotary", "abs_pos"])
def test_every_position_kind_streams(position_embedding, processor, audio):
    model = streaming_model("conformer", "mla", position_embedding=position_embedding, chunk_size=6, num_left_chunks=3)
    torch.testing.assert_close(
        stream_in_pieces(model.stream(processor), audio), full_forward(model, processor, audio), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("num_left_chunks", [-1, 3])
def test_the_attention_cache_holds_the_variants_state_and_matches_the_formula(
    attention, num_left_chunks, processor, audio
):
    model = streaming_model("conformer", attention, chunk_size=4, num_left_chunks=num_left_chunks)
    session = model.stream(processor)
    sizes = []
    for start in range(0, audio.shape[0], 8000):  # half a second at a time
        session.feed(audio[start : start + 8000])
        frames = session.state.frames
        measured = session.state.attention_bytes()
        assert measured == 4 * attention_cache_values(model, frames, 4, None if num_left_chunks < 0 else 3)
        sizes.append((frames, measured))
    frames, measured = sizes[-1]
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    per_frame = {"mha": 2 * hidden, "gqa": 2 * hidden * 2 // 4, "mla": 24}
    if attention == "linear":  # constant in the length: H x F x (d + 1) per layer and kept chunk
        kept_chunks = 1 if num_left_chunks < 0 else 3
        assert measured == 4 * layers * kept_chunks * 4 * 16 * 17
        assert len({size for _, size in sizes if _ >= 12}) == 1
    else:
        kept = frames if num_left_chunks < 0 else min(frames, 12)
        assert measured == 4 * layers * kept * per_frame[attention]
    assert session.state.conv_bytes() == 4 * layers * hidden * (model.config.conv_kernel_size - 1)


@pytest.mark.parametrize(
    "spec,exact",
    [(MLASpec(latent_dim=64), True), (GQASpec(kv_heads=4), True), (MLASpec(latent_dim=16), False)],
)
def test_a_streaming_model_converted_after_training_streams_with_its_new_state(spec, exact, processor, audio):
    model = streaming_model("conformer", "mha", chunk_size=6, num_left_chunks=2)
    converted = copy.deepcopy(model)
    mla_convert.convert(converted, spec)  # in place, as after training
    streamed = stream_in_pieces(converted.stream(processor), audio)
    torch.testing.assert_close(streamed, full_forward(converted, processor, audio), rtol=0, atol=1e-5)
    if exact:  # full rank: the original's own stream
        torch.testing.assert_close(streamed, stream_in_pieces(model.stream(processor), audio), rtol=0, atol=1e-5)
    session = converted.stream(processor)
    session.feed(audio)
    per_frame = 64 if isinstance(spec, MLASpec) and exact else (16 if isinstance(spec, MLASpec) else 128)
    assert session.state.attention_bytes() == 4 * 2 * 12 * per_frame  # 2 left chunks of 6 frames, 2 layers


def test_a_saved_state_resumes_the_stream_exactly(tmp_path, processor, audio):
    model = streaming_model("branchformer", "gqa", chunk_size=5, num_left_chunks=2)
    uninterrupted = model.stream(processor)
    pieces = [uninterrupted.feed(audio[:21_001]), uninterrupted.feed(audio[21_001:]), uninterrupted.finish()]
    expected = torch.cat([piece.logits for piece in pieces], dim=1)
    first = model.stream(processor)
    head = [first.feed(audio[:21_001]).logits]
    first.state.save(tmp_path / "stream.safetensors")
    resumed = model.stream(processor, state=StreamingState.load(tmp_path / "stream.safetensors"))
    tail = [resumed.feed(audio[21_001:]).logits, resumed.finish().logits]
    torch.testing.assert_close(torch.cat(head + tail, dim=1), expected, rtol=0, atol=0)


def test_partial_hypotheses_grow_into_the_full_transcript(processor, audio):
    model = streaming_model("conformer", "mla")
    session = model.stream(processor)
    texts = [session.feed(audio[start : start + 16000]).text for start in range(0, audio.shape[0], 16000)]
    final = session.finish().text
    ids = full_forward(model, processor, audio)[0].argmax(-1).tolist()
    assert final == processor.tokenizer.decode(ids)
    assert all(isinstance(text, str) for text in texts)


def test_bad_streaming_settings_are_refused_or_warned_about(processor, audio, caplog):
    with pytest.raises(StreamingConfigError, match="chunk_size: streaming needs a chunk of >= 1"):
        streaming_model("conformer").stream(processor, chunk_size=0)
    with pytest.raises(StreamingConfigError, match="causal_conv: this model's depthwise convolutions look ahead"):
        tiny_model("conformer", chunk_size=8).stream(processor)
    with pytest.raises(ConfigValueError, match="merge_method: learned_ave pools each branch over the whole"):
        tiny_model("branchformer", merge_method="learned_ave", chunk_size=8, causal_conv=True)
    with pytest.raises(ConfigValueError, match="chunk_size: must be a whole number"):
        tiny_model("conformer", chunk_size=-4)
    # trained without chunk masks, or streamed with more left context than trained: a measured warning
    with caplog.at_level(logging.WARNING):
        tiny_model("conformer", causal_conv=True).stream(processor, chunk_size=8)
        streaming_model("conformer", num_left_chunks=1).stream(processor, num_left_chunks=4)
    warnings = [record.getMessage() for record in caplog.records]
    assert any("trained with full-context attention (chunk_size 0)" in w and "move by up to" in w for w in warnings)
    assert any("trained with chunk_size 8, num_left_chunks 1" in w and "% of frames" in w for w in warnings)


def test_dynamic_chunk_training_trains_and_then_streams_any_chunk_size(processor, audio):
    model = streaming_model("conformer", "mha", chunk_size=0, dynamic_chunk_training=True).train()
    features = processor(audio, sampling_rate=16000, return_tensors="pt")
    labels = torch.tensor([[5, 6, 7, 8, 9]])
    torch.manual_seed(0)
    losses = [model(**features, labels=labels).loss for _ in range(4)]
    assert all(torch.isfinite(loss) for loss in losses)
    model.eval()
    session = model.stream(processor, chunk_size=7)  # no warning: trained for any chunk size
    streamed = stream_in_pieces(session, audio)
    model.config.chunk_size = 7
    torch.testing.assert_close(streamed, full_forward(model, processor, audio), rtol=0, atol=1e-5)


def test_a_saved_streaming_model_streams_without_mla_convert(tmp_path, processor, audio):
    model = streaming_model("conformer", "mla", chunk_size=6, num_left_chunks=2)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "audio.npy", audio)
    np.save(tmp_path / "expected.npy", stream_in_pieces(model.stream(processor), audio).numpy())
    output = run_without_mla_convert(
        """
        import numpy as np, torch
        from transformers import AutoModelForCTC, AutoProcessor
        model = AutoModelForCTC.from_pretrained("model", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained("model", trust_remote_code=True)
        session = model.stream(processor)
        audio = np.load("audio.npy")
        logits = [session.feed(audio[start : start + 3001]).logits for start in range(0, len(audio), 3001)]
        logits.append(session.finish().logits)
        print(float(np.abs(torch.cat(logits, 1).numpy() - np.load("expected.npy")).max()))
        """,
        cwd=tmp_path,
    )
    assert float(output.strip().splitlines()[-1]) <= 1e-5


def test_the_stream_command_prints_the_transcript_and_the_cache_it_held(tmp_path, processor, audio, capsys):
    import json

    from mla_convert import cli

    model = streaming_model("conformer", "gqa", chunk_size=8, num_left_chunks=2)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _, path, _ = next(iter(librispeech_utterances("dev-clean", limit=1)))
    assert cli.main(["stream", str(tmp_path / "model"), str(path), "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    entry = report["files"][0]
    full = decode_audio(path)
    assert entry["text"] == processor.tokenizer.decode(full_forward(model, processor, full)[0].argmax(-1).tolist())
    assert entry["attention_cache_bytes"] == entry["attention_cache_formula_bytes"] == 4 * 2 * 16 * 64
    assert report["chunk_ms"] == 320 and entry["text"] in capsys.readouterr().out

    tiny_model("conformer", vocab_size=30).save_pretrained(tmp_path / "full-context")  # causal_conv false
    processor.save_pretrained(tmp_path / "full-context")
    assert cli.main(["stream", str(tmp_path / "full-context"), str(path)]) == 2
    assert cli.main(["stream", str(tmp_path / "model"), str(path), "--chunk-size", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mla-convert:")]
    assert [line.split(":")[2].strip() for line in errors] == ["causal_conv", "chunk_size"]
    assert all(line.startswith("mla-convert: error: ") for line in errors)
