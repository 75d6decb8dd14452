"""Import ESPnet2 Conformer and Branchformer CTC models into mla_convert's own HF model classes.

An ESPnet2 ASR experiment is a ``config.yaml`` (front end, normalisation, encoder, token list) and a
checkpoint (``valid.acc.ave.pth``: the state dict of ``ESPnetASRModel``, or a training snapshot
holding it under ``"model"``). This module reads both with PyYAML and ``torch.load(weights_only=True)``
(no ESPnet needed), maps ``encoder_conf`` onto :class:`ConformerConfig` / :class:`BranchformerConfig`,
``frontend_conf`` onto :class:`ConformerFeatureExtractor`, the ``normalize`` statistics onto its
CMVN, ``token_list`` onto a CTC tokenizer, and renames the encoder and CTC weights (ESPnet's
``encoders.N.self_attn.linear_q`` -> ``layers.N.self_attn.q_proj``, ``ctc.ctc_lo`` -> ``lm_head``).
The attention decoder of a hybrid CTC/attention model is not imported: the result is the CTC branch.

An ESPnet setting the HF model cannot reproduce is refused with a one-line error naming it
(``encoder_conf.rel_pos_type: ...``), never approximated; the model's mel filterbank, when the
checkpoint holds it, is compared with the one the feature extractor computes.
``scripts/check_espnet.py`` checks the result against ESPnet itself (CTC log-probabilities).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlaConvertError, ModelNotFoundError
from ..hub.card_trained import ESPNET_IMPORT
from ..io import atomic_output_dir, check_output_dir
from .ct2 import source_stamp

PROVENANCE_FILE = ESPNET_IMPORT
ENCODERS = ("conformer", "branchformer")
# ESPnet ``input_layer`` -> our ``subsampling``
SUBSAMPLING = {"conv2d": "conv2d", "conv2d6": "conv2d6", "conv2d8": "conv2d8"}
ACTIVATIONS = {"swish": "swish", "relu": "relu", "gelu": "gelu"}
# The checkpoint's mel filterbank may differ from ours by float32 rounding only.
MELMAT_TOLERANCE = 1e-5


class EspnetFormatError(MlaConvertError):
    """An ESPnet model this importer cannot read or reproduce; the message names the setting."""


@dataclass(frozen=True)
class EspnetSource:
    """Where an ESPnet model's files are: its ``config.yaml`` and checkpoint, and the Hub id they
    came from (``None`` for local files)."""

    config: Path
    checkpoint: Path
    hub_id: str | None = None


@dataclass
class EncoderMapping:
    """An ESPnet ``encoder_conf`` as our config's keyword arguments, plus what was left out."""

    family: str
    kwargs: dict[str, Any]
    not_imported: list[str] = field(default_factory=list)  # training-only settings, reported


# ------------------------------------------------------------------------------------- finding files


def _single(paths: list[Path], what: str, where: Path) -> Path:
    if not paths:
        raise ModelNotFoundError(f"{where} has no {what}: not an ESPnet model directory")
    if len(paths) > 1:
        names = ", ".join(str(path.relative_to(where)) for path in paths[:3])
        raise ModelNotFoundError(f"{where} has several {what} files ({names}); name the one to import")
    return paths[0]


def find_checkpoint(config: Path) -> Path:
    """The checkpoint beside ``config``: ``valid.acc.ave.pth`` if there, else the only ``*.pth``."""
    preferred = config.parent / "valid.acc.ave.pth"
    if preferred.is_file():
        return preferred
    return _single(sorted(config.parent.glob("*.pth")), "*.pth checkpoint", config.parent)


