"""Import a FunASR Paraformer (Conformer encoder, SAN decoder, CIF predictor) into mla_convert's own
:class:`~mla_convert.modeling.modeling_paraformer.ParaformerForASR`.

A FunASR model directory is a ``config.yaml`` (``model: Paraformer``, ``encoder`` / ``decoder`` /
``predictor`` and their ``*_conf``, ``model_conf``, ``frontend`` / ``frontend_conf``,
``input_size``, the token list) and ``model.pt`` (the state dict, or a training checkpoint holding
it under ``"model"``). Both are read with PyYAML and ``torch.load(weights_only=True)``: FunASR is
not needed. Only ``encoder: ConformerEncoder`` + ``decoder: ParaformerSANDecoder`` +
``predictor: CifPredictorV2`` map one-to-one onto our model; the SANM models (Paraformer-large's
``SANMEncoder`` / ``ParaformerSANMDecoder``, FSMN memory blocks) are refused with a one-line error.

FunASR's ``ConformerEncoder`` is ESPnet's (same ``encoder_conf`` keys, same weight names), so the
encoder settings and weights go through the ESPnet importer's :func:`encoder_settings` and
:func:`rename_key`. The weights:

=================================================  ==================================================
FunASR (``Paraformer`` state dict)                 ours (``ParaformerForASR``)
=================================================  ==================================================
``encoder.embed.conv.{0,2}.*``                     ``model.encoder.embed.conv.{0,2}.*``
``encoder.embed.out.0.*``                          ``model.encoder.embed.out.*``
``encoder.encoders.N.self_attn.linear_q/k/v``      ``model.encoder.layers.N.self_attn.q/k/v_proj``
``encoder.encoders.N.self_attn.linear_out``        ``model.encoder.layers.N.self_attn.out_proj``
``encoder.encoders.N.self_attn.linear_pos``        ``model.encoder.layers.N.self_attn.pos_proj``
``encoder.encoders.N.self_attn.pos_bias_u/v``      ``model.encoder.layers.N.self_attn.pos_bias_u/v``
``encoder.encoders.N.feed_forward(_macaron).*``    ``model.encoder.layers.N.feed_forward(_macaron).*``
``encoder.encoders.N.conv_module.*``               ``model.encoder.layers.N.conv_module.*``
``encoder.encoders.N.norm_{ff,mha,conv,...}``      ``model.encoder.layers.N.norm_{ff,mha,conv,...}``
``encoder.after_norm.*``                           ``model.encoder.after_norm.*``
``predictor.cif_conv1d.*``, ``cif_output.*``       ``model.predictor.cif_conv1d.*``, ``cif_output.*``
``decoder.embed.0.weight``                         ``model.decoder.embed_tokens.weight``
``decoder.decoders.N.self_attn.linear_q/k/v/out``  ``model.decoder.layers.N.self_attn.q/k/v/out_proj``
``decoder.decoders.N.src_attn.linear_q/k/v/out``   ``model.decoder.layers.N.src_attn.q/k/v/out_proj``
``decoder.decoders.N.feed_forward.w_1/w_2``        ``model.decoder.layers.N.feed_forward.w_1/w_2``
``decoder.decoders.N.norm1/2/3``                   ``model.decoder.layers.N.norm1/2/3``
``decoder.after_norm.*``                           ``model.decoder.after_norm.*``
``decoder.output_layer.*``                         ``model.decoder.output_layer.*``
``ctc.ctc_lo.*`` (``ctc_weight`` > 0)              ``ctc_head.*``
=================================================  ==================================================

Inference (encoder output, CIF weights, fired token counts, decoder logits) is FunASR's;
``scripts/check_funasr.py`` checks it against FunASR itself. Documented differences, all of them
training only: FunASR's ``decoder.embed`` scales the embedding by sqrt(d) and adds sinusoidal
positions before the glancing sampler uses it (ours is the bare ``embed_tokens``). The losses are
mixed as FunASR does (``(1 - ctc_weight) * decoder + ctc_weight * ctc + predictor_weight * quantity``).

The processor: the token list (``<blank>``, ``<s>``, ``</s>``, ..., ``<unk>``) becomes a
:class:`ParaformerTokenizer` through :func:`mla_convert.frontend.build_processor`
(``espnet_token_list=True``). ESPnet's vocabulary writes ``<sos/eos>`` as nothing; FunASR's eos
(``</s>``, or the id ``model_conf.eos`` names) is given that role, and ``<s>`` (never an output of
the decoder) keeps its text. FunASR's ``DefaultFrontend`` (ESPnet's log-mel STFT front end) maps
onto :class:`ConformerFeatureExtractor`; its usual ``WavFrontend`` (Kaldi fbank, low frame rate
stacking, ``cmvn_file``) does not, and then only the tokenizer is written and the record says so:
feed features computed by FunASR's front end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MlaConvertError, ModelNotFoundError
from ..io import atomic_output_dir, check_output_dir
from .espnet import (
    EspnetFormatError,
    _read_yaml,
    _stamp,
    cmvn_settings,
    encoder_settings,
    frontend_settings,
    load_checked_state,
    rename_key,
)
from .espnet import read_state_dict as espnet_state_dict

PROVENANCE_FILE = "funasr_import.json"
MODELS = ("Paraformer",)
ENCODER = "ConformerEncoder"
DECODER = "ParaformerSANDecoder"
PREDICTOR = "CifPredictorV2"
_ONE_TO_ONE = f"only {ENCODER} + {DECODER} map one-to-one onto mla_convert's Paraformer"
# FunASR Paraformer ``__init__`` defaults of the settings we read
_MODEL_DEFAULTS = {
    "ctc_weight": 0.5,
    "lsm_weight": 0.0,
    "predictor_weight": 0.0,
    "predictor_bias": 0,
    "sampling_ratio": 0.2,
    "blank_id": 0,
    "eos": 2,
}
_MODEL_KEYS = set(_MODEL_DEFAULTS) | {
    "ignore_id", "sos", "length_normalized_loss", "share_embedding", "use_1st_decoder_loss", "vocab_size",
    "input_size",
}  # fmt: skip
_DECODER_KEYS = {
    "attention_heads", "linear_units", "num_blocks", "dropout_rate", "positional_dropout_rate",
    "self_attention_dropout_rate", "src_attention_dropout_rate", "input_layer", "use_output_layer",
    "normalize_before", "concat_after", "embeds_id",
}  # fmt: skip
_PREDICTOR_KEYS = {
    "idim", "l_order", "r_order", "threshold", "dropout", "smooth_factor", "noise_threshold", "tail_threshold",
    "tail_mask", "tf2torch_tensor_name_prefix_torch", "tf2torch_tensor_name_prefix_tf",
}  # fmt: skip
_DECODER_RENAMES = {"linear_q": "q_proj", "linear_k": "k_proj", "linear_v": "v_proj", "linear_out": "out_proj"}
EOS_TOKENS = ("</s>", "<sos/eos>")


class FunasrFormatError(MlaConvertError):
    """A FunASR model this importer cannot read or reproduce; the message names the setting."""


class FunasrUnsupportedError(FunasrFormatError):
    """A FunASR encoder / decoder / predictor class that has no one-to-one counterpart here."""


@dataclass(frozen=True)
class FunasrSource:
    config: Path
    checkpoint: Path


# ------------------------------------------------------------------------------------------ reading


def resolve_source(source: str | os.PathLike | tuple | list) -> FunasrSource:
    """A FunASR model: a directory holding ``config.yaml`` and ``model.pt`` (or the only ``*.pt``),
    or the two files ``(config.yaml, model.pt)``."""
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ModelNotFoundError("give a FunASR model directory, or its (config.yaml, model.pt) files")
        config, checkpoint = (Path(item).expanduser() for item in source)
        for file in (config, checkpoint):
            if not file.is_file():
                raise ModelNotFoundError(f"no such file: {file}")
        return FunasrSource(config, checkpoint)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"no such FunASR model directory: {source}")
    config = path / "config.yaml"
    if not config.is_file():
        raise ModelNotFoundError(f"{path} has no config.yaml: not a FunASR model directory")
    checkpoint = path / "model.pt"
    if not checkpoint.is_file():
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            what = "no *.pt checkpoint" if not found else f"several *.pt files ({', '.join(f.name for f in found[:3])})"
            raise ModelNotFoundError(f"{path} has {what}; name the model.pt to import")
        checkpoint = found[0]
    return FunasrSource(config, checkpoint)


def _read(call, *args):
    try:
        return call(*args)
    except EspnetFormatError as error:  # the shared ESPnet readers: same message, our error
        raise FunasrFormatError(str(error)) from None


def read_config(path: Path) -> dict:
    """A FunASR Paraformer ``config.yaml``, checked for the classes that map one-to-one."""
    config = _read(_read_yaml, path)
    model = config.get("model", "Paraformer")
    if model not in MODELS:
        raise FunasrUnsupportedError(f"model: {model!r} is not importable; mla_convert imports FunASR's Paraformer")
    encoder, decoder = config.get("encoder"), config.get("decoder")
    if encoder != ENCODER:
        raise FunasrUnsupportedError(f"encoder: {encoder!r} is not supported; {_ONE_TO_ONE}")
    if decoder != DECODER:
        raise FunasrUnsupportedError(f"decoder: {decoder!r} is not supported; {_ONE_TO_ONE}")
    predictor = config.get("predictor")
    if predictor != PREDICTOR:
        raise FunasrUnsupportedError(f"predictor: {predictor!r} is not supported (only {PREDICTOR})")
    return config


def _token_file(value: str, config_path: Path) -> list[str]:
    file = Path(value)
    if not file.is_absolute() and not file.exists():
        file = config_path.parent / file.name
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise FunasrFormatError(f"token_list: cannot read {value} ({error.strerror or error})") from error
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise FunasrFormatError(f"token_list: {file.name} is not a JSON list ({error.msg})") from error
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def read_token_list(config: dict, config_path: Path) -> list[str]:
    """``token_list`` (a list, or a ``tokens.txt`` / ``tokens.json``), else ``tokenizer_conf.token_list``."""
    tokens = config.get("token_list")
    if tokens is None:
        tokens = (config.get("tokenizer_conf") or {}).get("token_list")
    if tokens is None:
        raise FunasrFormatError("token_list: missing (neither token_list nor tokenizer_conf.token_list)")
    if isinstance(tokens, str):
        tokens = _token_file(tokens, config_path)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise FunasrFormatError("token_list: expected a list of tokens (strings)")
    if tokens[0] != "<blank>":
        raise FunasrFormatError(f"token_list: the first token must be the blank '<blank>', got {tokens[0]!r}")
    return tokens


def read_state_dict(path: Path) -> dict[str, Any]:
    """The state dict of ``model.pt``: the ESPnet importer's reader, with this importer's errors."""
    return espnet_state_dict(path, FunasrFormatError)


# -------------------------------------------------------------------------------------- settings


def _known(conf: dict, section: str, known: set[str]) -> None:
    unknown = sorted(set(conf) - known)
    if unknown:
        raise FunasrFormatError(f"{section}.{unknown[0]}: not a FunASR setting this importer knows")


def _require(conf: dict, section: str, key: str, default: Any, allowed: tuple, why: str) -> None:
    value = conf.get(key, default)
    if value not in allowed:
        raise FunasrFormatError(f"{section}.{key}: {value!r} is not supported ({why})")


def model_settings(config: dict) -> dict[str, Any]:
    """``model_conf`` (and the top-level copies FunASR also accepts) with FunASR's defaults."""
    conf = dict(config.get("model_conf") or {})
    _known(conf, "model_conf", _MODEL_KEYS)
    settings = {key: conf.get(key, config.get(key, default)) for key, default in _MODEL_DEFAULTS.items()}
    if settings["blank_id"] != 0:
        raise FunasrFormatError(f"model_conf.blank_id: {settings['blank_id']!r} is not supported (0, '<blank>')")
    if conf.get("share_embedding"):
        raise FunasrFormatError("model_conf.share_embedding: true is not supported (separate output layer only)")
    return settings


