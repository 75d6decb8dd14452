"""``mla-convert import-espnet``: an ESPnet2 Conformer / Branchformer experiment (config.yaml + .pth)
becomes an ordinary HF CTC model with the same outputs; anything it cannot reproduce is refused in
one line naming the ESPnet setting.

The checkpoints here are written in ESPnet's layout from models built in code (no ESPnet needed);
``scripts/check_espnet.py`` compares against ESPnet itself (results/espnet_equivalence.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from test_speech_encoders import tiny_model

from mla_convert import cli
from mla_convert.errors import MlaConvertError, ModelNotFoundError
from mla_convert.importers.espnet import EspnetFormatError, import_espnet, rename_key
from mla_convert.modeling.feature_extraction_conformer import ConformerFeatureExtractor

TOKENS = ["<blank>", "<unk>", "<space>", *"ETAONIHSRDLUMWCFGYPBVKXJQZ'", "<sos/eos>"]  # 31, as tiny_model
FRONTEND = {"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160}
ESPNET_ATTENTION = {"q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "out_proj": "linear_out",
                    "pos_proj": "linear_pos"}  # fmt: skip


def espnet_name(ours: str) -> str:
    """Our parameter name as ESPnet2's ESPnetASRModel names it (written independently of the importer)."""
    if ours.startswith("lm_head."):
        return "ctc.ctc_lo." + ours.removeprefix("lm_head.")
    parts = ours.split(".")
    if parts[1] == "layers":
        parts[1] = "encoders"
        if parts[3] in ("self_attn", "attn"):
            parts[4] = ESPNET_ATTENTION.get(parts[4], parts[4])
    elif parts[1:3] == ["embed", "out"]:
        parts.insert(3, "0")
    return ".".join(parts)


def encoder_conf(family: str, model) -> dict:
    config = model.config
    common = {"output_size": config.hidden_size, "attention_heads": config.num_attention_heads,
              "num_blocks": config.num_hidden_layers, "input_layer": "conv2d"}  # fmt: skip
    if family == "conformer":
        return {**common, "linear_units": config.intermediate_size, "cnn_module_kernel": config.conv_kernel_size,
                "macaron_style": True, "rel_pos_type": "latest", "pos_enc_layer_type": "rel_pos",
                "selfattention_layer_type": "rel_selfattn"}  # fmt: skip
    return {**common, "cgmlp_linear_units": config.cgmlp_linear_units, "cgmlp_conv_kernel": config.cgmlp_conv_kernel,
            "merge_method": config.merge_method}  # fmt: skip