def resolve_source(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> EspnetSource:
    """An ESPnet model named by a ``config.yaml``, a directory holding one (an unpacked model zip or
    Hub snapshot: ``exp/**/config.yaml`` of the ASR model), or a Hub id (downloaded); the
    checkpoint given, else found beside the config."""
    path = Path(source).expanduser()
    hub_id = None
    if not path.exists():
        from ..hub.sources import _looks_like_hub_id

        if not _looks_like_hub_id(str(source)):
            raise ModelNotFoundError(f"no such ESPnet config or model directory: {source}")
        path, hub_id = _download(str(source)), str(source)
    if path.is_dir():
        candidates = [
            found for found in sorted(path.rglob("config.yaml")) if "encoder" in _read_yaml(found, quiet=True)
        ]
        path = _single(candidates, "ASR config.yaml (with an encoder)", path)
    if checkpoint is None:
        checkpoint_path = find_checkpoint(path)
    else:
        checkpoint_path = Path(checkpoint).expanduser()
        if not checkpoint_path.is_file():
            raise ModelNotFoundError(f"no such checkpoint: {checkpoint}")
    return EspnetSource(config=path, checkpoint=checkpoint_path, hub_id=hub_id)


def _download(repo_id: str) -> Path:
    """A snapshot of an ESPnet model repo on the Hub (configs, checkpoints, statistics)."""
    from huggingface_hub import snapshot_download

    from ..hub.access import hub_offline, hub_reachable

    patterns = ["*.yaml", "*.pth", "*.npz", "*.txt", "*.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: download below
        pass
    if hub_offline():
        raise ModelNotFoundError(f"{repo_id!r} is not a local path and not in the Hugging Face cache (HF_HUB_OFFLINE)")
    if not hub_reachable():
        raise ModelNotFoundError(f"{repo_id!r} is not a local path or cached, and the Hub cannot be reached")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        raise ModelNotFoundError(f"cannot download {repo_id!r} from the Hub: {str(error).splitlines()[0]}") from error


# ----------------------------------------------------------------------------------------- reading


def _read_yaml(path: Path, quiet: bool = False) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        if quiet:
            return {}
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EspnetFormatError(f"{path}: not a readable YAML file ({reason})") from error
    if not isinstance(data, dict):
        if quiet:
            return {}
        raise EspnetFormatError(f"{path}: expected an ESPnet config (a mapping), got {type(data).__name__}")
    return data


def read_config(path: Path) -> dict:
    """An ESPnet ASR ``config.yaml``, checked for the keys the import needs."""
    config = _read_yaml(path)
    encoder = config.get("encoder")
    if encoder not in ENCODERS:
        raise EspnetFormatError(
            f"encoder: {encoder!r} is not importable; mla_convert imports {', '.join(ENCODERS)} encoders"
        )
    if config.get("token_list") is None:
        raise EspnetFormatError("token_list: missing; the CTC vocabulary is needed")
    return config


def read_token_list(config: dict, config_path: Path) -> list[str]:
    """``token_list``: the list itself, or the path of a ``tokens.txt`` (one token per line)."""
    tokens = config["token_list"]
    if isinstance(tokens, str):
        file = Path(tokens)
        if not file.is_absolute() and not file.exists():
            file = config_path.parent / file.name
        try:
            tokens = [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as error:
            raise EspnetFormatError(f"token_list: cannot read {tokens} ({error.strerror or error})") from error
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise EspnetFormatError("token_list: expected a list of tokens (strings)")
    if tokens[0] != "<blank>":
        raise EspnetFormatError(f"token_list: the first token must be the CTC blank '<blank>', got {tokens[0]!r}")
    return tokens


def read_state_dict(path: Path, error: type[Exception] = EspnetFormatError) -> dict[str, Any]:
    """The model state dict of a checkpoint (tensors only; ``weights_only`` unpickling): a plain
    state dict, or a training snapshot's ``model`` / ``state_dict`` entry; DDP's ``module.``
    prefixes dropped. Anything else is one ``error`` line."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise error(f"{path}: not a readable PyTorch checkpoint ({reason})") from failure
    for entry in ("model", "state_dict"):  # a training snapshot (checkpoint.pth): model, optimizers, ...
        if isinstance(state, Mapping) and isinstance(state.get(entry), Mapping):
            state = state[entry]
    if not isinstance(state, Mapping) or not state:
        raise error(f"{path}: expected a state dict (parameter name -> tensor)")
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise error(f"{path}: expected a state dict of tensors only")
    return {key.removeprefix("module."): value for key, value in state.items()}


# ------------------------------------------------------------------------------------- the settings


def _require(conf: dict, section: str, key: str, default: Any, allowed: tuple, why: str) -> None:
    value = conf.get(key, default)
    if value not in allowed:
        raise EspnetFormatError(f"{section}.{key}: {value!r} is not supported ({why})")


def _uniform(conf: dict, section: str, key: str, default: Any) -> Any:
    """A setting ESPnet also accepts per layer (a list): one value for all layers, or an error."""
    value = conf.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise EspnetFormatError(f"{section}.{key}: per-layer values {value} are not supported (one value only)")
        value = value[0]
    return value


def _set(value: Any) -> bool:
    """A training-only setting that is on: a non-zero rate, or a non-empty list with one."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(item not in (None, 0, 0.0, False) for item in values)


def _check_known(conf: dict, section: str, known: set[str]) -> None:
    unknown = sorted(set(conf) - known)
    if unknown:
        raise EspnetFormatError(f"{section}.{unknown[0]}: not an ESPnet setting this importer knows")


_COMMON_KEYS = {
    "output_size", "attention_heads", "num_blocks", "dropout_rate", "positional_dropout_rate",
    "attention_dropout_rate", "input_layer", "zero_triu", "padding_idx", "stochastic_depth_rate",
    "qk_norm", "use_flash_attn", "pos_enc_layer_type", "rel_pos_type",
}  # fmt: skip
_CONFORMER_KEYS = _COMMON_KEYS | {
    "linear_units", "normalize_before", "concat_after", "positionwise_layer_type",
    "positionwise_conv_kernel_size", "macaron_style", "selfattention_layer_type", "activation_type",
    "use_cnn_module", "cnn_module_kernel", "interctc_layer_idx", "interctc_use_conditioning", "ctc_trim",
    "layer_drop_rate", "max_pos_emb_len",
}  # fmt: skip
_BRANCHFORMER_KEYS = _COMMON_KEYS | {
    "use_attn", "attention_layer_type", "use_cgmlp", "cgmlp_linear_units", "cgmlp_conv_kernel",
    "use_linear_after_conv", "gate_activation", "merge_method", "cgmlp_weight", "attn_branch_drop_rate",
}  # fmt: skip


def _positions(conf: dict, section: str, attention_key: str, rel_pos_default: str) -> str:
    """``pos_enc_layer_type`` / the attention type / ``rel_pos_type`` -> our ``position_embedding``."""
    kind = conf.get("pos_enc_layer_type", "rel_pos")
    attention = conf.get(attention_key, "rel_selfattn")
    if kind == "rel_pos":
        _require(conf, section, "rel_pos_type", rel_pos_default, ("latest",),
                 "only the latest RelPositionalEncoding; the legacy one is not implemented")  # fmt: skip
        _require(conf, section, attention_key, "rel_selfattn", ("rel_selfattn",),
                 "relative positions need rel_selfattn")  # fmt: skip
        return "rel_pos"
    if kind == "abs_pos":
        if attention != "selfattn":
            raise EspnetFormatError(f"{section}.{attention_key}: {attention!r} with abs_pos is not supported")
        return "abs_pos"
    raise EspnetFormatError(f"{section}.pos_enc_layer_type: {kind!r} is not supported (rel_pos or abs_pos)")


def _common(conf: dict, section: str) -> dict[str, Any]:
    _require(conf, section, "input_layer", "conv2d", tuple(SUBSAMPLING), "conv2d, conv2d6 or conv2d8 subsampling")
    _require(conf, section, "zero_triu", False, (False,), "zero_triu is a legacy option")
    _require(conf, section, "qk_norm", False, (False,), "no query/key normalisation in mla_convert's attention")
    return {
        "hidden_size": conf.get("output_size", 256),
        "num_attention_heads": conf.get("attention_heads", 4),
        "dropout": conf.get("dropout_rate", 0.1),
        "positional_dropout": conf.get("positional_dropout_rate", 0.1),
        "attention_dropout": conf.get("attention_dropout_rate", 0.0),
        "subsampling": SUBSAMPLING[conf.get("input_layer", "conv2d")],
        "attention": {"type": "mha"},
    }


@dataclass(frozen=True)
class EncoderTable:
    """How one ESPnet2 encoder's ``encoder_conf`` maps onto our config: the keys it knows, the
    values it must have, ``(our key, ESPnet key, ESPnet default, cast)`` for the rest, and the
    training-only settings that are reported when on."""

    known: frozenset[str]
    attention_key: str  # ESPnet's name of the attention type setting
    rel_pos_default: str  # ESPnet's default ``rel_pos_type`` for this encoder
    required: tuple[tuple[str, Any, tuple, str], ...]
    fields: tuple[tuple[str, str, Any, Any], ...]
    training_only: tuple[str, ...]
    per_layer: tuple[tuple[str, str, Any], ...] = ()  # (our key, ESPnet key, default): one value or a list


ENCODER_TABLES: dict[str, EncoderTable] = {
    "conformer": EncoderTable(
        known=frozenset(_CONFORMER_KEYS),
        attention_key="selfattention_layer_type",
        rel_pos_default="legacy",
        required=(
            ("normalize_before", True, (True,), "pre-norm layers only"),
            ("concat_after", False, (False,), "concat_after is not implemented"),
            ("positionwise_layer_type", "linear", ("linear",), "linear feed-forward only"),
            ("activation_type", "swish", tuple(ACTIVATIONS), "swish, relu or gelu"),
            ("interctc_use_conditioning", False, (False,), "self-conditioned CTC is not implemented"),
            ("ctc_trim", False, (False,), "CTC trimming is not implemented"),
        ),
        fields=(
            ("num_hidden_layers", "num_blocks", 6, int),
            ("intermediate_size", "linear_units", 2048, int),
            ("macaron_style", "macaron_style", False, bool),
            ("use_cnn_module", "use_cnn_module", True, bool),
            ("conv_kernel_size", "cnn_module_kernel", 31, int),
            ("hidden_act", "activation_type", "swish", ACTIVATIONS.get),
        ),
        training_only=("stochastic_depth_rate", "layer_drop_rate", "interctc_layer_idx"),
    ),
    "branchformer": EncoderTable(
        known=frozenset(_BRANCHFORMER_KEYS),
        attention_key="attention_layer_type",
        rel_pos_default="latest",
        required=(
            ("use_attn", True, (True,), "both branches are needed"),
            ("use_cgmlp", True, (True,), "both branches are needed"),
        ),
        fields=(
            ("num_hidden_layers", "num_blocks", 12, int),
            ("cgmlp_linear_units", "cgmlp_linear_units", 2048, int),
            ("cgmlp_conv_kernel", "cgmlp_conv_kernel", 31, int),
            ("use_linear_after_conv", "use_linear_after_conv", False, bool),
            ("gate_activation", "gate_activation", "identity", str),
            ("merge_method", "merge_method", "concat", str),
        ),
        per_layer=(("cgmlp_weight", "cgmlp_weight", 0.5), ("attn_branch_drop_rate", "attn_branch_drop_rate", 0.0)),
        training_only=("stochastic_depth_rate",),
    ),
}


def encoder_settings(family: str, conf: dict) -> EncoderMapping:
    """An ESPnet2 ``ConformerEncoder`` / ``BranchformerEncoder`` ``encoder_conf`` -> the keyword
    arguments of :class:`ConformerConfig` / :class:`BranchformerConfig`."""
    table = ENCODER_TABLES[family]
    section = "encoder_conf"
    _check_known(conf, section, set(table.known))
    kwargs = _common(conf, section)
    for key, default, allowed, why in table.required:
        _require(conf, section, key, default, allowed, why)
    kwargs["position_embedding"] = _positions(conf, section, table.attention_key, table.rel_pos_default)
    for ours, theirs, default, cast in table.fields:
        kwargs[ours] = cast(conf.get(theirs, default))
    for ours, theirs, default in table.per_layer:
        kwargs[ours] = _uniform(conf, section, theirs, default)
    not_imported = [f"{section}.{key}" for key in table.training_only if _set(conf.get(key))]
    return EncoderMapping(family, kwargs, not_imported)


_FRONTEND_KEYS = {
    "fs", "n_fft", "win_length", "hop_length", "window", "center", "normalized", "onesided", "n_mels", "fmin",
    "fmax", "htk", "frontend_conf", "apply_stft",
}  # fmt: skip


def _sampling_rate(value: Any) -> int:
    if isinstance(value, str) and value.lower().endswith("k"):
        return int(float(value[:-1]) * 1000)
    return int(value)


def frontend_settings(config: dict) -> dict[str, Any]:
    """ESPnet2 ``DefaultFrontend`` ``frontend_conf`` -> :class:`ConformerFeatureExtractor` arguments."""
    frontend = config.get("frontend", "default")
    if frontend != "default":
        raise EspnetFormatError(f"frontend: {frontend!r} is not supported (the default log-mel frontend only)")
    conf = dict(config.get("frontend_conf") or {})
    section = "frontend_conf"
    _check_known(conf, section, _FRONTEND_KEYS)
    _require(conf, section, "center", True, (True,), "centred frames only")
    _require(conf, section, "normalized", False, (False,), "an unnormalised STFT only")
    _require(conf, section, "onesided", True, (True,), "a one-sided STFT only")
    _require(conf, section, "htk", False, (False,), "the Slaney mel scale only")
    _require(conf, section, "apply_stft", True, (True,), "waveform input only")
    _require(conf, section, "window", "hann", ("hann",), "a Hann window only")
    inner = conf.get("frontend_conf") or {}
    if isinstance(inner, dict) and (inner.get("use_wpe") or inner.get("use_beamformer")):
        raise EspnetFormatError(f"{section}.frontend_conf: WPE / beamforming front ends are not supported")
    n_fft = int(conf.get("n_fft", 512))
    sampling_rate = _sampling_rate(conf.get("fs", config.get("fs", 16000)))
    fmin = conf.get("fmin")
    fmax = conf.get("fmax")
    return {
        "feature_size": int(conf.get("n_mels", 80)),
        "sampling_rate": sampling_rate,
        "n_fft": n_fft,
        "win_length": int(conf.get("win_length") or n_fft),
        "hop_length": int(conf.get("hop_length", 128)),
        "fmin": 0.0 if fmin is None else float(fmin),
        "fmax": None if fmax is None else float(fmax),
    }


def specaug_settings(config: dict) -> tuple[dict[str, Any], list[str]]:
    """ESPnet ``specaug_conf`` -> our SpecAugment settings (training only), and what does not map."""
    if config.get("specaug") in (None, "none"):
        return {"specaugment": False}, []
    conf = dict(config.get("specaug_conf") or {})
    settings: dict[str, Any] = {"specaugment": True}
    not_imported = []
    if conf.get("apply_time_warp", True):
        not_imported.append("specaug_conf.apply_time_warp")
    if conf.get("apply_freq_mask", True):
        width = conf.get("freq_mask_width_range", (0, 20))
        settings["freq_mask_width"] = int(width[-1] if isinstance(width, (list, tuple)) else width)
        settings["freq_mask_count"] = int(conf.get("num_freq_mask", 2))
    else:
        settings["freq_mask_count"] = 0
    if conf.get("apply_time_mask", True):
        ratio = conf.get("time_mask_width_ratio_range")
        if ratio is not None:
            settings["time_mask_ratio"] = float(ratio[-1] if isinstance(ratio, (list, tuple)) else ratio)
        elif conf.get("time_mask_width_range") is not None:
            not_imported.append("specaug_conf.time_mask_width_range")  # frames, not a ratio: our default kept
        settings["time_mask_count"] = int(conf.get("num_time_mask", 2))
    else:
        settings["time_mask_count"] = 0
    return settings, not_imported


def cmvn_settings(config: dict, state: dict, config_path: Path) -> tuple[list[float] | None, list[float] | None]:
    """Global mean / std: the ``normalize.mean`` / ``normalize.std`` buffers of the checkpoint, else
    ``normalize_conf.stats_file`` (ESPnet's ``feats_stats.npz``); none without ``normalize``."""
    normalize = config.get("normalize")
    if normalize in (None, "none"):
        return None, None
    if normalize != "global_mvn":
        raise EspnetFormatError(f"normalize: {normalize!r} is not supported (global_mvn or none)")
    conf = dict(config.get("normalize_conf") or {})
    if "normalize.mean" in state and "normalize.std" in state:
        mean = state["normalize.mean"].double().numpy()
        std = state["normalize.std"].double().numpy()
    else:
        mean, std = _stats_file(conf, config_path)
    if not conf.get("norm_means", True):
        mean = np.zeros_like(mean)
    if not conf.get("norm_vars", True):
        std = np.ones_like(std)
    return mean.tolist(), std.tolist()


def _stats_file(conf: dict, config_path: Path) -> tuple[np.ndarray, np.ndarray]:
    stats = conf.get("stats_file")
    if not stats:
        raise EspnetFormatError("normalize_conf.stats_file: missing, and the checkpoint has no normalize.mean")
    candidates = [Path(stats), config_path.parent / stats]
    candidates += [parent / stats for parent in config_path.parents]  # a recipe-relative path
    file = next((candidate for candidate in candidates if candidate.is_file()), None)
    if file is None:
        raise EspnetFormatError(f"normalize_conf.stats_file: {stats} not found (relative to {config_path.parent})")
    with np.load(file) as data:
        count, total, squares = float(data["count"]), data["sum"], data["sum_square"]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, float(conf.get("eps", 1e-20))))
    return mean, std


# ------------------------------------------------------------------------------------------ weights

_ATTENTION_RENAMES = {
    "linear_q": "q_proj",
    "linear_k": "k_proj",
    "linear_v": "v_proj",
    "linear_out": "out_proj",
    "linear_pos": "pos_proj",
}


def rename_key(key: str) -> str | None:
    """An ESPnet ASR-model parameter name -> ours (``None``: not part of the CTC model)."""
    if key.startswith("ctc.ctc_lo."):
        return "lm_head." + key[len("ctc.ctc_lo.") :]
    if not key.startswith("encoder."):
        return None
    parts = key.split(".")
    if parts[1] == "encoders":
        parts[1] = "layers"
        if len(parts) > 4 and parts[3] in ("self_attn", "attn"):
            parts[4] = _ATTENTION_RENAMES.get(parts[4], parts[4])
    elif parts[1:4] == ["embed", "out", "0"]:  # conv2d / conv2d6: Sequential(Linear, positions)
        del parts[3]
    return ".".join(parts)


def map_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """``(our state dict, {dropped prefix: tensor count})``. The front end's mel matrix and the
    normalisation buffers go to the feature extractor, the attention decoder nowhere."""
    mapped: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    for key, tensor in state.items():
        new = rename_key(key)
        if new is None:
            prefix = key.split(".")[0]
            dropped[prefix] = dropped.get(prefix, 0) + 1
            continue
        mapped[new] = tensor
    return mapped, dropped


def check_mel_matrix(state: dict[str, Any], extractor: Any) -> float | None:
    """The largest difference between the checkpoint's ``frontend.logmel.melmat`` and the
    extractor's filterbank (``None`` if the checkpoint has none); an error above the tolerance."""
    melmat = state.get("frontend.logmel.melmat")
    if melmat is None:
        return None
    ours = np.asarray(extractor.mel_filters)
    theirs = melmat.double().numpy()
    if theirs.shape != ours.shape:
        raise EspnetFormatError(
            f"frontend_conf: the checkpoint's mel filterbank is {tuple(theirs.shape)}, the config gives {ours.shape}"
        )
    difference = float(np.abs(theirs - ours).max())
    if difference > MELMAT_TOLERANCE:
        raise EspnetFormatError(
            f"frontend_conf: the checkpoint's mel filterbank differs from the config's by {difference:.2e}"
        )
    return difference


def _build_model(mapping: EncoderMapping, vocab_size: int, extra: dict[str, Any], state: dict[str, Any]):

    from ..modeling.configuration_branchformer import BranchformerConfig
    from ..modeling.configuration_conformer import ConfigValueError, ConformerConfig
    from ..modeling.modeling_branchformer import BranchformerForCTC
    from ..modeling.modeling_conformer import ConformerForCTC

    config_class, model_class = {
        "conformer": (ConformerConfig, ConformerForCTC),
        "branchformer": (BranchformerConfig, BranchformerForCTC),
    }[mapping.family]
    try:
        config = config_class(vocab_size=vocab_size, pad_token_id=0, **mapping.kwargs, **extra)
    except ConfigValueError as error:
        raise EspnetFormatError(f"encoder_conf: {error}") from error
    return load_checked_state(model_class(config), state, EspnetFormatError, "encoder_conf")


def load_checked_state(model, state: dict, error: type[Exception], settings: str):
    """``model`` (eval mode) with exactly ``state`` loaded, as float32; a missing, unexpected or
    misshapen weight is one ``error`` line saying the checkpoint does not fit ``settings``."""
    import torch

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"no weights for {missing[0]}" if missing else f"unexpected weights {unexpected[0]}"
        raise error(f"the checkpoint does not fit {settings} ({detail})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise error(
                f"the checkpoint does not fit {settings} ({key}: {tuple(state[key].shape)} vs {tuple(tensor.shape)})"
            )
    float_state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    with torch.no_grad():
        model.load_state_dict(float_state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------- import


def _stamp(file: Path) -> dict[str, Any]:
    """A source file's name, size and sha256: what identifies it, without the local path (the
    record is uploaded with the model)."""
    stamp = source_stamp(file)
    return {"file": file.name, "size": stamp["size"], "sha256": stamp["sha256"]}


def import_espnet(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an ESPnet2 Conformer / Branchformer ASR model's CTC branch as an mla_convert
    ``ConformerForCTC`` / ``BranchformerForCTC`` directory with its processor and remote code.

    ``source`` is a ``config.yaml``, a directory holding one, or a Hub id; ``checkpoint`` defaults
    to ``valid.acc.ave.pth`` (or the only ``*.pth``) beside the config. Everything is written into a
    temp dir beside ``output_dir`` and renamed at the end, so a failure leaves nothing behind.
    """
    from ..frontend import build_processor
    from ..modeling.feature_extraction_conformer import ConformerFeatureExtractor

    output_dir = check_output_dir(Path(output_dir).expanduser().absolute(), overwrite)
    files = resolve_source(source, checkpoint)
    config = read_config(files.config)
    tokens = read_token_list(config, files.config)
    model_conf = dict(config.get("model_conf") or {})
    if float(model_conf.get("ctc_weight", 0.5)) == 0.0:
        raise EspnetFormatError("model_conf.ctc_weight: 0.0 means the model was trained without its CTC head")
    mapping = encoder_settings(config["encoder"], dict(config.get("encoder_conf") or {}))
    frontend = frontend_settings(config)
    specaug, specaug_left = specaug_settings(config)
    if config.get("preencoder") not in (None, "none") or config.get("postencoder") not in (None, "none"):
        raise EspnetFormatError("preencoder / postencoder: not supported (front end, normalize, encoder, CTC only)")

    state = read_state_dict(files.checkpoint)
    mean, std = cmvn_settings(config, state, files.config)
    extractor = ConformerFeatureExtractor(**frontend)
    melmat_difference = check_mel_matrix(state, extractor)
    weights, dropped = map_state_dict(state)
    if "lm_head.weight" not in weights:
        raise EspnetFormatError(f"{files.checkpoint}: no ctc.ctc_lo weights (the CTC head)")
    if weights["lm_head.weight"].shape[0] != len(tokens):
        raise EspnetFormatError(
            f"token_list: {len(tokens)} tokens, but the CTC head has {weights['lm_head.weight'].shape[0]} outputs"
        )
    model = _build_model(mapping, len(tokens), {**specaug, "input_dim": frontend["feature_size"]}, weights)
    dropped.pop("frontend", None), dropped.pop("normalize", None)  # moved into the feature extractor
    provenance = {
        "hub_id": files.hub_id,
        "encoder": mapping.family,
        "config": _stamp(files.config),
        "checkpoint": _stamp(files.checkpoint),
        "tokens": len(tokens),
        "dropped": dropped,
        "not_imported": mapping.not_imported + specaug_left,
        "mel_filterbank_max_difference": melmat_difference,
        "cmvn": "checkpoint" if "normalize.mean" in state else ("stats_file" if mean is not None else None),
    }
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        processor = build_processor(tokens, mean, std, espnet_token_list=True, directory=staging, **frontend)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return output_dir
