"""``mla-convert evaluate``: word and character error rates of speech recognisers on LibriSpeech.

One run evaluates several models on several splits and writes two files:

* ``NAME.jsonl``, the journal: a header line, then one line per scored utterance (normalised
  reference and hypothesis, error counts), flushed and fsynced after every batch. A killed run
  restarted with the same command reads it, skips the utterances it holds and goes on; a torn last
  line is ignored.
* ``NAME.json``, written once at the end (temp file + rename): per model and split, totals
  recomputed from the journal (WER, CER, S/D/I, audio and wall seconds, real-time factor, peak
  memory, attention spec and K/V-state bytes per frame of converted models, ...).

Everything cheap (data, splits, limit, batch size, output, model configs, calibration overlap with
the splits) is checked before a model is loaded. A batch that runs out of memory is halved and
retried; converted models run their saved remote code unless the installed classes are asked for.

Audio comes from :func:`mla_convert.data.librispeech` (a streaming ``IterableDataset``); a
background thread decodes it and builds the model inputs ahead of the model, in batches sorted by
length within a bounded buffer. Wall seconds run from the first audio read to the last batch scored
(model loading excluded), shared out per utterance in the journal, so a resumed run adds up too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import (
    check_local_split,
    check_split,
    count_utterances,
    librispeech,
    resolve_source,
    source_label,
    split_ids,
)
from .errors import MlaConvertError, ModelNotFoundError, UnsupportedModelError
from .io import atomic_file, transformers_progress_bars
from .normalize import normalizer_for

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1
DEFAULT_BATCH_SIZE = 16
DEFAULT_SPLITS = ("test-clean", "test-other")
BUFFER_BATCHES = 8
# Greedy seq2seq decoding stops at min(model limit, BASE + RATE * longest audio seconds in the batch)
# new tokens: ~3x the fastest LibriSpeech speech, so only a looping decoder reaches it.
MAX_NEW_TOKENS_BASE = 24
MAX_NEW_TOKENS_PER_SECOND = 12
CONVERSION_REPORT = "conversion_report.json"
# RuntimeError messages of a failed allocation (CPU: Linux / Windows; other backends)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


class EvaluationError(MlaConvertError):
    """Bad evaluation request: wrong device, conflicting output files, damaged journal..."""


class NotSpeechRecognitionError(UnsupportedModelError):
    """The model has no CTC or sequence-to-sequence speech recognition head."""


# --------------------------------------------------------------------------------------------- models


@dataclass
class Transcripts:
    texts: list[str]
    generated_tokens: list[int] | None = None
    hit_limit: list[bool] | None = None
    max_new_tokens: int | None = None
    truncated: list[bool] | None = None


@dataclass
class ASRModel:
    """A loaded recogniser: model, processor, the text normaliser for its kind, and what to report."""

    model_id: str
    path: str
    kind: str  # "ctc" | "seq2seq"
    model: Any
    feature_extractor: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    normalizer: str
    normalize: Callable[[str], str]
    info: dict = field(default_factory=dict)
    # output frames per utterance of the batch being run, for the padding guards (CTC only)
    _frame_lengths: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def sampling_rate(self) -> int:
        return int(getattr(self.feature_extractor, "sampling_rate", 16000) or 16000)

    @property
    def uses_attention_mask(self) -> bool:
        """Pass the padding mask to the model only where the feature extractor asks for it."""
        return bool(getattr(self.feature_extractor, "return_attention_mask", False))

    @property
    def _fixed_length_features(self) -> bool:
        """Whisper-style extractors pad every input to a fixed window (30 s) themselves."""
        return hasattr(self.feature_extractor, "n_samples") and hasattr(self.feature_extractor, "nb_max_frames")

    def prepare(self, audios: Sequence[np.ndarray]) -> dict[str, Any]:
        """Model inputs for one batch, on the CPU (runs in the prefetch thread)."""
        kwargs: dict[str, Any] = {"sampling_rate": self.sampling_rate, "return_tensors": "pt"}
        if not self._fixed_length_features:
            kwargs["padding"] = True
        # the mask is always computed (per-utterance normalisation, CTC output lengths) ...
        inputs = dict(self.feature_extractor(list(audios), return_attention_mask=True, **kwargs))
        mask = inputs.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(-1)
        elif self.model.main_input_name == "input_values":
            lengths = torch.tensor([len(audio) for audio in audios])
        else:
            lengths = None
        # ... but only handed to the model where the extractor asks for it
        if not self.uses_attention_mask:
            inputs.pop("attention_mask", None)
        window = getattr(self.feature_extractor, "n_samples", None) if self._fixed_length_features else None
        return {
            "inputs": inputs,
            "lengths": lengths,
            "max_seconds": min(max(len(a) for a in audios), window or math.inf) / self.sampling_rate,
            # Whisper-style extractors cut audio to their window (30 s); long-form decoding needs timestamp tokens
            "truncated": [bool(window) and len(a) > window for a in audios] if window else None,
        }

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        moved = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            moved[name] = value
        return moved

    @torch.inference_mode()
    def transcribe(self, prepared: dict[str, Any]) -> Transcripts:
        inputs = self._to_device(prepared["inputs"])
        if self.kind == "ctc":
            return self._ctc(inputs, prepared["lengths"])
        result = self._generate(inputs, prepared["max_seconds"])
        result.truncated = prepared.get("truncated")
        return result

    def _output_lengths(self, lengths: torch.Tensor | None) -> torch.Tensor | None:
        if lengths is None or not hasattr(self.model, "_get_feat_extract_output_lengths"):
            return None
        try:
            return torch.as_tensor(self.model._get_feat_extract_output_lengths(lengths)).long().cpu()
        except Exception:  # a model whose helper needs other arguments: decode every frame
            return None

    def _ctc(self, inputs: dict[str, Any], lengths: torch.Tensor | None) -> Transcripts:
        frames = self._output_lengths(lengths)
        guard = frames is not None and self.uses_attention_mask and len(set(frames.tolist())) > 1
        self._frame_lengths = frames if guard else None
        try:
            logits = self.model(**inputs).logits
        finally:
            self._frame_lengths = None
        ids = logits.argmax(dim=-1).cpu()
        counts = frames.tolist() if frames is not None else [ids.shape[1]] * ids.shape[0]
        rows = [ids[i, : max(1, min(n, ids.shape[1]))].tolist() for i, n in enumerate(counts)]
        return Transcripts(texts=self.tokenizer.batch_decode(rows))

    def install_padding_guards(self) -> int:
        """Zero padded frames before every conformer depthwise convolution.

        transformers' wav2vec2-conformer masks padding in attention but not in the convolution
        module, whose depthwise kernel (31 frames in the released checkpoints) leaks the padded
        frames into the last valid ones, a little further with every layer: a batched utterance
        would get different logits than the same utterance alone. With the padded frames zeroed,
        the kernel sees exactly the zero padding of the unbatched run. Returns the hooks installed.
        """
        count = 0
        for module in self.model.modules():
            depthwise = getattr(module, "depthwise_conv", None)
            if isinstance(depthwise, torch.nn.Conv1d) and type(module).__name__.endswith("ConvolutionModule"):
                depthwise.register_forward_pre_hook(self._zero_padded_frames)
                count += 1
        return count

    def _zero_padded_frames(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        lengths = getattr(self, "_frame_lengths", None)
        if lengths is None or not args or args[0].dim() != 3 or args[0].shape[0] != len(lengths):
            return None
        hidden = args[0]  # (batch, channels, frames)
        keep = torch.arange(hidden.shape[-1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
        return (hidden * keep[:, None, :].to(hidden.dtype), *args[1:])

    def max_new_tokens(self, max_seconds: float) -> int:
        config = self.model.config
        generation = getattr(self.model, "generation_config", None)
        limit = getattr(config, "max_target_positions", None) or getattr(generation, "max_length", None) or 448
        limit = max(1, int(limit) - 4)  # room for the decoder prompt (Whisper: up to 4 tokens)
        return min(limit, MAX_NEW_TOKENS_BASE + math.ceil(MAX_NEW_TOKENS_PER_SECOND * max_seconds))

    @property
    def _whisper_like(self) -> bool:
        return hasattr(getattr(self.model, "generation_config", None), "no_timestamps_token_id")

    def _generate(self, inputs: dict[str, Any], max_seconds: float) -> Transcripts:
        """Greedy ``generate()`` on the batch's inputs (``input_features`` for Whisper), as any user calls it."""
        max_new = self.max_new_tokens(max_seconds)
        with _quiet_transformers():
            sequences = self.model.generate(**inputs, max_new_tokens=max_new, num_beams=1, do_sample=False)
        if not isinstance(sequences, torch.Tensor):
            sequences = sequences["sequences"]
        sequences = sequences.cpu()
        eos = _token_ids(getattr(self.model.generation_config, "eos_token_id", None))
        # Whisper's generate() strips its decoder prompt; other encoder-decoders return the start token
        strips_prompt = self._whisper_like
        generated, hit = [], []
        for row in sequences.tolist():
            if not strips_prompt and row:
                row = row[1:]
            stop = next((i for i, token in enumerate(row) if token in eos), None)
            count = len(row) if stop is None else stop + 1
            generated.append(count)
            hit.append(stop is None and count >= max_new)
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return Transcripts(texts=texts, generated_tokens=generated, hit_limit=hit, max_new_tokens=max_new)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _token_ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


