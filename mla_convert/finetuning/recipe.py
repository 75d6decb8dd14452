"""Training recipes: a YAML file naming a Conformer / Branchformer CTC model or a Paraformer, its
front end and how to train it (``mla-convert train --config configs/X.yaml``).

Layout::

    model:
      family: conformer          # or branchformer, paraformer
      size: small                # small (default) | large; every other key overrides the preset
      attention: {type: mla, latent_dim: 64}
    frontend: {n_fft: 512, win_length: 400, hop_length: 160, n_mels: 80}
    training:                    # FinetuneConfig fields (not model / teacher / freeze)
      data: [../shared/data/LibriSpeech]
      lr: 1.0e-3
    seed: 42                     # the model's initialisation and the training run

Every key is checked when the recipe is read, before any data is read or model built: an unknown
key (against the config class's ``__init__``, the shared base's, the feature extractor's and the
``FinetuneConfig`` fields), a value of the wrong type, or one the config class refuses is one line
naming the key by its YAML path (``model.attention.latent_dim: ...``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..data import check_split
from ..errors import MlaConvertError
from ..modeling.configuration_branchformer import BranchformerConfig
from ..modeling.configuration_conformer import ConfigValueError, ConformerConfig, SpeechEncoderCTCConfig
from ..modeling.configuration_paraformer import ParaformerConfig
from ..modeling.feature_extraction_conformer import ConformerFeatureExtractor
from .config import FinetuneConfig, FinetuneError, check_settings, parse_test_splits

SECTIONS = ("model", "frontend", "training", "seed")
FAMILIES: dict[str, type[SpeechEncoderCTCConfig]] = {
    "conformer": ConformerConfig,
    "branchformer": BranchformerConfig,
    "paraformer": ParaformerConfig,
}
_SHARED_LARGE = dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=12)
# small trains on a 2-core CPU; large is the earlier framework's (and ESPnet's LibriSpeech) setting
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "conformer": {
        "small": dict(hidden_size=144, num_attention_heads=4, num_hidden_layers=4, intermediate_size=576,
                      conv_kernel_size=15),
        "large": dict(_SHARED_LARGE, intermediate_size=2048, conv_kernel_size=31),
    },
    "branchformer": {
        "small": dict(hidden_size=144, num_attention_heads=4, num_hidden_layers=4, cgmlp_linear_units=576,
                      cgmlp_conv_kernel=15),
        "large": dict(_SHARED_LARGE, cgmlp_linear_units=2048, cgmlp_conv_kernel=31),
    },
    # the encoder as the Conformer's; large: a 6-layer decoder of the encoder's width (FunASR's
    # Conformer-Paraformer recipes pair 12 encoder blocks with 6 decoder blocks of 2048 units)
    "paraformer": {
        "small": dict(hidden_size=144, num_attention_heads=4, num_hidden_layers=4, intermediate_size=576,
                      conv_kernel_size=15, decoder_layers=2, decoder_attention_heads=4,
                      decoder_intermediate_size=576),
        "large": dict(_SHARED_LARGE, intermediate_size=2048, conv_kernel_size=31, decoder_layers=6,
                      decoder_attention_heads=8, decoder_intermediate_size=2048),
    },
}  # fmt: skip
DEFAULT_SEED = 42

# keys a recipe does not set, and why
MODEL_SET_BY_TRAIN = {
    "vocab_size": "set by train from the training transcripts' characters",
    "input_dim": "set by frontend.n_mels",
    "pad_token_id": "the CTC blank is token 0 of the character vocabulary",
    "attention_conversion": "written by mla-convert convert, not trained",
    "ctc_loss_reduction": "training uses the per-utterance mean",
    "ctc_zero_infinity": "training always zeroes infinite losses",
    "predictor_bias": "a character vocabulary has no eos token; predictor_bias 1 is for imported FunASR models",
    "eos_token_id": "a character vocabulary has no eos token; predictor_bias 1 is for imported FunASR models",
}
FRONTEND_SET_BY_TRAIN = {
    "feature_size": "write n_mels",
    "cmvn_mean": "computed by train over the training utterances",
    "cmvn_std": "computed by train over the training utterances",
    "padding_value": "not a recipe setting",
    "return_attention_mask": "the models always take the frame mask",
}
FRONTEND_EXTRA = {"n_mels": int, "cmvn_utterances": int | None}
TRAINING_NOT_IN_RECIPE = {
    "model": "the model is built from the model section",
    "output": "give --output on the command line",
    "teacher": "distillation needs a trained teacher: fine-tune the trained model with mla-convert finetune",
    "distill_weight": "distillation needs a trained teacher: fine-tune the trained model with mla-convert finetune",
    "distill_only": "distillation needs a trained teacher: fine-tune the trained model with mla-convert finetune",
    "temperature": "distillation needs a trained teacher: fine-tune the trained model with mla-convert finetune",
    "freeze": "a model trained from scratch trains every parameter",
    "resume": "a command-line option (--resume)",
    "progress": "a command-line option (--quiet)",
    "seed": "set it at the top level (seed: N): it seeds the initialisation and the training",
}


class RecipeError(FinetuneError):
    """A training recipe that cannot run: a missing file, bad YAML, an unknown key or a bad value."""


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: the model config kwargs (size preset + overrides, without the vocabulary
    size), the feature extractor kwargs, the ``FinetuneConfig`` fields and the seed."""

    path: Path
    family: str
    size: str
    model: dict[str, Any]
    frontend: dict[str, Any]
    training: dict[str, Any]
    seed: int
    text: str
    cmvn_utterances: int | None = None

    @property
    def config_class(self) -> type[SpeechEncoderCTCConfig]:
        return FAMILIES[self.family]

    @property
    def sampling_rate(self) -> int:
        return int(self.frontend.get("sampling_rate", 16000))

    def model_config(self, vocab_size: int) -> SpeechEncoderCTCConfig:
        input_dim = self.frontend.get("feature_size", 80)
        return self.config_class(vocab_size=vocab_size, input_dim=input_dim, **self.model)

    def build_model(self, vocab_size: int, device: str | None = None):
        """The untrained ``ConformerForCTC`` / ``BranchformerForCTC`` / ``ParaformerForASR``,
        initialised from ``seed`` (``device="meta"``: shapes only, for parameter counts)."""
        import torch

        model_class = model_class_of(self.family)
        config = self.model_config(vocab_size)
        if device == "meta":
            with torch.device("meta"):
                return model_class(config)
        torch.manual_seed(self.seed)
        return model_class(config)

    def finetune_config(self, output: str | Path, model: str | Path, **settings: Any) -> FinetuneConfig:
        """The run's settings: the training section, then ``settings`` (command-line overrides)."""
        values = {**self.training, **{k: v for k, v in settings.items() if v is not None}}
        return FinetuneConfig(model=str(model), output=str(output), freeze="none", seed=self.seed, **values)

    def resolved(self) -> dict[str, Any]:
        """What builds the start model (``initial/train_recipe.json``; ``--resume`` compares it)."""
        return {
            "family": self.family,
            "size": self.size,
            "model": self.model,
            "frontend": self.frontend,
            "seed": self.seed,
            "cmvn_utterances": self.cmvn_utterances,
        }


