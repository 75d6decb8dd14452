"""Log-mel filterbank features of the Conformer / Branchformer CTC models (ESPnet's front end).

``ConformerFeatureExtractor`` reproduces ESPnet2's ``DefaultFrontend`` (``Stft`` + ``LogMel``)
followed by ``GlobalMVN``, in vectorised numpy:

1. ``torch.stft(center=True, pad_mode="reflect", onesided=True, normalized=False)``: the waveform is
   reflect-padded by ``n_fft // 2`` on both sides and cut into frames of ``n_fft`` samples every
   ``hop_length``; a periodic window of ``win_length`` samples, zero-padded (centred) to ``n_fft``,
   multiplies each frame. An utterance of ``n`` samples has ``n // hop_length + 1`` frames.
2. The power spectrum ``re**2 + im**2`` times librosa's mel filterbank (slaney scale, slaney norm).
3. ``clamp(min=log_floor)`` and the natural log.
4. Global mean and variance normalisation ``(x - cmvn_mean) / cmvn_std`` when the statistics are set.

Everything is computed in float64 and returned as float32 ``input_features`` ``[T, feature_size]``
with an ``attention_mask`` (1 = real frame). This file is remote code: it imports only numpy and
transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank, window_function
from transformers.utils import PaddingStrategy, TensorType, logging

logger = logging.get_logger(__name__)


class ConformerFeatureExtractor(SequenceFeatureExtractor):
    r"""ESPnet-compatible log-mel features (``DefaultFrontend`` + ``GlobalMVN``).

    Args:
        feature_size: number of mel bands.
        sampling_rate: the sampling rate the model was trained on, in Hz.
        padding_value: the value of padded frames.
        n_fft: the FFT size (and frame length) in samples.
        win_length: the window length in samples (``<= n_fft``; zero-padded, centred, to ``n_fft``).
        hop_length: the frame shift in samples.
        window: ``"hann"``, ``"hamming"``, ``"povey"`` or ``"boxcar"`` (always periodic, like torch's).
        fmin: lowest mel frequency in Hz.
        fmax: highest mel frequency in Hz; ``None`` is ``sampling_rate / 2``.
        log_floor: power values below it are clamped to it before the log.
        cmvn_mean: ``feature_size`` global means, or ``None`` for no normalisation.
        cmvn_std: ``feature_size`` global standard deviations (with ``cmvn_mean``).
        return_attention_mask: whether ``__call__`` returns the frame mask by default.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        window: str = "hann",
        fmin: float = 0.0,
        fmax: float | None = None,
        log_floor: float = 1e-10,
        cmvn_mean: list[float] | None = None,
        cmvn_std: list[float] | None = None,
        return_attention_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) may not be larger than n_fft ({n_fft})")
        if (cmvn_mean is None) != (cmvn_std is None):
            raise ValueError("cmvn_mean and cmvn_std are set together (or both None)")
        if cmvn_mean is not None and not (len(cmvn_mean) == len(cmvn_std) == feature_size):
            raise ValueError(
                f"cmvn_mean and cmvn_std need {feature_size} values each, got {len(cmvn_mean)} and {len(cmvn_std)}"
            )
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.window = window
        self.fmin = fmin
        self.fmax = fmax
        self.log_floor = log_floor
        self.cmvn_mean = None if cmvn_mean is None else [float(value) for value in cmvn_mean]
        self.cmvn_std = None if cmvn_std is None else [float(value) for value in cmvn_std]
        self.return_attention_mask = return_attention_mask
        # Derived arrays; to_dict leaves them out of preprocessor_config.json.
        self.window_array = window_function(win_length, window, periodic=True, frame_length=n_fft, center=True)
        self.mel_filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=feature_size,
            min_frequency=fmin,
            max_frequency=sampling_rate / 2 if fmax is None else fmax,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("window_array", None)
        output.pop("mel_filters", None)
        output["window"] = self.window  # the base class drops "window", assuming it is an array
        return output

    def num_frames(self, num_samples: int) -> int:
        """Frames of an utterance of ``num_samples`` samples (``torch.stft(center=True)``)."""
        return num_samples // self.hop_length + 1

    def log_mel_spectrogram(self, waveform: np.ndarray) -> np.ndarray:
        """Un-normalised log-mel features ``[frames, feature_size]`` (float64) of one 1-D waveform."""
        waveform = np.asarray(waveform, dtype=np.float64)
        if waveform.ndim != 1:
            raise ValueError(f"expected a 1-D (mono) waveform, got shape {waveform.shape}")
        pad = self.n_fft // 2
        if waveform.shape[0] <= pad:
            raise ValueError(f"a waveform of {waveform.shape[0]} samples is too short: reflect padding needs > {pad}")
        padded = np.pad(waveform, (pad, pad), mode="reflect")
        return self.log_mel_of_frames(np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop_length])

    def log_mel_of_frames(self, frames: np.ndarray) -> np.ndarray:
        """Log-mel features ``[n, feature_size]`` (float64) of ``n`` frames of ``n_fft`` samples
        taken from the reflect-padded waveform (a streaming front end hands them in as they fill)."""
        spectrum = np.fft.rfft(frames * self.window_array, n=self.n_fft, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = power @ self.mel_filters
        return np.log(np.maximum(mel, self.log_floor))

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Global mean and variance normalisation (``GlobalMVN``); unchanged without statistics."""
        if self.cmvn_mean is None:
            return features
        return (features - np.asarray(self.cmvn_mean)) / np.asarray(self.cmvn_std)

    def extract(self, waveform: np.ndarray) -> np.ndarray:
        """Normalised features ``[frames, feature_size]`` (float32) of one 1-D waveform."""
        return self.normalize(self.log_mel_spectrogram(waveform)).astype(np.float32)

    def __call__(
        self,
        raw_speech: np.ndarray | list[float] | list[np.ndarray] | list[list[float]],
        sampling_rate: int | None = None,
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | TensorType | None = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Features of one waveform or a batch of them (a list of 1-D arrays, or a 2-D array).

        ``max_length``, ``truncation`` and ``pad_to_multiple_of`` count frames. Padded frames are
        ``padding_value`` with ``attention_mask`` 0.
        """
        if sampling_rate is None:
            logger.warning(
                f"It is strongly recommended to pass the `sampling_rate` argument to `{type(self).__name__}()`; "
                "failing to do so can result in silent errors."
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"{type(self).__name__} expects audio sampled at {self.sampling_rate} Hz, "
                f"got audio sampled at {sampling_rate} Hz: resample it first"
            )

        is_batched_numpy = isinstance(raw_speech, np.ndarray) and raw_speech.ndim > 1
        if is_batched_numpy and raw_speech.ndim > 2:
            raise ValueError(f"only mono-channel audio is supported, got an array of shape {raw_speech.shape}")
        is_batched = is_batched_numpy or (
            isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and hasattr(raw_speech[0], "__len__")
        )
        if not is_batched:
            raw_speech = [raw_speech]

        features = [self.extract(np.asarray(waveform, dtype=np.float64)) for waveform in raw_speech]
        padded = self.pad(
            BatchFeature({"input_features": features}),
            padding=padding,
            max_length=max_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
        )
        if return_tensors is not None:
            padded = padded.convert_to_tensors(return_tensors)
        return padded


ConformerFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
