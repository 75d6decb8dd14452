"""The recogniser under evaluation: loading (saved remote code or installed classes) and inference."""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelNotFoundError, first_line
from .errors import EvaluationError, NotSpeechRecognitionError
from .kv_state import attention_report
from .normalize import normalizer_for
from .overlap import calibrated_ids, conversion_report

# Greedy seq2seq decoding stops at min(model limit, BASE + RATE * longest audio seconds in the batch)
# new tokens: ~3x the fastest LibriSpeech speech, so only a looping decoder reaches it.
MAX_NEW_TOKENS_BASE = 24
# models whose forward decodes (no generate()): their logits hold one row per predicted token
NON_AUTOREGRESSIVE_MODEL_TYPES = ("mla_paraformer",)
MAX_NEW_TOKENS_PER_SECOND = 12


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
    kind: str  # "ctc" | "nar" (non-autoregressive: Paraformer) | "seq2seq"
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
        if self.kind == "nar":
            return self._non_autoregressive(inputs)
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

    def _non_autoregressive(self, inputs: dict[str, Any]) -> Transcripts:
        """One forward (a Paraformer's predictor and decoder): each row's first ``token_lengths`` tokens."""
        output = self.model(**inputs)
        ids = output.logits.argmax(dim=-1).cpu()
        lengths = output.token_lengths.cpu().tolist()
        return Transcripts(texts=self.tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(lengths)]))

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
        from ..distributed import is_sharded

        max_new = self.max_new_tokens(max_seconds)
        # an FSDP-sharded model (dev WER during FSDP training): every rank runs the same decoder steps
        synced = {"synced_gpus": True} if is_sharded(self.model) else {}
        with quiet_transformers():
            sequences = self.model.generate(**inputs, max_new_tokens=max_new, num_beams=1, do_sample=False, **synced)
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


def _token_ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


@contextlib.contextmanager
def quiet_transformers():
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
    """``"ctc"``, ``"nar"`` (a non-autoregressive decoder read in one forward: mla_convert's
    Paraformer) or ``"seq2seq"`` from the config's architectures; a one-line error for anything else."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CTC_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    remote = {auto: str(target).rsplit(".", 1)[-1] for auto, target in auto_map.items() if isinstance(target, str)}
    ctc_names = set(MODEL_FOR_CTC_MAPPING_NAMES.values())
    seq2seq_names = set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values())
    if getattr(config, "model_type", None) in NON_AUTOREGRESSIVE_MODEL_TYPES:
        return "nar"
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
    from ..hub.access import hub_offline, hub_reachable

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
    raise ModelNotFoundError(f"cannot load the {what} of {model_id!r}: {first_line(first)}") from first


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
    from ..loading import load_config

    path = model_id
    if model_id.startswith("bundled:"):
        try:
            from ..importers.bundled import resolve_bundled
        except ImportError as error:
            raise ModelNotFoundError(f"{model_id}: bundled models need mla_convert.importers.ct2 ({error})") from error
        path = resolve_bundled(model_id)
    config = load_config(path)
    return path, config, asr_kind(config, model_id)


def is_converted(config) -> bool:
    """A model converted by this toolkit: its config holds a non-empty ``attention_conversion``
    (converted Whisper keeps ``model_type`` ``whisper``, so the model type cannot tell)."""
    conversion = getattr(config, "attention_conversion", None)
    return isinstance(conversion, dict) and bool(conversion)


def has_own_remote_code(config, loader_name: str) -> bool:
    """A model whose classes are not part of transformers (mla_convert's Conformer, Branchformer)
    and whose config names the saved code that defines them (``auto_map``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    return loader_name in auto_map and getattr(config, "model_type", None) not in CONFIG_MAPPING_NAMES


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
        raise ModelNotFoundError(f"cannot load the saved remote code of {model_id!r}: {first_line(error)}") from error


def _installed_class(config, model_id: str) -> type:
    from ..loading import model_class_for

    cls = model_class_for(config)
    if not cls.__module__.startswith("mla_convert."):
        names = getattr(config, "architectures", None)
        raise EvaluationError(f"{model_id}: no installed mla_convert class for the architectures {names}")
    return cls


def load_asr_model(
    model_id: str, device: str | torch.device = "auto", fp16: bool = False, *, remote_code: bool = True
) -> ASRModel:
    """Load a CTC (``AutoModelForCTC``) or seq2seq (``AutoModelForSpeechSeq2Seq``) model + processor.

    ``bundled:...`` ids go through :func:`mla_convert.importers.bundled.resolve_bundled`. Models converted by this
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
    if (converted or has_own_remote_code(config, auto_loader.__name__)) and remote_code:
        reference = _remote_code_reference(config, auto_loader.__name__, model_id)
        loader: Any = _load_remote_code_class(reference, path, model_id)
        classes = f"saved remote code ({_remote_code_file(reference)})"
    elif converted or has_own_remote_code(config, auto_loader.__name__):
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