def write_experiment(directory, family: str, model, *, snapshot=False, with_buffers=True, **config_overrides):
    """An ESPnet experiment directory (exp/asr_train/config.yaml + valid.acc.ave.pth) holding ``model``."""
    experiment = directory / "exp" / "asr_train"
    experiment.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mean, std = rng.normal(-5.0, 1.0, 80), rng.uniform(1.0, 3.0, 80)
    state = {espnet_name(key): value.clone() for key, value in model.state_dict().items()}
    state["decoder.embed.0.weight"] = torch.zeros(len(TOKENS), 8)  # the attention decoder: not imported
    state["decoder.output_layer.weight"] = torch.zeros(len(TOKENS), 8)
    if with_buffers:
        extractor = ConformerFeatureExtractor(win_length=400, hop_length=160)
        state["frontend.logmel.melmat"] = torch.from_numpy(extractor.mel_filters).float()
        state["normalize.mean"], state["normalize.std"] = torch.from_numpy(mean), torch.from_numpy(std)
    else:
        count = 1000
        np.savez(directory / "feats_stats.npz", count=np.array(count), sum=mean * count,
                 sum_square=(std**2 + mean**2) * count)  # fmt: skip
    config = {
        "token_list": TOKENS, "frontend": "default", "frontend_conf": FRONTEND, "specaug": None,
        "normalize": "global_mvn", "normalize_conf": {"stats_file": str(directory / "feats_stats.npz")},
        "encoder": family, "encoder_conf": encoder_conf(family, model), "decoder": "transformer",
        "model_conf": {"ctc_weight": 0.3},
    }  # fmt: skip
    for key, value in config_overrides.items():
        section, _, field = key.partition("__")
        if field:
            config[section] = {**config[section], field: value}
        else:
            config[section] = value
    (experiment / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    torch.save({"model": state, "optimizers": []} if snapshot else state, experiment / "valid.acc.ave.pth")
    return experiment, mean, std


@pytest.fixture(scope="module")
def waveform(dev_clean_audio) -> np.ndarray:
    return dev_clean_audio


def test_the_parameter_names_are_espnets():
    # names read off ESPnet 202511's ESPnetASRModel state dict (ConformerEncoder, BranchformerEncoder)
    assert rename_key("encoder.encoders.3.self_attn.linear_pos.weight") == "encoder.layers.3.self_attn.pos_proj.weight"
    assert rename_key("encoder.encoders.0.attn.linear_q.bias") == "encoder.layers.0.attn.q_proj.bias"
    assert rename_key("encoder.embed.out.0.weight") == "encoder.embed.out.weight"
    assert rename_key("encoder.encoders.1.cgmlp.csgu.conv.weight") == "encoder.layers.1.cgmlp.csgu.conv.weight"
    assert rename_key("ctc.ctc_lo.weight") == "lm_head.weight"
    assert rename_key("decoder.decoders.0.self_attn.linear_q.weight") is None


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("conformer", {}),
        ("branchformer", {"merge_method": "learned_ave"}),
        ("branchformer", {"merge_method": "concat"}),
    ],
)
def test_an_imported_model_gives_the_checkpoints_logits_with_the_experiments_front_end(
    tmp_path, waveform, family, overrides
):
    from transformers import AutoModelForCTC, AutoProcessor

    model = tiny_model(family, **overrides)
    experiment, mean, std = write_experiment(tmp_path / "espnet", family, model)
    output = import_espnet(experiment / "config.yaml", tmp_path / "hf")

    imported = AutoModelForCTC.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    extractor = processor.feature_extractor
    assert (extractor.hop_length, extractor.win_length, extractor.n_fft) == (160, 400, 512)
    np.testing.assert_allclose(extractor.cmvn_mean, mean, atol=1e-12)
    np.testing.assert_allclose(extractor.cmvn_std, std, atol=1e-12)
    inputs = processor(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = imported(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert processor.tokenizer.convert_ids_to_tokens([0, 2, 3]) == ["<blank>", "|", "E"]
    record = json.loads((output / "espnet_import.json").read_text())
    assert record["encoder"] == family and record["dropped"] == {"decoder": 2} and record["cmvn"] == "checkpoint"
    assert record["checkpoint"]["sha256"] and record["hub_id"] is None
    assert str(tmp_path) not in json.dumps(record)  # uploaded with the model: no local paths
    assert record["mel_filterbank_max_difference"] < 1e-6


def test_a_directory_and_a_training_snapshot_are_accepted_and_stats_come_from_the_stats_file(tmp_path):
    model = tiny_model("conformer")
    _, mean, std = write_experiment(tmp_path / "espnet", "conformer", model, snapshot=True, with_buffers=False)
    output = import_espnet(tmp_path / "espnet", tmp_path / "hf")  # finds exp/**/config.yaml
    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(output, trust_remote_code=True)
    np.testing.assert_allclose(extractor.cmvn_mean, mean, atol=1e-9)
    np.testing.assert_allclose(extractor.cmvn_std, std, atol=1e-9)
    assert json.loads((output / "espnet_import.json").read_text())["cmvn"] == "stats_file"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"encoder_conf__rel_pos_type": "legacy"}, "encoder_conf.rel_pos_type: 'legacy' is not supported"),
        ({"encoder_conf__concat_after": True}, "encoder_conf.concat_after"),
        ({"encoder_conf__lookahead": 4}, "encoder_conf.lookahead: not an ESPnet setting"),
        ({"encoder_conf__input_layer": "vgg2l"}, "encoder_conf.input_layer: 'vgg2l'"),
        ({"encoder_conf__num_blocks": 3}, "does not fit encoder_conf (no weights for encoder.layers.2"),
        ({"encoder": "e_branchformer"}, "encoder: 'e_branchformer' is not importable"),
        ({"frontend_conf__htk": True}, "frontend_conf.htk"),
        ({"frontend_conf__n_mels": 40}, "frontend_conf: the checkpoint's mel filterbank is (257, 80)"),
        ({"normalize": "utterance_mvn"}, "normalize: 'utterance_mvn' is not supported"),
        ({"token_list": TOKENS[:-1]}, "token_list: 30 tokens, but the CTC head has 31 outputs"),
        ({"model_conf__ctc_weight": 0.0}, "model_conf.ctc_weight"),
    ],
)
def test_settings_it_cannot_reproduce_are_refused_in_one_line_and_nothing_is_written(tmp_path, overrides, message):
    experiment, _, _ = write_experiment(tmp_path / "espnet", "conformer", tiny_model("conformer"), **overrides)
    with pytest.raises(MlaConvertError) as raised:
        import_espnet(experiment / "config.yaml", tmp_path / "hf")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["espnet"]


def test_damaged_checkpoints_and_missing_sources_are_one_line_errors(tmp_path):
    experiment, _, _ = write_experiment(tmp_path / "espnet", "conformer", tiny_model("conformer"))
    (experiment / "valid.acc.ave.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EspnetFormatError, match="not a readable PyTorch checkpoint"):
        import_espnet(experiment / "config.yaml", tmp_path / "hf")
    with pytest.raises(ModelNotFoundError, match="no such ESPnet config"):
        import_espnet(tmp_path / "nowhere" / "config.yaml", tmp_path / "hf")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):  # a Hub id, offline and not cached
        import_espnet("espnet/no_such_model_here", tmp_path / "hf")


def test_the_import_espnet_command(tmp_path, capsys):
    experiment, _, _ = write_experiment(tmp_path / "espnet", "branchformer", tiny_model("branchformer"))
    assert cli.main(["import-espnet", str(experiment / "config.yaml"), "--output", str(tmp_path / "hf")]) == 0
    assert "wrote an mla_convert CTC model" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mla_branchformer" and config["attention"] == {"type": "mha"}
    assert cli.main(["import-espnet", str(experiment / "config.yaml"), "--output", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("mla-convert: error: ") and "already exists" in error[0]