@contextlib.contextmanager
def _quiet_transformers():
    """generate() warns about settings we chose on purpose (no decoder mask for fixed-size inputs...)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise EvaluationError(f"unknown device {device!r} (use auto, cpu or cuda)") from error


def asr_kind(config, model_id: str) -> str:
    """``"ctc"`` or ``"seq2seq"`` from the config's architectures; a one-line error for anything else."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CTC_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    remote = {auto: str(target).rsplit(".", 1)[-1] for auto, target in auto_map.items() if isinstance(target, str)}
    ctc_names = set(MODEL_FOR_CTC_MAPPING_NAMES.values())
    seq2seq_names = set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values())
    for name in architectures:
        if name in ctc_names or name.endswith("ForCTC") or remote.get("AutoModelForCTC") == name:
            return "ctc"
        if name in seq2seq_names or remote.get("AutoModelForSpeechSeq2Seq") == name:
            return "seq2seq"
    model_type = getattr(config, "model_type", None)
    if not architectures:
        if getattr(config, "is_encoder_decoder", False) and model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
            return "seq2seq"
        if model_type in MODEL_FOR_CTC_MAPPING_NAMES and getattr(config, "vocab_size", None):
            return "ctc"
    raise NotSpeechRecognitionError(
        f"{model_id} is not a speech recognition model: no CTC or sequence-to-sequence head "
        f"(model_type {model_type!r}, architectures {architectures or 'none'})"
    )


def _from_pretrained(loader, source: str, model_id: str, what: str, **kwargs):
    """Cache or local files first; the Hub only when it is allowed and reachable."""
    from .loading import hub_offline, hub_reachable

    local = Path(source).expanduser().exists()
    source = str(Path(source).expanduser()) if local else source
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        first = error
    if not local and not hub_offline() and hub_reachable():
        try:
            return loader.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            first = error
    raise ModelNotFoundError(f"cannot load the {what} of {model_id!r}: {_first_line(first)}") from first