def model_class_of(family: str) -> type:
    """The trainable model class of a family."""
    from ..modeling.modeling_branchformer import BranchformerForCTC
    from ..modeling.modeling_conformer import ConformerForCTC
    from ..modeling.modeling_paraformer import ParaformerForASR

    return {"conformer": ConformerForCTC, "branchformer": BranchformerForCTC, "paraformer": ParaformerForASR}[family]


def tokenizer_class_of(family: str) -> type:
    """The tokenizer class of a family: CTC's (repeats merged) or the Paraformer's (kept)."""
    from transformers import Wav2Vec2CTCTokenizer

    from ..modeling.tokenization_paraformer import ParaformerTokenizer

    return ParaformerTokenizer if family == "paraformer" else Wav2Vec2CTCTokenizer


# ------------------------------------------------------------------------------------------- reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({where}{problem})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with {', '.join(SECTIONS)}; got {type(values).__name__}")
    return values, text


def _unknown(path: str, key: str, known, why: Mapping[str, str] | None = None) -> RecipeError:
    if why and key in why:
        return RecipeError(f"{path}{key}: not set in a recipe ({why[key]})")
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return RecipeError(f"{path}{key}: unknown key{hint}")


def _section(values: dict[str, Any], name: str) -> dict[str, Any]:
    section = values.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"{name}: expected a mapping of settings, got {section!r}")
    return dict(section)


# ---------------------------------------------------------------------------------------- value types

_UNION = type(int | None)  # types.UnionType: what get_origin gives for ``X | None``


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _checked(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the annotated type ``hint``: ints and numeric strings (YAML reads ``1e-3``
    without a dot as text) become floats; anything else of the wrong type is a one-line error."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, _UNION) else (hint,)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise RecipeError(f"{key}: a value is needed (expected {_type_name(hint)})")
    for option in options:
        base = typing.get_origin(option) or option
        if option is Any:
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, (list, str)):
            return [value] if isinstance(value, str) else list(value)
        if base is dict and isinstance(value, dict):
            return value
    if float in options and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise RecipeError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _init_parameters(*classes: type) -> dict[str, Any]:
    """Keyword parameters of the classes' ``__init__`` (with their type hints), ``**kwargs`` left out."""
    parameters: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls.__init__)
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                parameters.setdefault(name, hints.get(name, Any))
    return parameters


# ------------------------------------------------------------------------------------------ sections


