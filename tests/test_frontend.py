"""The Conformer / Branchformer front end: ESPnet's log-mel features, CMVN, the CTC tokenizers and
the processor as it loads where mla_convert is not installed (real dev-clean utterances)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import librispeech_utterances, needs_librispeech
from helpers import run_without_mla_convert

from mla_convert.data.audio import decode_audio
from mla_convert.frontend import (
    LIBRISPEECH_CHARACTERS,
    build_processor,
    char_tokenizer,
    char_vocabulary,
    cmvn_statistics,
    tokenizer_from_token_list,
)
from mla_convert.modeling.feature_extraction_conformer import ConformerFeatureExtractor

pytestmark = needs_librispeech


@pytest.fixture(scope="module")
def utterances() -> list[tuple[np.ndarray, str]]:
    """The two shortest dev-clean utterances (about 3 s each) and their transcripts."""
    rows = [(decode_audio(path), text) for _, path, text in librispeech_utterances("dev-clean")]
    return sorted(rows, key=lambda row: len(row[0]))[:2]


def slaney_mel_filters(sampling_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels)`` (slaney scale and norm), ``[n_fft // 2 + 1, n_mels]``."""

    def hz_to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz >= 1000, 15 + np.log(np.maximum(hz, 1e-10) / 1000) / (np.log(6.4) / 27), hz * 3 / 200)

    def mel_to_hz(mel):
        return np.where(mel >= 15, 1000 * np.exp(np.log(6.4) / 27 * (mel - 15)), mel * 200 / 3)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sampling_rate / 2), n_mels + 2))
    ramps = edges[:, None] - np.linspace(0, sampling_rate / 2, n_fft // 2 + 1)[None, :]
    lower = -ramps[:-2] / np.diff(edges)[:-1, None]
    upper = ramps[2:] / np.diff(edges)[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T


def espnet_log_mel(audio: np.ndarray) -> np.ndarray:
    """ESPnet's DefaultFrontend(fs=16000, n_fft=512, win_length=400, hop_length=160), in float64."""
    window = torch.hann_window(400, dtype=torch.float64)  # periodic, centred in the 512-sample frame by torch
    spectrum = torch.stft(
        torch.from_numpy(audio).double(), n_fft=512, hop_length=160, win_length=400, window=window,
        center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
    )  # fmt: skip
    power = spectrum.real**2 + spectrum.imag**2  # [freq, frames]
    mel = power.T @ torch.from_numpy(slaney_mel_filters(16000, 512, 80))
    return torch.clamp(mel, min=1e-10).log().numpy()


def test_features_are_espnets_log_mel_filterbank(utterances):
    audio, _ = utterances[0]
    features = ConformerFeatureExtractor()(audio, sampling_rate=16000)["input_features"][0]
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, espnet_log_mel(audio), rtol=0, atol=1e-5)


def test_an_utterance_has_one_frame_per_hop_plus_one():
    extractor = ConformerFeatureExtractor()
    rng = np.random.default_rng(0)
    for samples in (16000, 16159, 16160, 16161):
        batch = extractor(rng.standard_normal(samples).astype(np.float32), sampling_rate=16000)
        assert batch["input_features"].shape == (1, samples // 160 + 1, 80)
        assert batch["attention_mask"].tolist() == [[1] * (samples // 160 + 1)]


def test_a_padded_batch_holds_each_utterance_as_it_is_alone(utterances):
    extractor = ConformerFeatureExtractor(padding_value=-1.0)
    (long, _), (short, _) = sorted(utterances, key=lambda row: -len(row[0]))
    batch = extractor([long, short], sampling_rate=16000, return_tensors="pt")
    assert batch["input_features"].dtype == torch.float32 and batch["input_features"].shape[-1] == 80
    for row, audio in enumerate((long, short)):
        alone = extractor(audio, sampling_rate=16000)["input_features"][0]
        frames = len(alone)
        np.testing.assert_array_equal(batch["input_features"][row, :frames].numpy(), alone)
        assert (batch["input_features"][row, frames:] == -1.0).all()
        assert batch["attention_mask"][row].tolist() == [1] * frames + [0] * (batch["attention_mask"].shape[1] - frames)
    assert len(long) // 160 + 1 > len(short) // 160 + 1  # the short one really was padded


def test_cmvn_statistics_normalise_their_data_to_zero_mean_and_unit_variance(utterances):
    audios = [audio for audio, _ in utterances]
    mean, std = cmvn_statistics(audios, ConformerFeatureExtractor())
    assert len(mean) == len(std) == 80
    normalised = ConformerFeatureExtractor(cmvn_mean=mean, cmvn_std=std)
    frames = np.concatenate([normalised(audio, sampling_rate=16000)["input_features"][0] for audio in audios])
    np.testing.assert_allclose(frames.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(frames.std(axis=0), 1.0, atol=1e-4)


def ctc_path(ids: list[int]) -> list[int]:
    """A greedy CTC output for target ``ids``: each repeated over two frames, then a blank."""
    return [frame for token in ids for frame in (token, token, 0)]


def test_char_tokenizer_gives_ctc_targets_and_decodes_ctc_output(utterances, tmp_path):
    text = utterances[0][1]
    vocabulary = char_vocabulary([text])
    assert vocabulary[:3] == ["<blank>", "<unk>", "|"] and set(LIBRISPEECH_CHARACTERS) <= set(vocabulary)
    tokenizer = char_tokenizer(vocabulary, tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == {token: i for i, token in enumerate(vocabulary)}
    targets = tokenizer(text).input_ids
    assert targets == [vocabulary.index("|" if char == " " else char) for char in text]
    assert tokenizer.batch_decode([ctc_path(targets), [0, 0]]) == [text, ""]


def test_espnet_token_lists_keep_their_ids():
    characters = ["<blank>", "<unk>", "<space>", "E", "T", "L", "H", "O", "W", "R", "D", "'", "<sos/eos>"]
    tokenizer = tokenizer_from_token_list(characters)
    assert len(tokenizer) == tokenizer.vocab_size == len(characters)
    targets = tokenizer("HELLO WORLD'").input_ids
    assert targets == [characters.index("<space>" if char == " " else char) for char in "HELLO WORLD'"]
    sos_eos = characters.index("<sos/eos>")
    assert tokenizer.batch_decode([ctc_path(targets) + [sos_eos], [sos_eos, 3]]) == ["HELLO WORLD'", "E"]

    pieces = ["<blank>", "<unk>", "\u2581", "S", "\u2581THE", "\u2581CAT", "<sos/eos>"]
    tokenizer = tokenizer_from_token_list(pieces)
    assert len(tokenizer) == len(pieces)
    assert tokenizer.batch_decode([[4, 4, 0, 5, 3, 6, 2, 3]]) == ["THE CATS S"]  # as sentencepiece detokenises


def test_wrong_sampling_rate_is_refused_naming_both_rates():
    with pytest.raises(ValueError, match=r"16000.*8000"):
        ConformerFeatureExtractor()(np.zeros(8000, dtype=np.float32), sampling_rate=8000)


def test_saved_processor_loads_without_mla_convert_and_gives_the_same_features(utterances, tmp_path):
    audio, text = utterances[0]
    vocabulary = char_vocabulary([text])
    processor = build_processor(vocabulary, *cmvn_statistics([audio], ConformerFeatureExtractor()), fmax=7600.0)
    processor.save_pretrained(tmp_path / "processor")
    np.save(tmp_path / "audio.npy", audio)
    features = processor(audio, sampling_rate=16000)["input_features"][0]
    targets = processor.tokenizer(text).input_ids
    run_without_mla_convert(
        f"""
        import numpy as np
        try:
            import mla_convert
            raise SystemExit("mla_convert is importable")
        except ImportError:
            pass
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained("processor", trust_remote_code=True)
        extractor = processor.feature_extractor
        assert type(extractor).__name__ == "ConformerFeatureExtractor", type(extractor)
        assert (extractor.fmax, extractor.n_fft, extractor.window) == (7600.0, 512, "hann")
        np.save("reloaded.npy", processor(np.load("audio.npy"), sampling_rate=16000)["input_features"][0])
        assert processor.batch_decode([{[frame for t in targets for frame in (t, 0)]}]) == [{text!r}]
        """,
        cwd=tmp_path,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "reloaded.npy"), features)
