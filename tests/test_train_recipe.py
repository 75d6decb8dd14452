"""``mla-convert train``: Conformer / Branchformer CTC models trained from scratch by the YAML recipes
in configs/, their parameter counts, one-line errors for bad recipes, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LIBRISPEECH, needs_librispeech

from mla_convert import cli
from mla_convert.data import decode_audio, index_source
from mla_convert.finetuning import SpeechCollator
from mla_convert.finetuning.recipe import load_recipe
from mla_convert.finetuning.train import build_initial
from mla_convert.frontend import char_vocabulary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [
    path for family in ("conformer", "branchformer", "paraformer") for path in sorted(CONFIGS.glob(f"{family}_*.yaml"))
]
VOCAB = len(char_vocabulary())  # 30: blank, unk, |, ' and A-Z
# measured once (meta device, 30 tokens); the MHA conformer ones equal conformer_mha_parameters below
PARAMETERS = {
    ("conformer_mha", "small"): 2_604_702,
    ("conformer_mla", "small"): 2_549_406,
    ("conformer_gqa", "small"): 2_521_182,
    ("conformer_linear", "small"): 2_604_702,
    ("conformer_mha_streaming", "small"): 2_604_702,
    ("branchformer_mha", "small"): 1_696_350,
    ("branchformer_mla", "small"): 1_641_054,
    ("branchformer_gqa", "small"): 1_612_830,
    ("branchformer_linear", "small"): 1_696_350,
    ("conformer_mha", "large"): 83_247_134,
    ("conformer_mla", "large"): 78_135_326,
    ("conformer_gqa", "large"): 78_519_326,
    ("conformer_linear", "large"): 83_247_134,
    ("conformer_mha_streaming", "large"): 83_247_134,
    ("branchformer_mha", "large"): 48_785_438,
    ("branchformer_mla", "large"): 43_673_630,
    ("branchformer_gqa", "large"): 44_057_630,
    ("branchformer_linear", "large"): 48_785_438,
    ("paraformer_mha", "small"): 3_340_831,
    ("paraformer_mla", "small"): 3_174_943,
    ("paraformer_mha", "large"): 109_275_167,
    ("paraformer_mla", "large"): 98_461_727,
}
MODEL_CLASS = {"conformer": "ConformerForCTC", "branchformer": "BranchformerForCTC", "paraformer": "ParaformerForASR"}
# tiny sizes and no noise: a few steps on two utterances must lower the loss
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "specaugment": False, "dropout": 0.0, "positional_dropout": 0.0}
TINY_FAMILY = {
    "conformer": {"intermediate_size": 128},
    "branchformer": {"cgmlp_linear_units": 128},
    "paraformer": {"intermediate_size": 128, "decoder_intermediate_size": 128, "sampling_ratio": 0.0},
}


def tiny(recipe_path: Path) -> dict:
    return {**TINY, **TINY_FAMILY[recipe_path.stem.split("_")[0]]}


def conformer_mha_parameters(d: int, layers: int, ff: int, kernel: int, vocab: int, mels: int = 80) -> int:
    """ESPnet's Conformer encoder + CTC head with relative-position MHA, counted by hand."""
    linear = lambda i, o: i * o + o  # noqa: E731
    frequencies = ((mels - 1) // 2 - 1) // 2  # two 3x3 stride-2 convolutions
    subsampling = linear(9, d) + linear(9 * d, d) + linear(d * frequencies, d)
    attention = 4 * linear(d, d) + d * d + 2 * d  # q, k, v, out; pos_proj (no bias); pos_bias_u / v
    convolution = linear(d, 2 * d) + linear(kernel, d) + 2 * d + linear(d, d)  # pointwise, depthwise, BN, pointwise
    layer = 2 * (linear(d, ff) + linear(ff, d)) + attention + convolution + 5 * 2 * d  # 5 LayerNorms
    return subsampling + layers * layer + 2 * d + linear(d, vocab)


def test_the_recipes_cover_every_family_and_attention():
    assert sorted(path.stem for path in RECIPES) == sorted(name for name, size in PARAMETERS if size == "small")


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_its_model_with_the_expected_parameter_count(path, size):
    recipe = load_recipe(path, {"model": {"size": size}})
    family, attention = path.stem.split("_")[:2]
    assert (recipe.family, recipe.size) == (family, size)
    model = recipe.build_model(VOCAB, device="meta")
    assert type(model).__name__ == MODEL_CLASS[family]
    assert model.config.attention["type"] == attention
    assert model.config.streaming == path.stem.endswith("_streaming")
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"{path.stem} {size}: {count:,} parameters")
    assert count == PARAMETERS[(path.stem, size)]