def _revision(config, path: str) -> str | None:
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    provenance = Path(path) / "ct2_import.json"
    if provenance.is_file():
        with contextlib.suppress(OSError, ValueError):
            source = json.loads(provenance.read_text(encoding="utf-8")).get("source", {})
            return f"ct2:{source.get('model_bin')}@{source.get('mtime_ns')}"
    return None


def check_model(model_id: str) -> tuple[str, Any, str]:
    """``(local path or Hub id, config, kind)`` without loading weights: a one-line error for an
    unknown id or path, or a model that is not a speech recogniser."""
    from .loading import load_config

    path = model_id
    if model_id.startswith("bundled:"):
        try:
            from .ct2 import resolve_bundled
        except ImportError as error:
            raise ModelNotFoundError(f"{model_id}: bundled models need mla_convert.ct2 ({error})") from error
        path = resolve_bundled(model_id)
    config = load_config(path)
    return path, config, asr_kind(config, model_id)


def is_converted(config) -> bool:
    """A model converted by this toolkit: its config holds a non-empty ``attention_conversion``
    (converted Whisper keeps ``model_type`` ``whisper``, so the model type cannot tell)."""
    conversion = getattr(config, "attention_conversion", None)
    return isinstance(conversion, dict) and bool(conversion)


def _remote_code_reference(config, loader_name: str, model_id: str) -> str:
    """The ``auto_map`` entry (``module.Class``) of a converted model's saved remote code."""
    auto_map = getattr(config, "auto_map", None) or {}
    reference = auto_map.get(loader_name)
    if not isinstance(reference, str):
        architectures = set(getattr(config, "architectures", None) or [])
        reference = next(
            (ref for ref in auto_map.values() if isinstance(ref, str) and ref.rsplit(".", 1)[-1] in architectures),
            None,
        )
    if reference is None:
        raise EvaluationError(
            f"{model_id}: its config.json names no saved remote code for {loader_name} (auto_map); "
            "evaluate it with the installed mla_convert classes (--installed-classes)"
        )
    return reference


def _remote_code_file(reference: str) -> str:
    """``modeling_x.py`` of an ``auto_map`` reference (``[repo--]modeling_x.ClassName``)."""
    return reference.split("--")[-1].rsplit(".", 1)[0] + ".py"


