"""A converted Whisper directory is an ordinary Whisper for every HF tool, on a machine without
mla_convert: ``pipeline("automatic-speech-recognition")`` (plain, chunked long-form with batches,
timestamps), ``AutoProcessor`` without a prompt, and Whisper's English normaliser with its
spelling map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import librispeech_utterances, needs_librispeech
from helpers import run_without_mla_convert

from mla_convert import MLASpec
from mla_convert.checkpoint import convert_checkpoint

pytestmark = needs_librispeech


@pytest.fixture(scope="module")
def lossless_mla(imported_whisper, tmp_path_factory):
    """The bundled tiny.en with its decoder self-attention as MLA at full rank (d_c 384)."""
    output = tmp_path_factory.mktemp("pipeline") / "mla-384"
    convert_checkpoint(str(imported_whisper), MLASpec(latent_dim=384), output, progress=False)
    rows = librispeech_utterances("dev-clean")
    audio = np.concatenate([sf.read(path, dtype="float32")[0] for _, path, _ in rows[:6]])
    np.save(output.parent / "long.npy", audio)  # ~40 s: more than one 30-s window
    np.save(output.parent / "short.npy", sf.read(rows[0][1], dtype="float32")[0])
    return output


def test_converted_config_keeps_whisper_model_type_and_maps_the_converted_classes(lossless_mla):
    config = json.loads((lossless_mla / "config.json").read_text())
    assert config["model_type"] == "whisper"
    assert config["auto_map"]["AutoModelForSpeechSeq2Seq"].endswith("ConvertedWhisperForConditionalGeneration")
    assert config["attention_conversion"]["layers"]
    assert config.get("suppress_tokens") is None  # generation settings live in generation_config.json only
    assert json.loads((lossless_mla / "generation_config.json").read_text())["suppress_tokens"]
    tokenizer_config = json.loads((lossless_mla / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)


def test_pipeline_on_a_converted_whisper_without_mla_convert(lossless_mla, imported_whisper):
    """Full rank MLA transcribes exactly like the original through every pipeline mode."""
    out = run_without_mla_convert(
        f"""
        import json
        import numpy as np
        from transformers import AutoProcessor, pipeline

        processor = AutoProcessor.from_pretrained("mla-384")  # no remote-code prompt
        short, long = np.load("short.npy"), np.load("long.npy")
        results = {{}}
        for name, path in (("converted", "mla-384"), ("original", {str(imported_whisper)!r})):
            asr = pipeline("automatic-speech-recognition", model=path, trust_remote_code=True)
            results[name] = {{
                "class": type(asr.model).__name__,
                "module": type(asr.model).__module__,
                "plain": asr(short)["text"],
                "chunked": asr(long, chunk_length_s=30, batch_size=2)["text"],
                "timestamps": [c["timestamp"] for c in asr(short, return_timestamps=True)["chunks"]],
            }}
        results["normalized"] = processor.tokenizer.normalize("The counselled colour, Mr. Smith")
        print(json.dumps(results))
        """,
        cwd=lossless_mla.parent,
        timeout=900,
    )
    results = json.loads(out.strip().splitlines()[-1])
    converted, original = results["converted"], results["original"]
    assert converted["class"] == "ConvertedWhisperForConditionalGeneration"
    assert converted["module"].startswith("transformers_modules")  # the saved remote code, not a package
    assert converted["plain"].strip() and converted["plain"] == original["plain"]
    assert len(converted["chunked"].split()) > 2 * len(converted["plain"].split())
    assert converted["chunked"] == original["chunked"]
    assert converted["timestamps"] and converted["timestamps"] == original["timestamps"]
    assert all(end > start for start, end in converted["timestamps"])
    assert results["normalized"] == "the counseled color mister smith"
