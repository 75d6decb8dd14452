"""Commands under a launcher (``torchrun``, gloo on this CPU, 2 processes): ``evaluate`` splits the
utterances between ranks, scores each once, and rank 0 merges the ranks' journals into the same
WER and hypotheses as one process; the journals stay resumable; a failing rank stops the run with
one line instead of leaving the others waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import LIBRISPEECH, needs_librispeech
from test_profile import save_zoo

from mla_convert.cli import main
from mla_convert.evaluation.journal import rank_journal_paths, read_run_records

pytestmark = needs_librispeech


def torchrun(args: list[str], cwd: Path, extra_env: dict | None = None, timeout: float = 300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mla_convert.cli", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def evaluate_args(model: Path, output: Path) -> list[str]:
    return ["evaluate", str(model), "--split", "dev-clean", "--data", str(LIBRISPEECH), "--batch-size", "1",
            "--output", str(output), "--quiet"]  # fmt: skip


def hypotheses(output: Path) -> dict[str, list[str]]:
    scored: dict[str, list[str]] = {}
    for record in read_run_records(output):
        if record.get("type") == "utterance":
            scored.setdefault(record["id"], []).append(record["hypothesis"])
    return scored


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_zoo(tmp_path_factory.mktemp("distributed") / "mla", "mla")


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("single") / "eval.json"
    assert main(evaluate_args(model, output)) == 0
    return output


def test_two_ranks_score_each_utterance_once_with_the_one_process_wer_and_hypotheses(model, one_process, tmp_path):
    output = tmp_path / "eval.json"
    result = torchrun(evaluate_args(model, output), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    payload, expected = json.loads(output.read_text()), json.loads(one_process.read_text())
    assert payload["world_size"] == 2 and expected["world_size"] == 1
    assert rank_journal_paths(output) == [tmp_path / "eval.rank1.jsonl"]  # rank 1's share, beside rank 0's
    scored = hypotheses(output)
    assert all(len(texts) == 1 for texts in scored.values())  # no utterance scored twice
    assert {key: texts[0] for key, texts in scored.items()} == {
        key: texts[0] for key, texts in hypotheses(one_process).items()
    }
    for got, want in zip(payload["results"], expected["results"], strict=True):
        assert got["utterances"] == want["utterances"] == 13
        assert got["wer"] == want["wer"] and got["complete"]
        # ranks decode side by side: the wall time is the busier rank's, the compute is both ranks'
        assert 0 < got["wall_seconds"] < got["decode_seconds"]
        assert want["wall_seconds"] == want["decode_seconds"]
    # both ranks did part of the work
    rank1 = [json.loads(line) for line in (tmp_path / "eval.rank1.jsonl").read_text().splitlines()]
    assert 0 < sum(r.get("type") == "utterance" for r in rank1) < 13


def test_an_interrupted_launched_run_resumes_in_one_process_without_losing_or_repeating(model, one_process, tmp_path):
    output = tmp_path / "eval.json"
    assert torchrun(evaluate_args(model, output), tmp_path).returncode == 0
    # as if rank 1 was killed half-way: its later lines never written, so the split never finished
    output.unlink()
    rank1 = tmp_path / "eval.rank1.jsonl"
    lines = rank1.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("type") != "utterance"]
    kept += [line for line in lines if json.loads(line).get("type") == "utterance"][:2]
    rank1.write_text("".join(kept))
    rank0 = tmp_path / "eval.jsonl"
    rank0.write_text("".join(line for line in rank0.read_text().splitlines(keepends=True)
                             if json.loads(line).get("type") != "done"))  # fmt: skip
    assert main(evaluate_args(model, output)) == 0
    payload, expected = json.loads(output.read_text()), json.loads(one_process.read_text())
    assert payload["results"][0]["utterances"] == 13 and payload["results"][0]["wer"] == expected["results"][0]["wer"]
    assert all(len(texts) == 1 for texts in hypotheses(output).values())


def test_a_failing_rank_stops_every_rank_with_one_line(model, tmp_path):
    # rank 1 runs out of memory on every batch, even one utterance alone
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os
            if os.environ.get("RANK") == "1":
                import mla_convert.evaluation.model as model

                def out_of_memory(self, prepared):
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

                model.ASRModel.transcribe = out_of_memory
            """
        )
    )
    output = tmp_path / "eval.json"
    result = torchrun(evaluate_args(model, output), tmp_path, {"PYTHONPATH": str(tmp_path / "inject")}, timeout=240)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("mla-convert:")]
    assert len(lines) == 1 and lines[0].startswith("mla-convert: rank 1/2: error:"), result.stderr[-3000:]
    assert "does not fit in memory" in lines[0]
    assert not output.exists()