def _load_remote_code_class(reference: str, path: str, model_id: str) -> type:
    """The model class defined by the saved ``.py`` files (what ``trust_remote_code=True`` runs).

    ``AutoModel*.from_pretrained(trust_remote_code=True)`` prefers classes registered in this
    process over remote code, and importing mla_convert registers its own: the class is therefore
    taken from the saved module with transformers' public ``get_class_from_dynamic_module``, the
    function ``trust_remote_code`` loading itself uses.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    local = Path(path).expanduser()
    if local.is_dir() and not (local / _remote_code_file(reference)).is_file():
        raise EvaluationError(
            f"{model_id}: the saved remote code {_remote_code_file(reference)} is missing; "
            "evaluate it with the installed mla_convert classes (--installed-classes)"
        )
    source = str(local) if local.exists() else path
    try:
        return get_class_from_dynamic_module(reference, source, local_files_only=local.exists())
    except (OSError, ValueError, ImportError, AttributeError) as error:
        raise ModelNotFoundError(f"cannot load the saved remote code of {model_id!r}: {_first_line(error)}") from error


def _installed_class(config, model_id: str) -> type:
    from .loading import model_class_for

    cls = model_class_for(config)
    if not cls.__module__.startswith("mla_convert."):
        names = getattr(config, "architectures", None)
        raise EvaluationError(f"{model_id}: no installed mla_convert class for the architectures {names}")
    return cls


def conversion_report(path: str) -> dict | None:
    """The ``conversion_report.json`` saved with a converted model (a local directory, or a Hub id's
    cached files); ``None`` when there is none."""
    local = Path(path).expanduser()
    file: Path | None = None
    if local.is_dir():
        file = local / CONVERSION_REPORT
    elif not local.exists():
        with contextlib.suppress(Exception):  # not a valid repo id, no cache: no report
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, CONVERSION_REPORT)
            file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{file} is not readable JSON: {_first_line(error)}") from error
    return report if isinstance(report, dict) else None


def calibrated_ids(report: dict | None) -> frozenset[str]:
    """Utterances a conversion saw: fitted on (``calibration_ids``) or measured on (``held_out_ids``)."""
    if not report:
        return frozenset()
    return frozenset(str(i) for key in ("calibration_ids", "held_out_ids") for i in report.get(key) or [])


class CalibrationOverlapError(EvaluationError):
    """The split to score holds utterances the model was calibrated on."""


def _overlap_error(model_id: str, split: str, overlap: Sequence[str]) -> CalibrationOverlapError:
    return CalibrationOverlapError(
        f"{model_id} was calibrated on {len(overlap)} utterance(s) of {split} (e.g. {sorted(overlap)[0]}, "
        f"in its {CONVERSION_REPORT}): scoring it there would be biased; evaluate it on another split"
    )


def check_not_calibrated_on(
    model_id: str, report: dict | None, split: str, source: str | Path, limit: int | None = None
) -> None:
    """Refuse (one line) a split holding utterances the model's conversion was calibrated on. Local
    data: the split's ids are compared; the Hub: a model calibrated on ``hub`` (dev-clean) is refused
    dev-clean, and the stream is checked as it is read."""
    seen = calibrated_ids(report)
    if not seen:
        return
    ids = split_ids(split, source, limit)
    if ids is not None:
        overlap = [i for i in ids if i in seen]
        if overlap:
            raise _overlap_error(model_id, split, overlap)
    elif split == "dev-clean" and "hub" in (report.get("calibration_sources") or []):
        raise _overlap_error(model_id, split, sorted(seen))


def load_asr_model(
    model_id: str, device: str | torch.device = "auto", fp16: bool = False, *, remote_code: bool = True
) -> ASRModel:
    """Load a CTC (``AutoModelForCTC``) or seq2seq (``AutoModelForSpeechSeq2Seq``) model + processor.

    ``bundled:...`` ids go through :func:`mla_convert.ct2.resolve_bundled`. Models converted by this
    toolkit (a non-empty ``attention_conversion`` in the config) run their saved remote code (the
    ``.py`` files beside the weights, as ``trust_remote_code=True`` users get) when ``remote_code``,
    else the installed mla_convert classes; ``info["classes"]`` says which.
    """
    from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoProcessor

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = torch.float16 if fp16 else torch.float32
    path, config, kind = check_model(model_id)
    converted = is_converted(config)
    processor = _from_pretrained(AutoProcessor, path, model_id, "processor (feature extractor + tokenizer)")
    feature_extractor = getattr(processor, "feature_extractor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if feature_extractor is None or tokenizer is None:
        raise ModelNotFoundError(
            f"{model_id} has no complete processor: speech recognition needs a feature extractor and a tokenizer"
        )
    auto_loader = AutoModelForCTC if kind == "ctc" else AutoModelForSpeechSeq2Seq
    if converted and remote_code:
        reference = _remote_code_reference(config, auto_loader.__name__, model_id)
        loader: Any = _load_remote_code_class(reference, path, model_id)
        classes = f"saved remote code ({_remote_code_file(reference)})"
    elif converted:
        loader, classes = _installed_class(config, model_id), "installed mla_convert"
    else:
        loader, classes = auto_loader, "transformers"
    model = _from_pretrained(loader, path, model_id, "weights", dtype=dtype)
    model = model.to(device).eval()
    name, normalize = normalizer_for(kind, tokenizer)
    info = {
        "model": model_id,
        "path": str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path,
        "revision": _revision(config, path),
        "kind": kind,
        "architecture": type(model).__name__,
        "classes": classes,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "normalizer": name,
        "sampling_rate": int(getattr(feature_extractor, "sampling_rate", 16000) or 16000),
        "attention_mask": bool(getattr(feature_extractor, "return_attention_mask", False)),
    }
    info.update(attention_report(model.config, dtype))
    if converted:
        info["calibration_utterances"] = len(calibrated_ids(conversion_report(path)))
    asr = ASRModel(
        model_id, info["path"], kind, model, feature_extractor, tokenizer, device, dtype, name, normalize, info
    )
    if kind == "ctc" and asr.uses_attention_mask:
        asr.info["padding_guards"] = asr.install_padding_guards()
    return asr


# ------------------------------------------------------------------------------- K/V state of a model


def _attention_layers(config) -> dict[str, tuple[str, int, int]]:
    """Every attention module of a host model: path -> (role, hidden size, heads)."""
    layers: dict[str, tuple[str, int, int]] = {}
    if getattr(config, "decoder_layers", None) and getattr(config, "d_model", None):  # Whisper-style
        hidden = int(config.d_model)
        enc_heads, dec_heads = int(config.encoder_attention_heads), int(config.decoder_attention_heads)
        for i in range(int(config.encoder_layers)):
            layers[f"encoder.layers.{i}.self_attn"] = ("encoder", hidden, enc_heads)
        for i in range(int(config.decoder_layers)):
            layers[f"decoder.layers.{i}.self_attn"] = ("decoder", hidden, dec_heads)
            layers[f"decoder.layers.{i}.encoder_attn"] = ("cross", hidden, dec_heads)
    elif getattr(config, "hidden_size", None) and getattr(config, "num_hidden_layers", None):
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        for i in range(int(config.num_hidden_layers)):
            layers[f"encoder.layers.{i}.self_attn"] = ("encoder", hidden, heads)
    return layers


def _state_values(layer: dict | None, hidden: int, heads: int) -> int:
    if not layer:
        return 2 * hidden  # unconverted multi-head attention: K and V
    variant = layer.get("attention")
    if variant == "mla":
        return int(layer["latent_dim"])
    if variant == "gqa":
        return 2 * int(layer["kv_heads"]) * (hidden // heads)
    if variant == "linear":
        return 0
    return 2 * hidden


def attention_report(config, dtype: torch.dtype = torch.float32) -> dict:
    """Attention spec and K/V-state bytes per frame of a converted model; nulls for any other model.

    Per layer: MLA ``latent_dim``, GQA ``2·kv_heads·head_dim``, linear 0 (its state is a fixed
    per-head sum), unconverted MHA ``2·hidden``; times the dtype's bytes, summed over layers (and
    per role: for Whisper, encoder frames and decoder tokens are different positions).
    """
    conversion = getattr(config, "attention_conversion", None)
    if not isinstance(conversion, dict) or not conversion:
        return {"attention": None, "kv_state_bytes_per_frame": None}
    itemsize = torch.empty((), dtype=dtype).element_size()
    converted = conversion.get("layers") or {}
    layers = _attention_layers(config)
    for path in converted:
        if path not in layers:  # a layer this table does not know: count it on its own
            hidden = int(getattr(config, "d_model", None) or getattr(config, "hidden_size", 0))
            heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "decoder_attention_heads", 1))
            layers[path] = (path.split(".", 1)[0], hidden, heads)
    total = mha = 0
    by_role: dict[str, int] = {}
    for path, (role, hidden, heads) in layers.items():
        values = _state_values(converted.get(path), hidden, heads)
        total += values * itemsize
        mha += 2 * hidden * itemsize
        by_role[role] = by_role.get(role, 0) + values * itemsize
    return {
        "attention": conversion.get("spec"),
        "converted_layers": len(converted),
        "kv_state_bytes_per_frame": total,
        "kv_state_bytes_per_frame_mha": mha,
        "kv_state_bytes_per_frame_by_role": by_role,
    }


# -------------------------------------------------------------------------------------------- scoring


def score(reference: str, hypothesis: str) -> dict[str, int]:
    """Word and character edit counts of one normalised pair (jiwer)."""
    import jiwer

    counts: dict[str, int] = {}
    if reference:
        words = jiwer.process_words(reference, hypothesis)
        chars = jiwer.process_characters(reference, hypothesis)
        counts.update(
            substitutions=words.substitutions,
            deletions=words.deletions,
            insertions=words.insertions,
            hits=words.hits,
            char_substitutions=chars.substitutions,
            char_deletions=chars.deletions,
            char_insertions=chars.insertions,
            char_hits=chars.hits,
        )
    else:
        counts.update(substitutions=0, deletions=0, insertions=len(hypothesis.split()), hits=0)
        counts.update(char_substitutions=0, char_deletions=0, char_insertions=len(hypothesis), char_hits=0)
    counts["reference_words"] = counts["substitutions"] + counts["deletions"] + counts["hits"]
    counts["reference_chars"] = counts["char_substitutions"] + counts["char_deletions"] + counts["char_hits"]
    counts["word_errors"] = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    counts["char_errors"] = counts["char_substitutions"] + counts["char_deletions"] + counts["char_insertions"]
    return counts


def _rate(errors: int, total: int) -> float | None:
    return errors / total if total else None


def totals(records: Iterable[dict]) -> dict[str, Any]:
    """Split totals recomputed from journal records of one model and split."""
    utterances = [r for r in records if r.get("type") == "utterance"]
    summed = {
        key: sum(int(r[key]) for r in utterances)
        for key in (
            "substitutions",
            "deletions",
            "insertions",
            "hits",
            "reference_words",
            "word_errors",
            "char_substitutions",
            "char_deletions",
            "char_insertions",
            "reference_chars",
            "char_errors",
        )
    }
    audio = sum(float(r["duration"]) for r in utterances)
    wall = sum(float(r["seconds"]) for r in utterances)
    limits = [bool(r["hit_generation_limit"]) for r in utterances if r.get("hit_generation_limit") is not None]
    with_window = [r for r in utterances if "truncated" in r]
    return {
        "wer": _rate(summed["word_errors"], summed["reference_words"]),
        "cer": _rate(summed["char_errors"], summed["reference_chars"]),
        "utterances": len(utterances),
        "unreadable": sum(1 for r in records if r.get("type") == "unreadable"),
        "audio_seconds": audio,
        "wall_seconds": wall,
        "real_time_factor": wall / audio if audio else None,
        **summed,
        # seq2seq only (null for CTC): utterances whose generation stopped at max_new_tokens
        "generation_limit_hits": sum(limits) if limits else None,
        # fixed-window models (Whisper: 30 s) only: longer utterances were scored on their first 30 s
        "truncated_utterances": sum(bool(r["truncated"]) for r in with_window) if with_window else None,
    }


_HF_WER: Any = None


def _hf_wer_script_cached() -> bool:
    """Whether ``evaluate.load("wer")`` can work offline: its script is in the modules cache (checked
    without importing ``evaluate``, which alone takes seconds)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    modules = Path(os.environ.get("HF_MODULES_CACHE") or Path(home) / "modules").expanduser()
    return any((modules / "evaluate_modules" / "metrics").glob("*--wer/*/wer.py"))