def decoder_settings(conf: dict) -> dict[str, Any]:
    """``ParaformerSANDecoder`` ``decoder_conf`` -> our decoder's keyword arguments."""
    section = "decoder_conf"
    _known(conf, section, _DECODER_KEYS)
    _require(conf, section, "normalize_before", True, (True,), "pre-norm layers only")
    _require(conf, section, "concat_after", False, (False,), "concat_after is not implemented")
    _require(conf, section, "use_output_layer", True, (True,), "the decoder's output layer is needed")
    _require(conf, section, "input_layer", "embed", ("embed",), "the token embedding input layer only")
    return {
        "decoder_layers": int(conf.get("num_blocks", 6)),
        "decoder_attention_heads": int(conf.get("attention_heads", 4)),
        "decoder_intermediate_size": int(conf.get("linear_units", 2048)),
    }


def predictor_settings(conf: dict, hidden_size: int) -> dict[str, Any]:
    """``CifPredictorV2`` ``predictor_conf`` -> our ``predictor_*`` keys."""
    section = "predictor_conf"
    _known(conf, section, _PREDICTOR_KEYS)
    _require(conf, section, "tail_mask", True, (True,), "the tail frame after each sequence's own end only")
    if conf.get("idim", hidden_size) != hidden_size:
        raise FunasrFormatError(
            f"{section}.idim: {conf['idim']!r} differs from the encoder's output_size {hidden_size}"
        )
    for key in ("l_order", "r_order"):
        if key not in conf:
            raise FunasrFormatError(f"{section}.{key}: missing (CifPredictorV2 has no default)")
    return {
        "predictor_l_order": int(conf["l_order"]),
        "predictor_r_order": int(conf["r_order"]),
        "predictor_threshold": float(conf.get("threshold", 1.0)),
        "predictor_smooth_factor": float(conf.get("smooth_factor", 1.0)),
        "predictor_noise_threshold": float(conf.get("noise_threshold", 0.0)),
        "predictor_tail_threshold": float(conf.get("tail_threshold", 0.0)),
    }