def test_parameter_counts_follow_the_attention_variant():
    assert PARAMETERS[("conformer_mha", "small")] == conformer_mha_parameters(144, 4, 576, 15, VOCAB)
    assert PARAMETERS[("conformer_mha", "large")] == conformer_mha_parameters(512, 12, 2048, 31, VOCAB)
    for family in ("conformer", "branchformer"):
        for size in ("small", "large"):
            mha = PARAMETERS[(f"{family}_mha", size)]
            assert PARAMETERS[(f"{family}_mla", size)] < mha  # latent down + up projections < separate K and V
            assert PARAMETERS[(f"{family}_gqa", size)] < mha  # fewer K/V heads
            assert PARAMETERS[(f"{family}_linear", size)] == mha  # the same projections, another kernel


@pytest.fixture(scope="module")
def two_utterances() -> list[dict]:
    """The two shortest dev-clean utterances (about 3 s each), decoded."""
    rows = sorted(index_source(LIBRISPEECH, "dev-clean"), key=lambda row: len(row["text"]))[:2]
    return [{**row, "audio": decode_audio(row["audio"], 16000)} for row in rows]


@needs_librispeech
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_model_learns_from_a_few_utterances(path, two_utterances):
    recipe = load_recipe(path, {"model": tiny(path)})
    texts = [row["text"] for row in two_utterances]
    model, processor = build_initial(recipe, texts, [row["audio"] for row in two_utterances])
    kind = "nar" if recipe.family == "paraformer" else "ctc"
    collator = SpeechCollator(kind, processor.feature_extractor, processor.tokenizer, pad_token_id=0)
    batch = collator(two_utterances)
    batch.pop("sample_lengths")
    assert batch["input_features"].shape[-1] == 80 and (batch["labels"] < VOCAB).all()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(16):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"{path.stem}: mean loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first