def hf_evaluate_wer(references: list[str], hypotheses: list[str]) -> float | None:
    """The ``evaluate`` library's WER where its metric script loads offline (cache); never required."""
    global _HF_WER
    if _HF_WER is False or not references:
        return None
    if _HF_WER is None:
        from .loading import hub_offline, hub_reachable

        _HF_WER = False
        if (not hub_offline() and hub_reachable(timeout=2.0)) or _hf_wer_script_cached():
            try:
                import evaluate as hf_evaluate

                with _quiet_transformers():
                    _HF_WER = hf_evaluate.load("wer")
            except Exception as error:  # missing script, offline, network: all mean "not available"
                logger.info("evaluate's wer metric is not available: %s", _first_line(error))
    if _HF_WER is False:
        return None
    try:
        return float(_HF_WER.compute(references=references, predictions=hypotheses))
    except Exception:
        return None


# -------------------------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSON lines; every ``append`` is flushed and fsynced, a torn last line is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None
        self.scored = 0  # utterance and unreadable records appended by this process

    def read(self) -> list[dict]:
        """All complete records. Bytes after the last newline are a torn write: cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        records = []
        for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise EvaluationError(f"{self.path} line {number} is not JSON: the journal is damaged") from None
        if complete < len(data):
            logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(data) - complete)
            with open(self.path, "r+b") as file:
                file.truncate(complete)
        return records

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.scored += sum(1 for r in records if r.get("type") in {"utterance", "unreadable"})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _run_config(models: Sequence[str], splits: Sequence[str], data: str, limit: int | None, fp16: bool) -> dict:
    return {"models": list(models), "splits": list(splits), "data": data, "limit": limit, "fp16": bool(fp16)}


def _journal_path(output: Path) -> Path:
    return output.with_suffix(".jsonl")


def _header(records: list[dict]) -> dict | None:
    return records[0] if records and records[0].get("type") == "run" else None


def default_output(config: dict, results_dir: str | Path = "results") -> Path:
    """``results/eval-<timestamp>.json``, or the unfinished run of the same command to resume."""
    results_dir = Path(results_dir)
    for journal in sorted(results_dir.glob("eval-*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True):
        output = journal.with_suffix(".json")
        if output.exists():
            continue
        try:
            with open(journal, encoding="utf-8") as file:
                header = json.loads(file.readline() or "{}")
        except (OSError, ValueError):
            continue
        if header.get("type") == "run" and header.get("config") == config:
            return output
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    output = results_dir / f"eval-{stamp}.json"
    counter = 1
    while output.exists() or _journal_path(output).exists():
        counter += 1
        output = results_dir / f"eval-{stamp}-{counter}.json"
    return output


def _write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ batching and prefetch


def length_sorted_batches(rows: Iterable[dict], batch_size: int, buffer_size: int) -> Iterator[list[dict]]:
    """Batches of similar length: fill a bounded buffer, sort it (longest first), cut it into batches."""
    buffer: list[dict] = []

    def flush() -> Iterator[list[dict]]:
        buffer.sort(key=lambda row: len(row["audio"]), reverse=True)
        for start in range(0, len(buffer), batch_size):
            yield buffer[start : start + batch_size]
        buffer.clear()

    for row in rows:
        buffer.append(row)
        if len(buffer) >= max(buffer_size, batch_size):
            yield from flush()
    if buffer:
        yield from flush()


class Prefetcher:
    """Run a producer iterator in a background thread, ``depth`` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, producer: Callable[[], Iterator[Any]], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(producer,), name="mla-convert-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, producer: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in producer():
                if not self._put(("item", item)):
                    return
            self._put(("done", None))
        except BaseException as error:  # handed to the consumer, raised there
            self._put(("error", error))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, item = self._queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------- peak memory


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as file:  # resets VmHWM (Linux)
            file.write("5")


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process_peak_rss"
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
    except (ImportError, OSError):
        return None, "unknown"