def eos_id(model: dict[str, Any], tokens: list[str]) -> int:
    """FunASR's eos: ``model_conf.eos`` (FunASR's default 2; ``None`` = the last id)."""
    eos = model["eos"]
    return len(tokens) - 1 if eos is None else int(eos)


def processor_tokens(tokens: list[str], eos: int) -> list[str]:
    """The token list as :func:`espnet_vocabulary` reads it: the eos token renamed ``<sos/eos>``
    (which decodes to nothing); with no eos-like token at that id, the list as it is."""
    tokens = list(tokens)
    if 0 < eos < len(tokens) and tokens[eos] in EOS_TOKENS:
        tokens[eos] = "<sos/eos>"
    return tokens


def frontend_processor_settings(config: dict) -> tuple[dict[str, Any] | None, str | None]:
    """``(feature extractor arguments, None)`` for FunASR's ``DefaultFrontend``; ``(None, why)``
    for a front end :class:`ConformerFeatureExtractor` does not reproduce."""
    frontend = config.get("frontend")
    if frontend in ("DefaultFrontend", "default"):
        return _read(frontend_settings, {**config, "frontend": "default"}), None
    if frontend is None:
        return None, "no frontend in config.yaml: the model reads features"
    conf = config.get("frontend_conf") or {}
    return None, (
        f"frontend {frontend} ({', '.join(f'{k}={v}' for k, v in conf.items())}) is not reproduced by "
        "ConformerFeatureExtractor; compute input features with FunASR's frontend"
    )