def _small_recipe(tmp_path: Path, name: str = "conformer_mla") -> Path:
    """The shipped recipe with tiny sizes and a short final evaluation (same keys otherwise)."""
    values = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    values["model"].update(tiny(Path(name)))
    values["training"].update(test_limit=3, max_seconds=6.0, eval_steps=2, warmup_steps=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@needs_librispeech
def test_train_end_to_end_through_the_cli_then_resume_and_finetune(tmp_path, capsys, caplog):
    from transformers import AutoModelForCTC, AutoProcessor

    recipe, output = _small_recipe(tmp_path), tmp_path / "run"
    command = ["train", "--config", str(recipe), "--data", str(LIBRISPEECH), "--output", str(output), "--quiet"]
    assert cli.main([*command, "--max-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "trained a small conformer (mla attention" in printed and "test-clean" in printed

    initial = output / "initial"
    assert (initial / "recipe.yaml").read_text() == recipe.read_text()
    extractor = AutoProcessor.from_pretrained(initial).feature_extractor
    assert len(extractor.cmvn_mean) == len(extractor.cmvn_std) == 80 and min(extractor.cmvn_std) > 0
    assert AutoProcessor.from_pretrained(output).feature_extractor.cmvn_mean == extractor.cmvn_mean
    model = AutoModelForCTC.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "ConformerForCTC" and model.config.attention["type"] == "mla"
    trained, start = model.state_dict(), AutoModelForCTC.from_pretrained(initial, trust_remote_code=True).state_dict()
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])

    summary = json.loads((output / "finetune_summary.json").read_text())
    assert summary["steps"] == 3 and summary["freeze"] == "none"
    assert summary["train"]["family"] == "conformer" and summary["train"]["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    assert set(summary["wer"]["test-clean"]) == {"before", "after"}

    # the run directory is not overwritten; a resumed run must build the same start model
    assert cli.main([*command, "--max-steps", "3"]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(recipe.read_text().replace("num_hidden_layers: 2", "num_hidden_layers: 3"))
    assert cli.main([*command[:2], str(changed), *command[3:], "--resume"]) == 2
    assert "--resume: model.num_hidden_layers was 2 when" in capsys.readouterr().err

    # --resume reuses initial/ (no new statistics, same weights) and, training done, only evaluates
    stamp = (initial / "model.safetensors").stat().st_mtime_ns
    assert cli.main([*command, "--max-steps", "3", "--resume"]) == 0
    assert (initial / "model.safetensors").stat().st_mtime_ns == stamp
    assert "reusing" in caplog.text and "training had finished" in caplog.text

    # a trained model of ours fine-tunes like any CTC model, distilling from a teacher of ours
    tuned = tmp_path / "tuned"
    argv = ["finetune", str(output), "--teacher", str(initial), "--output", str(tuned), "--data", str(LIBRISPEECH),
            "--train-split", "dev-clean", "--max-seconds", "6", "--max-steps", "1", "--batch-size", "2",
            "--eval-data", "none", "--test-splits", "none", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    losses = json.loads((tuned / "finetune_summary.json").read_text())["losses"]
    assert losses[0]["distill_loss"] > 0 and losses[0]["task_loss"] > 0


BAD = {
    "attention type": ("model.attention", {"type": "foo"}, "model.attention.type: unknown attention type 'foo'"),
    "latent dim": ("model.attention", {"type": "mla", "latent_dim": 0}, "model.attention.latent_dim: must be"),
    "kv heads": ("model.attention", {"type": "gqa", "kv_heads": 3}, "model.attention.kv_heads: must divide"),
    "rotary, odd head size": ("model.num_attention_heads", 16, "position_embedding: rotary needs an even head size"),
    "merge method": ("model.merge_method", "sum", "model.merge_method: unknown value 'sum'"),
    "conformer key in a branchformer": ("model.conv_kernel_size", 31, "model.conv_kernel_size: unknown key"),
    "misspelt training key": ("training.lrr", 0.1, "training.lrr: unknown key (did you mean lr?)"),
    "unknown model key": ("model.foo", 1, "model.foo: unknown key"),
    "freeze": ("training.freeze", "none", "training.freeze: not set in a recipe"),
    "bad learning rate": ("training.lr", -1.0, "training.lr: --lr must be a positive number"),
    "text for a number": ("training.batch_size", "four", "training.batch_size: expected int, got 'four'"),
    "window longer than the FFT": ("frontend.win_length", 1024, "frontend: win_length (1024) may not be larger"),
    "vocabulary size": ("model.vocab_size", 40, "model.vocab_size: not set in a recipe"),
    "predictor threshold": ("model.predictor_threshold", 0.0, "model.predictor_threshold: must be a number > 0"),
    "decoder heads": ("model.decoder_attention_heads", 5, "model.decoder_attention_heads: 5 heads do not divide"),
    "cross kv heads": ("model.cross_attention", {"type": "gqa", "kv_heads": 3}, "model.cross_attention.kv_heads:"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_recipe_is_one_line_naming_its_key_before_anything_runs(case, tmp_path, capsys):
    key, value, expected = BAD[case]
    name = "branchformer_mha" if "merge" in key or "conv_kernel" in key else "conformer_mha"
    if key.split(".")[1].startswith(("predictor", "decoder", "cross")):
        name = "paraformer_mha"
    values = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    section, field = key.split(".")
    values[section][field] = value
    if case == "rotary, odd head size":
        values["model"]["position_embedding"] = "rotary"  # 144 / 16 heads = 9 values per head
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mla-convert: error: ") and expected in error, error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "does not exist"),
        ("model:\n  family: conformer\n   size: small\n", "not valid YAML (line 3, column"),
        ("model: {family: conformer}\nmodel: {family: branchformer}\n", "the key 'model' is given twice"),
        ("model: {size: small}\n", "model.family: missing"),
        ("model: {family: conformer}\ntrainig: {}\n", "trainig: unknown key (did you mean training?)"),
    ],
    ids=["missing file", "YAML syntax", "duplicate key", "no family", "misspelt section"],
)
def test_an_unreadable_recipe_is_one_line(text, expected, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error, error
