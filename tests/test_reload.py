"""A converted model is an ordinary HF model: it saves, and reloads anywhere, even without us."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_processor, tiny_conformer
from helpers import run_without_mla_convert

import mla_convert
from mla_convert import GQASpec, LinearSpec, MLASpec

SPECS = {"mla": MLASpec(latent_dim=24), "gqa": GQASpec(kv_heads=2), "linear": LinearSpec()}


@pytest.fixture(scope="module", params=sorted(SPECS))
def converted_dir(request, tmp_path_factory):
    model = tiny_conformer("relative")
    mla_convert.convert(model, SPECS[request.param])
    directory = tmp_path_factory.mktemp(f"converted-{request.param}")
    model.save_pretrained(directory)
    save_processor(directory)
    torch.manual_seed(7)
    values = torch.randn(1, 12000)
    with torch.no_grad():
        expected = model(values).logits
    torch.save({"values": values, "logits": expected}, directory / "expected.pt")
    return request.param, directory


def test_saved_folder_is_safetensors_with_spec_auto_map_and_modeling_code(converted_dir):
    kind, directory = converted_dir
    config = json.loads((directory / "config.json").read_text())
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin"))
    assert config["model_type"] == "mla_convert_wav2vec2_conformer"
    assert config["attention_conversion"]["spec"]["attention"] == kind
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCTC"}
    for module in config["auto_map"].values():
        assert (directory / f"{module.split('.')[0]}.py").is_file()
    assert (directory / f"attention_{kind}.py").is_file()


def test_reloads_in_a_fresh_process_without_mla_convert(converted_dir):
    _, directory = converted_dir
    out = run_without_mla_convert(
        """
        import torch
        from transformers import AutoModelForCTC
        try:
            import mla_convert
            raise SystemExit("mla_convert should not be importable here")
        except ImportError:
            pass
        model = AutoModelForCTC.from_pretrained(".", trust_remote_code=True).eval()
        saved = torch.load("expected.pt")
        with torch.no_grad():
            logits = model(saved["values"]).logits
        print(float((logits - saved["logits"]).abs().max()))
        """,
        cwd=directory,
    )
    assert float(out.strip().splitlines()[-1]) < 1e-5


def test_pipeline_transcribes_in_a_fresh_process_without_mla_convert(converted_dir):
    _, directory = converted_dir
    out = run_without_mla_convert(
        """
        import numpy as np
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model=".", trust_remote_code=True)
        result = asr(np.random.default_rng(0).standard_normal(16000).astype("float32"))
        print(type(result["text"]).__name__, len(result["text"]) > 0)
        """,
        cwd=directory,
    )
    assert out.strip().splitlines()[-1] == "str True"


def test_mla_convert_load_gives_the_same_model(converted_dir):
    _, directory = converted_dir
    model = mla_convert.load(directory).eval()
    saved = torch.load(directory / "expected.pt")
    with torch.no_grad():
        assert torch.allclose(model(saved["values"]).logits, saved["logits"], atol=1e-5)


def test_auto_classes_load_without_remote_code_when_mla_convert_is_imported(converted_dir):
    from transformers import AutoModelForCTC

    _, directory = converted_dir
    model = AutoModelForCTC.from_pretrained(directory)
    assert type(model).__module__.startswith("mla_convert.")