# ------------------------------------------------------------------------------------------ weights


def rename_funasr_key(key: str) -> str | None:
    """A FunASR Paraformer parameter name -> ours (``None``: not part of our model)."""
    if key.startswith("encoder."):
        return "model." + rename_key(key)  # the ESPnet importer's ConformerEncoder names
    if key.startswith("ctc.ctc_lo."):
        return "ctc_head." + key[len("ctc.ctc_lo.") :]
    if key.startswith("predictor."):
        return "model." + key
    if key.startswith("decoder.embed.0."):
        return "model.decoder.embed_tokens." + key[len("decoder.embed.0.") :]
    if not key.startswith("decoder."):
        return None
    parts = key.split(".")
    if parts[1] == "decoders":
        parts[1] = "layers"
        if len(parts) > 4 and parts[3] in ("self_attn", "src_attn"):
            parts[4] = _DECODER_RENAMES.get(parts[4], parts[4])
    return "model." + ".".join(parts)


def map_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """``(our state dict, {dropped prefix: tensor count})``."""
    mapped: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    for key, tensor in state.items():
        new = rename_funasr_key(key)
        if new is None:
            prefix = key.split(".")[0]
            dropped[prefix] = dropped.get(prefix, 0) + 1
            continue
        mapped[new] = tensor
    return mapped, dropped


def _build_model(kwargs: dict[str, Any], state: dict[str, Any]):
    """The ``ParaformerForASR`` of the mapped settings with exactly the mapped weights."""
    from ..modeling.configuration_conformer import ConfigValueError
    from ..modeling.configuration_paraformer import ParaformerConfig
    from ..modeling.modeling_paraformer import ParaformerForASR

    try:
        config = ParaformerConfig(**kwargs)
    except ConfigValueError as error:
        raise FunasrFormatError(f"config.yaml: {error}") from error
    return load_checked_state(ParaformerForASR(config), state, FunasrFormatError, "config.yaml")


# ------------------------------------------------------------------------------------------- import