def _model_section(section: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    family = section.pop("family", None)
    if family is None:
        raise RecipeError(f"model.family: missing; choose {' or '.join(FAMILIES)}")
    if family not in FAMILIES:
        raise RecipeError(f"model.family: unknown family {family!r}; choose {' or '.join(FAMILIES)}")
    size = section.pop("size", "small")
    if size not in SIZES[family]:
        raise RecipeError(f"model.size: unknown size {size!r}; choose {' or '.join(SIZES[family])}")
    config_class = FAMILIES[family]
    parameters = _init_parameters(*[cls for cls in config_class.__mro__ if issubclass(cls, SpeechEncoderCTCConfig)])
    known = [*parameters, "family", "size"]
    kwargs = dict(SIZES[family][size])
    for key, value in section.items():
        if key not in parameters or key in MODEL_SET_BY_TRAIN:
            raise _unknown("model.", key, [k for k in known if k not in MODEL_SET_BY_TRAIN], MODEL_SET_BY_TRAIN)
        kwargs[key] = _checked(f"model.{key}", value, parameters[key])
    return family, size, kwargs


def _frontend_section(section: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    parameters = _init_parameters(ConformerFeatureExtractor)
    allowed = {k: v for k, v in parameters.items() if k not in FRONTEND_SET_BY_TRAIN}
    allowed.update(FRONTEND_EXTRA)
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key not in allowed:
            raise _unknown("frontend.", key, allowed, FRONTEND_SET_BY_TRAIN)
        kwargs[key] = _checked(f"frontend.{key}", value, allowed[key])
    cmvn_utterances = kwargs.pop("cmvn_utterances", None)
    if cmvn_utterances is not None and cmvn_utterances < 1:
        raise RecipeError(f"frontend.cmvn_utterances: must be at least 1 (got {cmvn_utterances})")
    if "n_mels" in kwargs:
        kwargs["feature_size"] = kwargs.pop("n_mels")
    for key in ("feature_size", "n_fft", "win_length", "hop_length", "sampling_rate"):
        if key in kwargs and kwargs[key] < 1:
            name = "n_mels" if key == "feature_size" else key
            raise RecipeError(f"frontend.{name}: must be a positive integer (got {kwargs[key]})")
    try:
        ConformerFeatureExtractor(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"frontend: {error}") from None
    return kwargs, cmvn_utterances


def _training_section(section: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(FinetuneConfig)
    allowed = {f.name: hints[f.name] for f in fields(FinetuneConfig) if f.name not in TRAINING_NOT_IN_RECIPE}
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in allowed:
            raise _unknown("training.", key, allowed, TRAINING_NOT_IN_RECIPE)
        values[key] = _checked(f"training.{key}", value, allowed[key])
    if "data" in values:
        values["data"] = [str(source) for source in values["data"]]
    return values


def check_training(training: dict[str, Any]) -> None:
    """The ``FinetuneConfig`` checks of the settings, each error naming its ``training.`` key."""
    for key in ("train_split", "eval_split"):
        if key in training:
            try:
                check_split(training[key])
            except MlaConvertError as error:
                raise RecipeError(f"training.{key}: {error}") from None
    if "test_splits" in training:
        try:
            parse_test_splits(training["test_splits"])
        except MlaConvertError as error:
            raise RecipeError(f"training.test_splits: {error}") from None
    probe = FinetuneConfig(model="-", output="-", freeze="none", **{"data": ["hub"], **training})
    try:
        check_settings(probe)
    except FinetuneError as error:
        message = str(error)
        flag = re.search(r"--([a-z][a-z-]*)", message)  # the command-line flag the check names
        key = flag.group(1).replace("-", "_") if flag else ""
        if key in training:
            raise RecipeError(f"training.{key}: {message}") from None
        raise RecipeError(f"training: {message}") from None


def _check_model(family: str, kwargs: dict[str, Any], input_dim: int) -> None:
    """Build the config (ConfigValueError names its key) and the model on the meta device."""
    import torch

    try:
        config = FAMILIES[family](vocab_size=32, input_dim=input_dim, **kwargs)
    except ConfigValueError as error:
        raise RecipeError(f"model.{error}") from None
    except (ValueError, TypeError) as error:
        raise RecipeError(f"model: {error}") from None
    model_class = model_class_of(family)
    try:
        with torch.device("meta"):
            model_class(config)
    except ValueError as error:  # e.g. too few mel bands for the subsampling
        raise RecipeError(f"model: {error} (frontend.n_mels sets input_dim)") from None


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and check a recipe. ``overrides`` (``{"model": {...}, "frontend": {...}, "training":
    {...}, "seed": N}``) update the file's sections before the checks, key by key."""
    path = Path(path)
    values, text = _read_yaml(path)
    for key, value in (overrides or {}).items():
        if key not in SECTIONS:
            raise _unknown("", key, SECTIONS)
        values[key] = {**_section(values, key), **value} if key != "seed" else value
    for key in values:
        if key not in SECTIONS:
            raise _unknown("", key, SECTIONS)
    family, size, model = _model_section(_section(values, "model"))
    frontend, cmvn_utterances = _frontend_section(_section(values, "frontend"))
    training = _training_section(_section(values, "training"))
    seed = values.get("seed", DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RecipeError(f"seed: must be a non-negative integer (got {seed!r})")
    check_training(training)
    _check_model(family, model, frontend.get("feature_size", 80))
    return Recipe(path, family, size, model, frontend, training, seed, text, cmvn_utterances)