# ----------------------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    errors: int = 0
    words: int = 0

    def add(self, record: dict) -> None:
        self.errors += int(record["word_errors"])
        self.words += int(record["reference_words"])

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0


def _progress_bar(total: int | None, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="utt", disable=not enabled, dynamic_ncols=True)


def utterance_records(
    asr: ASRModel, rows: Sequence[dict], result: Transcripts, split: str, seconds: float
) -> list[dict]:
    """One scored journal record per utterance of a transcribed batch (normalised text, jiwer counts)."""
    records = []
    for index, row in enumerate(rows):
        reference, hypothesis = asr.normalize(row["text"]), asr.normalize(result.texts[index])
        record = {
            "type": "utterance",
            "model": asr.model_id,
            "split": split,
            "id": row["id"],
            "reference": reference,
            "hypothesis": hypothesis,
            "transcript": result.texts[index],  # as the model wrote it, before normalisation
            **score(reference, hypothesis),
            "duration": round(float(row["duration"]), 6),
            "seconds": seconds,
        }
        if result.hit_limit is not None:
            record["generated_tokens"] = result.generated_tokens[index]
            record["hit_generation_limit"] = bool(result.hit_limit[index])
            record["max_new_tokens"] = result.max_new_tokens
        if result.truncated is not None:
            record["truncated"] = bool(result.truncated[index])
        records.append(record)
    return records


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError``, ``MemoryError``, or a ``RuntimeError`` whose
    message says memory could not be allocated (``DefaultCPUAllocator: can't allocate memory``...)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def transcribe_splitting_on_oom(
    asr: ASRModel, rows: Sequence[dict], prepared: dict[str, Any], on_split: Callable[[int, int, str], None]
) -> list[tuple[list[dict], Transcripts]]:
    """``[(rows, transcripts)]`` of one batch: out of memory, the batch is halved and each half run
    again (recursively, down to one utterance); ``on_split(batch size, first half, error)`` is told of
    every split. The halves keep the whole batch's generation limit, so every utterance is decoded as
    in the unsplit batch. An utterance out of memory alone is a one-line :class:`EvaluationError`."""
    try:
        return [(list(rows), asr.transcribe(prepared))]
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        reason = _first_line(error)
    _release_memory(asr.device)  # outside the handler: the traceback no longer holds the batch's tensors
    if len(rows) == 1:
        row = rows[0]
        raise EvaluationError(
            f"{row['id']} ({float(row['duration']):.1f} s of audio) does not fit in memory on {asr.device} "
            f"even alone: {reason}"
        )
    half = (len(rows) + 1) // 2
    on_split(len(rows), half, reason)
    results = []
    for part in (rows[:half], rows[half:]):
        sub = asr.prepare([row["audio"] for row in part])
        sub["max_seconds"] = prepared["max_seconds"]
        results.extend(transcribe_splitting_on_oom(asr, part, sub, on_split))
    return results


