"""mla_convert's Paraformer: the CIF predictor fires where its weights cross the threshold, counts
the target's tokens in training, decodes one row per fired token; the model trains, converts role
by role (exactly at full rank), reports its cross-attention cache and reloads without mla_convert."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import LIBRISPEECH, librispeech_utterances
from helpers import run_without_mla_convert

import mla_convert
from mla_convert.data.audio import decode_audio
from mla_convert.evaluation.kv_state import attention_report
from mla_convert.finetuning.batches import SpeechCollator
from mla_convert.frontend import build_processor, char_vocabulary, cmvn_statistics
from mla_convert.modeling.configuration_conformer import ConfigValueError
from mla_convert.modeling.configuration_paraformer import ParaformerConfig
from mla_convert.modeling.feature_extraction_conformer import ConformerFeatureExtractor
from mla_convert.modeling.modeling_paraformer import ParaformerForASR, cif
from mla_convert.modeling.tokenization_paraformer import ParaformerTokenizer
from mla_convert.specs import GQASpec, MLASpec

TINY = dict(
    vocab_size=31, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
    conv_kernel_size=7, decoder_layers=2, decoder_attention_heads=4, decoder_intermediate_size=128,
)  # fmt: skip


def tiny_paraformer(seed: int = 0, **overrides) -> ParaformerForASR:
    torch.manual_seed(seed)
    model = ParaformerForASR(ParaformerConfig(**{**TINY, **overrides})).eval()
    for module in model.modules():  # BatchNorm statistics, so that every path is exercised
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def utterances() -> list[tuple[np.ndarray, str]]:
    if not (LIBRISPEECH / "dev-clean").is_dir():
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH}")
    rows = librispeech_utterances("dev-clean", limit=13)
    shortest = sorted(rows, key=lambda row: len(row[2]))[:3]
    return [(decode_audio(path), text) for _, path, text in shortest]


@pytest.fixture(scope="module")
def processor(utterances):
    mean, std = cmvn_statistics([audio for audio, _ in utterances], ConformerFeatureExtractor())
    tokens = char_vocabulary([text for _, text in utterances])
    return build_processor(tokens, mean, std, tokenizer_class=ParaformerTokenizer)


@pytest.fixture(scope="module")
def batch(utterances, processor) -> dict[str, torch.Tensor]:
    collator = SpeechCollator("nar", processor.feature_extractor, processor.tokenizer, pad_token_id=0)
    batch = collator([{"audio": audio, "text": text} for audio, text in utterances])
    batch.pop("sample_lengths")
    return batch


# ------------------------------------------------------------------------------------------- CIF


def test_cif_fires_exactly_where_the_running_sum_crosses_the_threshold():
    """Weights 0.5 0.25 0.5 0.75 0.25 0.75: the sum reaches 1 at frames 2 (1.25), 3 (exactly 1.0,
    after the 0.25 carried over) and 5 (exactly 1.0); each token integrates the shares that made it."""
    hidden = torch.eye(6)[None]  # frame t is the unit vector e_t: an embedding shows its shares
    alphas = torch.tensor([[0.5, 0.25, 0.5, 0.75, 0.25, 0.75]])
    fired = cif(hidden, alphas, threshold=1.0)
    assert fired.token_lengths.tolist() == [3]
    assert (fired.fires[0] >= 1.0).nonzero().flatten().tolist() == [2, 3, 5]
    expected = torch.tensor(
        [
            [0.5, 0.25, 0.25, 0.0, 0.0, 0.0],  # frame 2 gives 0.25 of its 0.5 to complete the first token
            [0.0, 0.0, 0.25, 0.75, 0.0, 0.0],  # the rest of frame 2, and frame 3 completes exactly
            [0.0, 0.0, 0.0, 0.0, 0.25, 0.75],
        ]
    )
    torch.testing.assert_close(fired.embeddings[0], expected, rtol=0, atol=0)


def test_cif_with_another_threshold_fires_at_its_multiples():
    fired = cif(torch.ones(1, 8, 2), torch.full((1, 8), 0.5), threshold=2.0)
    assert (fired.fires[0] >= 2.0).nonzero().flatten().tolist() == [3, 7]
    torch.testing.assert_close(fired.embeddings[0], torch.full((2, 2), 2.0))


def _constant_predictor(model: ParaformerForASR, alpha: float) -> None:
    """Hand-built predictor weights: every real frame gets weight ``alpha``."""
    predictor = model.model.predictor
    with torch.no_grad():
        predictor.cif_conv1d.weight.zero_()
        predictor.cif_conv1d.bias.zero_()
        predictor.cif_output.weight.zero_()
        predictor.cif_output.bias.fill_(math.log(alpha / (1 - alpha)))


def test_on_a_toy_alignment_the_quantity_loss_is_zero_and_decoding_fires_the_target_count():
    """A constant weight of 1/4 per encoder frame and targets of a quarter of the frames: the
    predictor's count equals the target length, so the quantity loss is 0, and at inference the
    same number of tokens fires (the tail adds 0.45, not enough for another) and is decoded."""
    model = tiny_paraformer()
    _constant_predictor(model, 0.25)
    features = torch.randn(2, 4 * 32 + 3, 80)  # conv2d subsampling: 4 n + 3 features -> n frames
    mask = torch.ones(2, features.shape[1], dtype=torch.long)
    mask[1, 4 * 16 + 3 :] = 0
    frames = model._get_feat_extract_output_lengths(mask.sum(-1))
    targets = [int(n) // 4 for n in frames]
    labels = torch.full((2, max(targets)), -100)
    for row, length in enumerate(targets):
        labels[row, :length] = torch.randint(3, 31, (length,))
    with torch.no_grad():
        trained = model(features, attention_mask=mask, labels=labels)
        decoded = model(features, attention_mask=mask)
    assert trained.token_lengths.tolist() == targets
    assert float(trained.quantity_loss) < 1e-4
    assert trained.logits.shape[1] == max(targets)
    assert decoded.token_lengths.tolist() == targets
    assert decoded.logits.shape[1] == max(targets)


def test_in_training_the_predictor_fires_exactly_the_targets_tokens():
    model = tiny_paraformer().train()
    features = torch.randn(3, 240, 80)
    mask = torch.ones(3, 240, dtype=torch.long)
    mask[1, 180:] = 0
    mask[2, 120:] = 0
    labels = torch.full((3, 20), -100)
    for row, length in enumerate((20, 7, 13)):
        labels[row, :length] = torch.randint(3, 31, (length,))
    output = model(features, attention_mask=mask, labels=labels)
    assert output.token_lengths.tolist() == [20, 7, 13]
    torch.testing.assert_close(output.alphas.sum(-1), torch.tensor([20.0, 7.0, 13.0]))
    assert output.logits.shape[:2] == (3, 20)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.model.predictor.cif_output.weight.grad.abs().sum() > 0  # the decoder loss reaches the predictor


def test_decoding_gives_one_row_per_fired_token_and_blanks_after_it():
    model = tiny_paraformer()
    features = torch.randn(2, 300, 80)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 150:] = 0
    with torch.no_grad():
        output = model(features, attention_mask=mask)
    assert output.logits.shape[1] == int(output.token_lengths.max())
    tokens = output.logits.argmax(-1)
    short = int(output.token_lengths.min())
    assert (tokens[output.token_lengths.argmin(), short:] == 0).all()  # rows past the tokens are the blank


def test_a_padded_batch_gives_each_utterance_its_own_tokens():
    model = tiny_paraformer()
    features = torch.randn(2, 300, 80)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 200:] = 0
    with torch.no_grad():
        batched = model(features, attention_mask=mask)
        alone = model(features[1:, :200], attention_mask=mask[1:, :200])
    count = int(alone.token_lengths[0])
    assert int(batched.token_lengths[1]) == count
    torch.testing.assert_close(batched.logits[1, :count], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_the_tokenizer_keeps_repeated_letters():
    tokenizer = build_processor(char_vocabulary(), tokenizer_class=ParaformerTokenizer).tokenizer
    ids = tokenizer("HELLO WORLD").input_ids
    assert tokenizer.decode(ids + [0, 0]) == "HELLO WORLD"


# ------------------------------------------------------------------------------------------ training


def test_a_few_training_steps_on_dev_clean_lower_the_loss(processor, batch):
    model = tiny_paraformer(vocab_size=len(processor.tokenizer), specaugment=False, dropout=0.0,
                            positional_dropout=0.0).train()  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((float(output.loss.detach()), float(output.quantity_loss.detach())))
    first, last = np.mean([loss for loss, _ in losses[:3]]), np.mean([loss for loss, _ in losses[-3:]])
    print(f"loss {first:.2f} -> {last:.2f}; quantity {losses[0][1]:.2f} -> {losses[-1][1]:.2f}")
    assert last < 0.8 * first


def test_the_glancing_sampler_swaps_in_reference_embeddings_in_training_only(batch, processor):
    model = tiny_paraformer(vocab_size=len(processor.tokenizer), sampling_ratio=1.0).train()
    calls = []
    original = model.model.decoder.forward
    model.model.decoder.forward = lambda *args, **kwargs: calls.append(args[0]) or original(*args, **kwargs)
    model(**batch)
    assert len(calls) == 2  # a first pass to find the wrong tokens, then the glanced one
    assert not torch.equal(calls[0], calls[1])
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("role", ["encoder", "decoder", "cross"])
@pytest.mark.parametrize("spec", [MLASpec(latent_dim=64), GQASpec(kv_heads=4)], ids=["mla", "gqa"])
def test_full_rank_conversion_of_each_role_is_exact(role, spec):
    model = tiny_paraformer()
    features = torch.randn(2, 200, 80)
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, 150:] = 0
    with torch.no_grad():
        expected = model(features, attention_mask=mask).logits
    converted = copy.deepcopy(model)
    report = mla_convert.convert(converted, spec, targets=[role])
    assert {layer.path.split(".")[0] for layer in report.layers} == {"decoder" if role != "encoder" else "encoder"}
    assert len(report.layers) == 2
    with torch.no_grad():
        actual = converted(features, attention_mask=mask).logits
    assert (actual - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("spec", "values"),
    [(MLASpec(latent_dim=16), 16), (GQASpec(kv_heads=2), 2 * 2 * 16)],  # d_c; 2 x kv_heads x head_dim
    ids=["mla", "gqa"],
)
def test_cross_attention_state_per_encoder_frame_is_the_formula(spec, values):
    model = tiny_paraformer()
    report = mla_convert.convert(model, spec, targets=["cross"])
    cross = [layer for layer in report.layers if layer.path.endswith("src_attn")]
    assert len(cross) == 2
    for layer in cross:
        assert layer.state_bytes_per_frame_before == 2 * 64 * 4
        assert layer.state_bytes_per_frame_after == values * 4
    totals = report.to_dict()["totals"]
    assert totals["state_bytes_per_frame_by_role"] == {
        "cross": {"layers": 2, "before": 2 * 2 * 64 * 4, "after": 2 * values * 4}
    }
    by_role = attention_report(model.config)["kv_state_bytes_per_frame_by_role"]
    assert by_role == {"encoder": 2 * 2 * 64 * 4, "decoder": 2 * 2 * 64 * 4, "cross": 2 * values * 4}


def test_attention_chosen_per_role_in_the_config_builds_the_variants():
    model = tiny_paraformer(
        attention={"type": "linear"},
        decoder_attention={"type": "gqa", "kv_heads": 2},
        cross_attention={"type": "mla", "latent_dim": 24},
    )
    layer = model.model.decoder.layers[0]
    assert (model.model.encoder.layers[0].self_attn.variant, layer.self_attn.variant, layer.src_attn.variant) == (
        "linear", "gqa", "mla",
    )  # fmt: skip
    by_role = attention_report(model.config)["kv_state_bytes_per_frame_by_role"]
    assert by_role["cross"] == 2 * 24 * 4 and by_role["decoder"] == 2 * 2 * 2 * 16 * 4


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"predictor_threshold": 0}, "predictor_threshold"),
        ({"predictor_threshold": -1.0}, "predictor_threshold"),
        ({"decoder_attention_heads": 5}, "decoder_attention_heads"),
        ({"cross_attention": {"type": "gqa", "kv_heads": 3}}, "cross_attention.kv_heads"),
        ({"decoder_attention": {"type": "mla", "latent_dim": 0}}, "decoder_attention.latent_dim"),
        ({"predictor_bias": 1}, "eos_token_id"),
        ({"sampling_ratio": 1.5}, "sampling_ratio"),
    ],
)
def test_a_bad_config_is_one_line_naming_its_key(overrides, key):
    with pytest.raises(ConfigValueError) as error:
        ParaformerConfig(**{**TINY, **overrides})
    message = str(error.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def test_empty_audio_is_a_one_line_error(processor):
    with pytest.raises(ValueError) as error:
        processor.feature_extractor(np.zeros(0, dtype=np.float32), sampling_rate=16000)
    assert "\n" not in str(error.value) and "0 samples" in str(error.value)
    model = tiny_paraformer(vocab_size=len(processor.tokenizer))
    for frames in (0, 5):  # no features, or fewer than the subsampling needs
        with pytest.raises(ValueError) as error:
            model(torch.zeros(1, frames, 80))
        assert "\n" not in str(error.value) and "frames" in str(error.value)


# ------------------------------------------------------------------------------------------ saved models


def test_saved_model_reloads_without_mla_convert_with_identical_outputs_and_runs_in_a_pipeline(
    tmp_path, processor, batch, utterances
):
    model = tiny_paraformer(vocab_size=len(processor.tokenizer), decoder_attention={"type": "mla", "latent_dim": 32})
    mla_convert.convert(model, GQASpec(kv_heads=2), targets=["cross"])
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    features = {"input_features": batch["input_features"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model(**features)
    np.save(tmp_path / "features.npy", features["input_features"].numpy())
    np.save(tmp_path / "mask.npy", features["attention_mask"].numpy())
    np.save(tmp_path / "audio.npy", utterances[0][0])
    output = run_without_mla_convert(
        """
        import json
        import numpy as np, torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline
        model = AutoModelForSpeechSeq2Seq.from_pretrained("model", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("model", trust_remote_code=True)
        features = torch.from_numpy(np.load("features.npy"))
        mask = torch.from_numpy(np.load("mask.npy"))
        with torch.no_grad():
            output = model(input_features=features, attention_mask=mask)
        np.save("logits.npy", output.logits.numpy())
        asr = pipeline("automatic-speech-recognition", model="model", trust_remote_code=True)
        text = asr(np.load("audio.npy"))["text"]
        print(json.dumps({"class": type(model).__name__, "tokenizer": type(processor.tokenizer).__name__,
                          "lengths": output.token_lengths.tolist(), "text": text}))
        """,
        cwd=tmp_path,
    )
    result = json.loads(output.strip().splitlines()[-1])
    assert result["class"] == "ParaformerForASR" and result["tokenizer"] == "ParaformerTokenizer"
    assert result["lengths"] == expected.token_lengths.tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected.logits.numpy())
    with torch.no_grad():
        alone = model(**processor.feature_extractor(utterances[0][0], sampling_rate=16000, return_tensors="pt"))
    ids = alone.logits.argmax(-1)[0, : int(alone.token_lengths[0])].tolist()
    assert result["text"] == processor.tokenizer.decode(ids)


def test_evaluate_decodes_a_saved_paraformer_in_one_forward_per_batch(tmp_path, processor):
    """``mla-convert evaluate`` loads a Paraformer as a non-autoregressive ("nar") model and
    scores, per utterance, what ``model(...)`` decodes."""
    from mla_convert.evaluation.run import evaluate_models

    model = tiny_paraformer(vocab_size=len(processor.tokenizer))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    result, path = evaluate_models(
        [str(tmp_path / "model")], splits=["dev-clean"], data=LIBRISPEECH, limit=3, batch_size=2,
        output=tmp_path / "evaluation.json", progress=False,
    )  # fmt: skip
    text = path.read_text()
    assert '"kind": "nar"' in text and "ParaformerForASR" in text
    rows = [row for row in result["results"] if row["split"] == "dev-clean"]
    assert len(rows) == 1 and rows[0]["utterances"] == 3


@pytest.mark.parametrize(
    ("part", "name"), [("encoder", "SANMEncoder"), ("decoder", "ParaformerSANMDecoder")]
)  # fmt: skip
def test_a_funasr_model_that_does_not_map_one_to_one_is_refused_in_one_line(tmp_path, capsys, part, name):
    """FunASR's SANM Paraformer (FSMN memory blocks) has no counterpart here: one line, nothing written."""
    import yaml

    from mla_convert import cli

    config = {"model": "Paraformer", "encoder": "ConformerEncoder", "decoder": "ParaformerSANDecoder",
              "predictor": "CifPredictorV2", "token_list": ["<blank>", "<s>", "</s>", "A", "<unk>"]}  # fmt: skip
    config[part] = name
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({}, tmp_path / "model.pt")
    assert cli.main(["import-funasr", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and name in error and "ConformerEncoder + ParaformerSANDecoder" in error, error
    assert not (tmp_path / "out").exists()