def import_funasr(
    directory_or_files: str | os.PathLike | tuple | list,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a FunASR Paraformer (``ConformerEncoder`` + ``ParaformerSANDecoder`` +
    ``CifPredictorV2``) as an mla_convert ``ParaformerForASR`` directory with its tokenizer (and
    feature extractor, for FunASR's ``DefaultFrontend``), remote code and ``funasr_import.json``.

    ``directory_or_files``: a directory with ``config.yaml`` and ``model.pt``, or those two files.
    Everything is written into a temp dir beside ``output`` and renamed at the end.
    """
    from ..frontend import build_processor
    from ..modeling.tokenization_paraformer import ParaformerTokenizer

    output = check_output_dir(Path(output).expanduser().absolute(), overwrite)
    files = resolve_source(directory_or_files)
    config = read_config(files.config)
    tokens = read_token_list(config, files.config)
    model = model_settings(config)
    encoder = _read(encoder_settings, "conformer", dict(config.get("encoder_conf") or {}))
    hidden = encoder.kwargs["hidden_size"]
    decoder = decoder_settings(dict(config.get("decoder_conf") or {}))
    predictor = predictor_settings(dict(config.get("predictor_conf") or {}), hidden)
    if config.get("specaug") not in (None, "none"):
        encoder.not_imported.append(f"specaug: {config['specaug']} (training only)")
    state = read_state_dict(files.checkpoint)
    weights, dropped = map_state_dict(state)

    vocab = config.get("vocab_size", (config.get("model_conf") or {}).get("vocab_size", len(tokens)))
    if vocab not in (-1, len(tokens)):
        raise FunasrFormatError(f"vocab_size: {vocab} differs from the token list's {len(tokens)} tokens")
    output_rows = weights.get("model.decoder.output_layer.weight")
    if output_rows is None:
        raise FunasrFormatError(f"{files.checkpoint}: no decoder.output_layer weights")
    if output_rows.shape[0] != len(tokens):
        raise FunasrFormatError(f"token_list: {len(tokens)} tokens, but the decoder has {output_rows.shape[0]} outputs")
    ctc_weight = float(model["ctc_weight"])
    if ctc_weight > 0 and "ctc_head.weight" not in weights:
        raise FunasrFormatError(f"model_conf.ctc_weight: {ctc_weight} but the checkpoint has no ctc.ctc_lo weights")
    if ctc_weight == 0:
        for key in [key for key in weights if key.startswith("ctc_head.")]:
            del weights[key]
            dropped["ctc"] = dropped.get("ctc", 0) + 1
    eos = eos_id(model, tokens)
    extractor, frontend_note = frontend_processor_settings(config)
    input_size = int(config.get("input_size", (config.get("model_conf") or {}).get("input_size", 80)))
    if extractor is not None and extractor["feature_size"] != input_size:
        raise FunasrFormatError(f"input_size: {input_size}, but the frontend gives {extractor['feature_size']} mels")
    normalize = config.get("normalize")
    if normalize not in (None, "none") and extractor is None:
        raise FunasrFormatError(f"normalize: {normalize!r} is only supported with the DefaultFrontend")
    mean = std = None
    if normalize not in (None, "none"):
        if normalize not in ("GlobalMVN", "global_mvn"):
            raise FunasrFormatError(f"normalize: {normalize!r} is not supported (GlobalMVN or none)")
        mean, std = _read(cmvn_settings, {**config, "normalize": "global_mvn"}, state, files.config)

    kwargs = {
        **encoder.kwargs,
        **decoder,
        **predictor,
        "vocab_size": len(tokens),
        "pad_token_id": 0,
        "eos_token_id": eos,
        "input_dim": input_size,
        "specaugment": False,
        "predictor_bias": int(model["predictor_bias"]),
        "predictor_weight": float(model["predictor_weight"]),
        "sampling_ratio": float(model["sampling_ratio"]),
        "lsm_weight": float(model["lsm_weight"]),
        "ctc_weight": ctc_weight,
    }
    built = _build_model(kwargs, weights)
    for prefix in ("frontend", "normalize"):
        dropped.pop(prefix, None)
    provenance = {
        "source": "funasr",
        "model": config.get("model", "Paraformer"),
        "encoder": ENCODER,
        "decoder": DECODER,
        "predictor": PREDICTOR,
        "config": _stamp(files.config),
        "checkpoint": _stamp(files.checkpoint),
        "tokens": len(tokens),
        "eos_token_id": eos,
        "dropped": dropped,
        "not_imported": encoder.not_imported,
        "frontend": frontend_note or "DefaultFrontend -> ConformerFeatureExtractor",
        "training_differences": [
            "decoder.embed: FunASR scales the glancing sampler's token embedding by sqrt(d) and adds positions",
        ],
    }
    vocabulary = processor_tokens(tokens, eos)
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        try:
            if extractor is not None:
                processor = build_processor(
                    vocabulary, mean, std, espnet_token_list=True, directory=staging,
                    tokenizer_class=ParaformerTokenizer, **extractor,
                )  # fmt: skip
            else:
                from ..frontend import tokenizer_from_token_list

                processor = tokenizer_from_token_list(vocabulary, staging, ParaformerTokenizer)
        except ValueError as error:
            raise FunasrFormatError(f"token_list: {error}") from error
        built.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return output