def _evaluate_split(
    asr: ASRModel,
    split: str,
    source: str | Path,
    journal: Journal,
    previous: list[dict],
    *,
    batch_size: int,
    buffer_size: int,
    limit: int | None,
    progress: bool,
    calibrated: frozenset[str] = frozenset(),
) -> None:
    done = {r["id"] for r in previous if r.get("type") in {"utterance", "unreadable"}}
    dataset = librispeech(split, source, asr.sampling_rate, limit=limit, exclude_ids=done, keep_unreadable=True)
    known = count_utterances(split, source)
    total = min(limit, known) if (limit and known) else (limit or known)
    running = _Progress()
    for record in previous:
        if record.get("type") == "utterance":
            running.add(record)

    def produce() -> Iterator[tuple[str, Any, Any]]:
        unreadable: list[dict] = []

        def readable_rows() -> Iterator[dict]:
            for row in dataset:
                if row["id"] in calibrated:  # a Hub stream: ids are only known as they come
                    raise _overlap_error(asr.model_id, split, [row["id"]])
                if row["audio"] is None:
                    unreadable.append(row)  # reported below, between batches
                    continue
                yield row

        for batch in length_sorted_batches(readable_rows(), batch_size, buffer_size):
            while unreadable:
                yield "unreadable", unreadable.pop(0), None
            yield "batch", batch, asr.prepare([row["audio"] for row in batch])
        while unreadable:
            yield "unreadable", unreadable.pop(0), None

    bar = _progress_bar(total, len(done), f"{Path(asr.model_id).name or asr.model_id} {split}", progress)
    if running.words:
        bar.set_postfix(wer=f"{running.wer:.4f}")

    def on_split(size: int, half: int, reason: str) -> None:
        logger.warning("out of memory on a batch of %d: retrying it as %d + %d", size, half, size - half)
        journal.append([{"type": "oom", "model": asr.model_id, "split": split, "batch_size": size,
                         "halves": [half, size - half], "error": reason}])  # fmt: skip

    _reset_peak_memory(asr.device)
    prefetch = Prefetcher(produce)
    try:
        last = time.perf_counter()
        for kind, item, prepared in prefetch:
            if kind == "unreadable":
                logger.warning("skipping unreadable audio %s", item["error"])
                journal.append([{"type": "unreadable", "model": asr.model_id, "split": split, "id": item["id"],
                                 "error": item["error"]}])  # fmt: skip
                bar.update(1)
                continue
            parts = transcribe_splitting_on_oom(asr, item, prepared, on_split)
            now = time.perf_counter()
            seconds, last = (now - last) / len(item), now
            records = [r for rows, result in parts for r in utterance_records(asr, rows, result, split, seconds)]
            for record in records:
                if record.get("truncated"):
                    logger.warning("%s: %.1f s of audio, scored on the model's input window", record["id"],
                                   record["duration"])  # fmt: skip
                running.add(record)
            journal.append(records)
            bar.update(len(item))
            bar.set_postfix(wer=f"{running.wer:.4f}")
    finally:
        prefetch.close()
        bar.close()
    peak, peak_kind = _peak_memory(asr.device)
    journal.append([{"type": "done", "model": asr.model_id, "split": split, "peak_memory_bytes": peak,
                     "peak_memory_kind": peak_kind, "device": str(asr.device)}])  # fmt: skip


