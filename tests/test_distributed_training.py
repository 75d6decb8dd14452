"""``finetune`` under a launcher (``torchrun``, gloo on this CPU, 2 processes): per-device batch b on
2 ranks trains exactly like one process with batch 2b; a run whose rank is killed resumes on every
rank without losing or repeating a step; a rank that cannot read its audio stops the run with one
line. The model is a tiny zoo Branchformer without dropout or SpecAugment: its per-utterance CTC
mean and LayerNorms make a 2b batch and two b batches the same sum (BatchNorm, as in a Conformer,
keeps statistics per rank, as DDP does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import LIBRISPEECH, needs_librispeech
from safetensors.torch import load_file
from test_distributed import torchrun
from test_finetune import tiny_seq2seq_student  # noqa: F401  (a fixture)
from test_profile import save_zoo

from mla_convert.cli import main
from mla_convert.finetuning import last_complete_checkpoint

pytestmark = needs_librispeech

LR = 1e-3
STEPS = 4


def finetune_args(model: Path, output: Path, batch_size: int, data: Path | None = None) -> list[str]:
    # 13 dev-clean utterances: every fifth is held out as the dev set (2), 11 train
    return ["finetune", str(model), "--data", str(data or LIBRISPEECH / "dev-clean"), "--batch-size", str(batch_size),
            "--grad-accum", "1", "--max-steps", str(STEPS), "--lr", str(LR), "--warmup-steps", "0",
            "--eval-steps", "2", "--logging-steps", "1", "--test-splits", "none",
            "--output", str(output), "--quiet"]  # fmt: skip


def summary_of(output: Path) -> dict:
    return json.loads((output / "finetune_summary.json").read_text())


def step_losses(summary: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in summary["losses"]}


def largest_difference(first: Path, second: Path) -> float:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_zoo(
        tmp_path_factory.mktemp("train") / "branchformer", "mla", "branchformer",
        dropout=0.0, positional_dropout=0.0, specaugment=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one") / "run"
    assert main(finetune_args(model, output, batch_size=4)) == 0
    return output


@pytest.fixture(scope="module")
def two_ranks(model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    result = torchrun(finetune_args(model, root / "run", batch_size=2), root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fine-tuned ") == 1  # rank 0 alone prints the summary
    return root / "run"


def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(one_process, two_ranks):
    one, two = summary_of(one_process), summary_of(two_ranks)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert "x 2 processes" in two["device"]
    # the first two steps are full global batches of the same 4 utterances (one shuffled order,
    # rank r taking batches r, r + 2, ...); after that the epoch's last 3 utterances are padded
    # to 2 x 2 by the launcher's even batches
    for step in (1, 2):
        assert step_losses(two)[step] == pytest.approx(step_losses(one)[step], rel=1e-5)
    # the same weights at the checkpoint of step 2 (to much less than one Adam step of size lr),
    # so the same dev WER picked the same checkpoint
    first, second = one_process / "checkpoints" / "checkpoint-2", two_ranks / "checkpoints" / "checkpoint-2"
    assert largest_difference(first, second) < LR / 4
    assert two["dev_history"][0] == one["dev_history"][0]
    assert two["samples_seen"] == 4 * STEPS  # counted over both ranks
    progress = json.loads((second / "mla_convert_progress.json").read_text())
    assert progress["samples_seen"] == 8 and progress["world_size"] == 2
    # rank 0 alone wrote checkpoints (rank 1 its RNG state into them), the model and one TensorBoard log
    assert sorted(path.name for path in second.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (two_ranks / "model.safetensors").is_file()
    assert len(list((two_ranks / "runs").iterdir())) == 1


def test_accelerate_launch_trains_exactly_like_torchrun(model, two_ranks, tmp_path):
    # on a CPU-only machine accelerate starts several processes only with --multi_gpu (then gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mla_convert.cli", *finetune_args(model, tmp_path / "run", batch_size=2)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary, reference = summary_of(tmp_path / "run"), summary_of(two_ranks)
    assert summary["world_size"] == 2
    for step, loss in step_losses(reference).items():
        assert step_losses(summary)[step] == pytest.approx(loss, rel=1e-5)
    assert largest_difference(tmp_path / "run", two_ranks) < 1e-6


def test_a_rank_killed_mid_run_resumes_on_every_rank_without_losing_or_repeating_steps(model, two_ranks, tmp_path):
    # rank 1 is killed (SIGKILL, no clean-up) as it starts step 4; the last checkpoint is step 2's
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os
            import signal

            if os.environ.get("RANK") == "1":
                import transformers

                original = transformers.Trainer.training_step

                def training_step(self, *args, **kwargs):
                    if self.state.global_step == 3:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(self, *args, **kwargs)

                transformers.Trainer.training_step = training_step
            """
        )
    )
    output = tmp_path / "run"
    args = finetune_args(model, output, batch_size=2)
    killed = torchrun(args, tmp_path, {"PYTHONPATH": str(tmp_path / "inject")})
    assert killed.returncode != 0
    assert last_complete_checkpoint(output / "checkpoints").name == "checkpoint-2"
    assert not (output / "model.safetensors").exists() and not (output / "finetune_summary.json").exists()

    resumed = torchrun([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary, reference = summary_of(output), summary_of(two_ranks)
    losses = step_losses(summary)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step once
    assert [e["step"] for e in summary["losses"]] == sorted(losses)
    for step, loss in step_losses(reference).items():  # the uninterrupted run's losses, step by step
        assert losses[step] == pytest.approx(loss, rel=1e-5)
    assert summary["samples_seen"] == reference["samples_seen"]
    assert largest_difference(output, two_ranks) < 1e-6


# accelerate turns FSDP on only for accelerator back ends: on a CPU it silently runs DDP. This lifts
# that one gate, so that the shipped FSDP config runs its real path here (accelerate's FSDP2
# preparation, Trainer's FSDP checkpoints and resume) with gloo collectives; and kills rank 1 as it
# starts step KILL_AT_STEP when that is set
FSDP_ON_CPU = """
import os

from accelerate import state
from accelerate.utils import DistributedType

original_init = state.AcceleratorState.__init__


def __init__(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = plugin


state.AcceleratorState.__init__ = __init__

if os.environ.get("RANK") == "1" and os.environ.get("KILL_AT_STEP"):
    import signal

    import transformers

    original_step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
"""


def fsdp_launch(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m mla_convert.cli ARGS``."""
    (cwd / "inject").mkdir(exist_ok=True)
    (cwd / "inject" / "sitecustomize.py").write_text(FSDP_ON_CPU)
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", "-m", "mla_convert.cli", *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd / "inject"),
           **(extra_env or {})}  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_through_the_shipped_config_trains_like_ddp_resumes_after_a_kill_and_saves_a_whole_model(
    model, two_ranks, tmp_path
):
    output = tmp_path / "run"
    args = finetune_args(model, output, batch_size=2)
    killed = fsdp_launch(args, tmp_path, {"KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    checkpoint = last_complete_checkpoint(output / "checkpoints")
    assert checkpoint.name == "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # Trainer's FSDP state: the model was sharded
    assert not (two_ranks / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp.bin").exists()
    assert not (output / "model.safetensors").exists()

    resumed = fsdp_launch([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary, reference = summary_of(output), summary_of(two_ranks)
    assert summary["world_size"] == 2
    losses = step_losses(summary)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step once, as DDP computed it
    for step, loss in step_losses(reference).items():
        assert losses[step] == pytest.approx(loss, rel=1e-5)
    assert summary["dev_history"] == reference["dev_history"]  # dev WER decoded by both ranks
    # the whole model, gathered from the shards (reduce-scatter sums in another order than all-reduce)
    assert largest_difference(output, two_ranks) < 1e-5
    # saved as its own class with its own source files (not torch's FSDP wrapper's)
    assert json.loads((output / "config.json").read_text())["architectures"] == ["BranchformerForCTC"]
    assert (output / "modeling_branchformer.py").is_file() and not list(output.glob("_fsdp*.py"))
    assert (checkpoint / "modeling_branchformer.py").is_file() and not list(checkpoint.glob("_fsdp*.py"))


def test_fsdp_fine_tunes_a_converted_whisper_like_ddp_and_saves_its_tied_weights_once(
    tiny_seq2seq_student,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    student, _ = tiny_seq2seq_student
    # the reference is DDP, not one process: a seq2seq loss is a mean over each batch's tokens
    ddp = torchrun(finetune_args(student, tmp_path / "ddp", batch_size=2), tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    result = fsdp_launch(finetune_args(student, tmp_path / "fsdp", batch_size=2), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, sharded = summary_of(tmp_path / "ddp"), summary_of(tmp_path / "fsdp")
    for step, loss in step_losses(reference).items():
        assert step_losses(sharded)[step] == pytest.approx(loss, rel=1e-5)
    # dev WER by generate() on both ranks, their decoder steps in lockstep (rank 1 has no dev
    # batch of its own and decodes one again without counting it)
    assert sharded["dev_history"] == reference["dev_history"]
    # the output projection tied to the token embedding is stored once, and tied again on loading
    assert (
        load_file(tmp_path / "fsdp" / "model.safetensors").keys()
        == load_file(tmp_path / "ddp" / "model.safetensors").keys()
    )
    assert largest_difference(tmp_path / "fsdp", tmp_path / "ddp") < 1e-5


def test_a_rank_that_cannot_read_its_audio_stops_every_rank_with_one_line(model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(LIBRISPEECH / "dev-clean", data / "dev-clean")
    # one training utterance (not a held-out dev one): exactly one rank reads it in the first epoch
    bad = next(data.rglob("3752-4944-0001.flac"))
    bad.write_bytes(b"not audio")
    result = torchrun(finetune_args(model, tmp_path / "run", batch_size=2, data=data / "dev-clean"), tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("mla-convert:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(("mla-convert: rank 0/2: error:", "mla-convert: rank 1/2: error:")), lines[0]
    assert "3752-4944-0001.flac" in lines[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_train_from_a_recipe_runs_under_the_launcher_and_evaluates_on_both_ranks(tmp_path):
    from test_train_recipe import _small_recipe

    recipe, output = _small_recipe(tmp_path, "branchformer_mla"), tmp_path / "run"
    command = ["train", "--config", str(recipe), "--data", str(LIBRISPEECH), "--output", str(output),
               "--max-steps", "2", "--quiet"]  # fmt: skip
    result = torchrun(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained a small branchformer") == 1  # rank 0 alone prints
    summary = summary_of(output)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert summary["train"]["family"] == "branchformer" and (output / "initial" / "model.safetensors").is_file()
    # the final evaluation ran on both ranks: rank 1's journal beside rank 0's, one merged JSON
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert evaluation["world_size"] == 2 and summary["wer"]["test-clean"]["after"] is not None
    assert (output / "evaluation.rank1.jsonl").is_file()


@pytest.mark.parametrize(("name", "kind", "machines"), [("one_node", "MULTI_GPU", 1), ("two_nodes", "MULTI_GPU", 2),
                                                   ("fsdp", "FSDP", 1)])  # fmt: skip
def test_the_shipped_accelerate_configs_are_valid_configs(name, kind, machines):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml")
    assert config.distributed_type == DistributedType[kind] and config.num_machines == machines
    if kind == "FSDP":  # FSDP2, one unit per layer named by the model itself, a whole model on save
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert config.mixed_precision == "no"  # finetune's --precision decides
    assert config.num_processes % machines == 0
    if machines > 1:
        assert config.main_process_ip and config.main_process_port


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_each_rank_reads_its_own_part_of_a_streamed_training_set(shards, monkeypatch):
    from datasets import IterableDataset

    from mla_convert.finetuning.batches import rank_stream

    def rows(names):
        for name in names:
            yield from ({"id": f"{name}-{index}"} for index in range(5))

    stream = IterableDataset.from_generator(rows, gen_kwargs={"names": [f"shard{n}" for n in range(shards)]})
    assert stream.n_shards == shards
    everything = [row["id"] for row in stream]
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append([row["id"] for row in rank_stream(stream)])
    assert sorted(parts[0] + parts[1]) == sorted(everything)  # each utterance read by one rank
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    if shards % 2 == 0:  # whole shards per rank
        assert {name.split("-")[0] for name in parts[0]}.isdisjoint(name.split("-")[0] for name in parts[1])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_stream(stream) is stream