def summarize(records: list[dict]) -> dict:
    """The final JSON, recomputed from the journal's records alone."""
    header = _header(records) or {"config": {}}
    config = header.get("config", {})
    info = {r["model"]: r for r in records if r.get("type") == "model"}
    finished = {(r["model"], r["split"]): r for r in records if r.get("type") == "done"}
    results = []
    for model_id in config.get("models", []):
        for split in config.get("splits", []):
            subset = [r for r in records if r.get("model") == model_id and r.get("split") == split]
            # the same id twice (should not happen): the last line wins
            by_id = {r["id"]: r for r in subset if r.get("type") in {"utterance", "unreadable"}}
            chosen = list(by_id.values())
            entry = {"model": model_id, "split": split, **totals(chosen)}
            scored = [r for r in chosen if r.get("type") == "utterance"]
            entry["evaluate_wer"] = hf_evaluate_wer([r["reference"] for r in scored], [r["hypothesis"] for r in scored])
            done = finished.get((model_id, split), {})
            entry["peak_memory_bytes"] = done.get("peak_memory_bytes")
            entry["peak_memory_kind"] = done.get("peak_memory_kind")
            # batches halved after running out of memory, and the smallest batch that took
            halves = [size for r in subset if r.get("type") == "oom" for size in r.get("halves", [])]
            entry["oom_retries"] = sum(1 for r in subset if r.get("type") == "oom")
            entry["oom_smallest_batch_size"] = min(halves) if halves else None
            model_info = {k: v for k, v in info.get(model_id, {}).items() if k not in {"type", "model"}}
            entry.update(model_info)
            if done.get("device"):
                entry["device"] = done["device"]
            entry["complete"] = (model_id, split) in finished
            results.append(entry)
    return {
        "format_version": JOURNAL_VERSION,
        "created": header.get("created"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "runs": sum(1 for r in records if r.get("type") == "start"),
        "results": results,
    }


def check_output(output: Path) -> None:
    """One-line errors for an output the run could not write, before any model is loaded."""
    if output.suffix == ".jsonl":
        raise EvaluationError(f"--output {output}: give the .json name; the journal goes next to it as .jsonl")
    if output.is_dir():
        raise EvaluationError(f"--output {output} is a folder; give a file name such as {output / 'eval.json'}")
    existing = output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EvaluationError(f"--output {output}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationError(f"--output {output}: {existing} is not writable")


def _classes_line(asr: ASRModel) -> str:
    return f"{asr.model_id}: classes: {asr.info.get('classes')}"


def evaluate_models(
    models: Sequence[str],
    splits: Sequence[str] = DEFAULT_SPLITS,
    *,
    data: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    device: str = "auto",
    fp16: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    buffer_size: int | None = None,
    results_dir: str | os.PathLike = "results",
    remote_code: bool = True,
) -> tuple[dict, Path]:
    """Evaluate every model on every split; returns ``(the JSON written, its path)``.

    The journal ``<output>.jsonl`` makes a run resumable: the same call after a crash or kill
    continues after the utterances already scored. The JSON appears only when everything is done.
    Everything cheap is checked before any model is loaded (models' configs, splits, data, limit,
    batch size, output, calibration overlap); a run that fails before scoring anything removes the
    journal it started, so the corrected command starts afresh. A batch out of memory is halved and
    retried. Converted models run their saved remote code unless ``remote_code=False`` (then the
    installed mla_convert classes); each model's line and JSON ``classes`` say which.
    """
    if not models:
        raise EvaluationError("give at least one model")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1 (got {limit})")
    splits = list(dict.fromkeys(splits))
    for split in splits:
        check_split(split)
    torch_device = resolve_device(device)
    if fp16 and torch_device.type == "cpu":
        logger.warning("--fp16 on the CPU: float16 kernels are slow there and may be missing; consider cuda")
    models = list(dict.fromkeys(models))
    source = resolve_source(data)
    if source != "hub":
        for split in splits:
            check_local_split(source, split)
    reports: dict[str, dict | None] = {}
    for model_id in models:  # every model id is checked before anything is written
        path, config, _ = check_model(model_id)
        reports[model_id] = conversion_report(path) if is_converted(config) else None
        for split in splits:
            check_not_calibrated_on(model_id, reports[model_id], split, source, limit)
    config = _run_config(models, splits, source_label(source), limit, fp16)
    if not remote_code:  # only when not the default, so journals of earlier versions still resume
        config["installed_classes"] = True
    output = Path(output) if output is not None else default_output(config, results_dir)
    check_output(output)
    journal = Journal(_journal_path(output))
    records = journal.read()
    header = _header(records)
    if records and header is None:
        raise EvaluationError(f"{journal.path} is not an evaluation journal; choose another --output")
    if header is not None and header.get("config") != config:
        raise EvaluationError(
            f"{journal.path} holds a different run ({_describe(header.get('config', {}))}); "
            "run that command to resume it, or choose another --output"
        )
    if header is None and output.exists():
        raise EvaluationError(f"{output} already exists (without its journal); choose another --output")
    fresh = header is None
    new_folders = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    try:
        if header is None:
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            header = {"type": "run", "format_version": JOURNAL_VERSION, "created": created, "config": config}
            journal.append([header])
            records = [header]
        resumed = sum(1 for r in records if r.get("type") == "utterance")
        if resumed:
            logger.warning("resuming %s: %d utterances already scored", journal.path, resumed)
        journal.append([{"type": "start", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "batch_size": batch_size, "device": str(torch_device)}])  # fmt: skip
        records.append({"type": "start"})
        finished = {(r["model"], r["split"]) for r in records if r.get("type") == "done"}
        for model_id in models:
            todo = [split for split in splits if (model_id, split) not in finished]
            if not todo:
                continue
            with transformers_progress_bars(progress):
                asr = load_asr_model(model_id, torch_device, fp16, remote_code=remote_code)
            logger.info("%s", _classes_line(asr))
            if progress:
                print(_classes_line(asr), file=sys.stderr, flush=True)
            try:
                model_record = {"type": "model", **asr.info, "batch_size": batch_size}
                journal.append([model_record])
                records.append(model_record)
                for split in todo:
                    previous = [r for r in records if r.get("model") == model_id and r.get("split") == split]
                    _evaluate_split(
                        asr,
                        split,
                        source,
                        journal,
                        previous,
                        batch_size=batch_size,
                        buffer_size=buffer_size or batch_size * BUFFER_BATCHES,
                        limit=limit,
                        progress=progress,
                        calibrated=calibrated_ids(reports[model_id]),
                    )
            finally:
                asr.close()
        journal.close()
        records = journal.read()
        payload = summarize(records)
        payload["journal"] = journal.path.name
        _write_json_atomic(output, payload)
        return payload, output
    except BaseException:
        journal.close()
        if fresh and journal.scored == 0:  # nothing to resume: leave no journal to block the next command
            journal.path.unlink(missing_ok=True)
            for folder in new_folders:  # innermost first; only the empty folders this run made
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        journal.close()


def _describe(config: dict) -> str:
    return (
        f"models {', '.join(config.get('models', []))}; splits {', '.join(config.get('splits', []))}; "
        f"data {config.get('data')}; limit {config.get('limit')}; fp16 {config.get('fp16')}"
    )


def format_results(payload: dict) -> str:
    """A plain-text table of a result JSON."""
    header = ["model", "split", "WER", "CER", "utts", "audio s", "wall s", "RTF", "kv B/frame"]
    rows = [header]
    for entry in payload.get("results", []):
        rows.append(
            [
                str(entry["model"]),
                entry["split"],
                _pct(entry.get("wer")),
                _pct(entry.get("cer")),
                f"{entry.get('utterances', 0)}"
                + (f" +{entry['unreadable']} unreadable" if entry.get("unreadable") else ""),
                f"{entry.get('audio_seconds', 0):.1f}",
                f"{entry.get('wall_seconds', 0):.1f}",
                "-" if entry.get("real_time_factor") is None else f"{entry['real_time_factor']:.3f}",
                "-" if entry.get("kv_state_bytes_per_frame") is None else str(entry["kv_state_bytes_per_frame"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
