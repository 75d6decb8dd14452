"""ESPnet equivalence of ``mla-convert import-espnet``: CTC log-probabilities of ESPnet's own model
against the imported HF model, on real LibriSpeech dev-clean utterances.

For each encoder setting below, the ESPnet side (run with the ESPnet venv's python, see
``scripts/espnet_env.sh``) builds ESPnet2's ``ESPnetASRModel`` (DefaultFrontend, GlobalMVN with
statistics of the utterances, the Conformer / Branchformer encoder, a Transformer decoder and CTC)
from a seed, randomises every LayerNorm / BatchNorm so that no tensor is left at an identity
value, writes ``config.yaml`` + ``valid.acc.ave.pth`` as an ESPnet experiment directory, and
records the CTC log-probabilities of each utterance (one at a time: ESPnet's convolution module
has no padding mask). This side then runs ``import_espnet`` on that directory and compares.

    scripts/espnet_env.sh                              # once: ../venv-espnet
    python scripts/check_espnet.py [--espnet-python ../venv-espnet/bin/python] [--utterances 3]

Writes ``results/espnet_equivalence.json`` and its table ``.md`` (max |log-prob difference| per setting and utterance,
the greedy CTC transcripts' agreement) and exits 1 if any difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENS = ["<blank>", "<unk>", "<space>", *"ETAONIHSRDLUMWCFGYPBVKXJQZ'", "<sos/eos>"]
COMMON = {"output_size": 256, "attention_heads": 4, "num_blocks": 3, "input_layer": "conv2d"}
SETTINGS: dict[str, tuple[str, dict]] = {
    "conformer_rel_pos": ("conformer", {**COMMON, "linear_units": 1024, "macaron_style": True,
                          "rel_pos_type": "latest", "pos_enc_layer_type": "rel_pos",
                          "selfattention_layer_type": "rel_selfattn", "cnn_module_kernel": 15}),
    "conformer_conv2d6_abs_pos": ("conformer", {**COMMON, "linear_units": 1024, "input_layer": "conv2d6",
                                  "pos_enc_layer_type": "abs_pos", "selfattention_layer_type": "selfattn",
                                  "cnn_module_kernel": 15}),
    "conformer_conv2d8_no_macaron": ("conformer", {**COMMON, "linear_units": 1024, "input_layer": "conv2d8",
                                     "rel_pos_type": "latest", "macaron_style": False, "cnn_module_kernel": 7}),
    "branchformer_concat": ("branchformer", {**COMMON, "cgmlp_linear_units": 1024, "cgmlp_conv_kernel": 15,
                            "merge_method": "concat"}),
    "branchformer_learned_ave": ("branchformer", {**COMMON, "cgmlp_linear_units": 1024, "cgmlp_conv_kernel": 15,
                                 "merge_method": "learned_ave", "use_linear_after_conv": True}),
    "branchformer_fixed_ave": ("branchformer", {**COMMON, "cgmlp_linear_units": 1024, "cgmlp_conv_kernel": 15,
                               "merge_method": "fixed_ave", "cgmlp_weight": 0.3}),
}  # fmt: skip
FRONTEND = {"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160}


def utterance_files(root: Path, count: int) -> list[Path]:
    return sorted((root / "dev-clean").rglob("*.flac"))[:count]


# ------------------------------------------------------------------------- ESPnet side (its venv)


def espnet_side(work: Path, files: list[Path], seed: int) -> None:
    import types

    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # imported, never called
    import numpy as np
    import soundfile
    import torch
    import yaml
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.branchformer_encoder import BranchformerEncoder
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
    from espnet2.asr.espnet_model import ESPnetASRModel
    from espnet2.asr.frontend.default import DefaultFrontend
    from espnet2.layers.global_mvn import GlobalMVN

    waveforms = [soundfile.read(file, dtype="float32")[0] for file in files]
    frontend = DefaultFrontend(**FRONTEND)
    with torch.no_grad():  # ESPnet's collect_stats: sum, sum of squares, count of every frame
        feats = [frontend(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0][0].double() for w in waveforms]
    stacked = torch.cat(feats)
    stats = work / "feats_stats.npz"
    np.savez(stats, count=np.array(stacked.shape[0]), sum=stacked.sum(0).numpy(),
             sum_square=(stacked**2).sum(0).numpy())  # fmt: skip
    np.savez(work / "waveforms.npz", *waveforms)
    encoders = {"conformer": ConformerEncoder, "branchformer": BranchformerEncoder}
    for name, (encoder, encoder_conf) in SETTINGS.items():
        torch.manual_seed(seed)
        model = ESPnetASRModel(
            vocab_size=len(TOKENS), token_list=TOKENS, frontend=DefaultFrontend(**FRONTEND), specaug=None,
            normalize=GlobalMVN(stats), preencoder=None, encoder=encoders[encoder](80, **encoder_conf),
            postencoder=None, decoder=TransformerDecoder(len(TOKENS), 256, attention_heads=4, num_blocks=1),
            ctc=CTC(len(TOKENS), 256), joint_network=None, ctc_weight=0.3,
        )  # fmt: skip
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.running_mean.normal_(0.0, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
        model.eval()
        experiment = work / name / "exp" / "asr_train"
        experiment.mkdir(parents=True)
        config = {
            "token_list": TOKENS, "frontend": "default", "frontend_conf": FRONTEND, "specaug": "specaug",
            "specaug_conf": {"apply_time_warp": True, "freq_mask_width_range": [0, 27], "num_freq_mask": 2,
                             "time_mask_width_ratio_range": [0.0, 0.05], "num_time_mask": 2},
            "normalize": "global_mvn", "normalize_conf": {"stats_file": str(stats)},
            "encoder": encoder, "encoder_conf": encoder_conf, "decoder": "transformer",
            "decoder_conf": {"attention_heads": 4, "num_blocks": 1}, "model_conf": {"ctc_weight": 0.3},
        }  # fmt: skip
        (experiment / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        torch.save(model.state_dict(), experiment / "valid.acc.ave.pth")
        outputs = []
        with torch.no_grad():
            for waveform in waveforms:
                speech = torch.from_numpy(waveform)[None]
                encoded, _ = model.encode(speech, torch.tensor([speech.shape[1]]))
                outputs.append(model.ctc.log_softmax(encoded)[0].numpy())
        np.savez(work / name / "espnet_log_probs.npz", *outputs)
        print(f"ESPnet {name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)


# ------------------------------------------------------------------------------ our side (project)


def our_side(work: Path, files: list[Path], tolerance: float) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCTC, AutoProcessor

    from mla_convert.importers.espnet import import_espnet

    waveforms = list(np.load(work / "waveforms.npz").values())
    report: dict = {"utterances": [file.stem for file in files], "tolerance": tolerance, "settings": {}}
    for name in SETTINGS:
        imported = import_espnet(work / name, work / name / "imported")
        model = AutoModelForCTC.from_pretrained(imported, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(imported, trust_remote_code=True)
        references = list(np.load(work / name / "espnet_log_probs.npz").values())
        rows = []
        for waveform, reference in zip(waveforms, references, strict=True):
            inputs = processor(waveform, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0]
            ours = torch.log_softmax(logits.double(), dim=-1).numpy()
            same_frames = ours.shape == reference.shape
            difference = float(np.abs(ours - reference).max()) if same_frames else float("inf")
            rows.append({
                "frames": int(reference.shape[0]), "our_frames": int(ours.shape[0]),
                "max_abs_log_prob_difference": difference,
                "greedy_ids_equal": bool(same_frames and (ours.argmax(-1) == reference.argmax(-1)).all()),
            })  # fmt: skip
        worst = max(row["max_abs_log_prob_difference"] for row in rows)
        report["settings"][name] = {
            "encoder": SETTINGS[name][0], "encoder_conf": SETTINGS[name][1],
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_abs_log_prob_difference": worst, "passed": worst <= tolerance, "per_utterance": rows,
        }  # fmt: skip
        print(f"{name:32s} max |log p_ours - log p_espnet| = {worst:.2e}", flush=True)
    report["passed"] = all(entry["passed"] for entry in report["settings"].values())
    return report


def markdown(report: dict) -> str:
    """The curated table (results/espnet_equivalence.md) of a report."""
    lines = [
        "# ESPnet equivalence of `mla-convert import-espnet`",
        "",
        f"ESPnet {report['espnet_version']}'s own `ESPnetASRModel` (seeded random weights, every norm randomised) "
        "against the imported HF model: max |log p_ours - log p_espnet| of the CTC log-probabilities over every "
        f"frame and token of {len(report['utterances'])} dev-clean utterances ({', '.join(report['utterances'])}), "
        "one at a time. Produced by `scripts/check_espnet.py`.",
        "",
        "| setting | encoder | parameters (CTC model) | max abs log-prob difference | greedy CTC ids equal |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["settings"].items():
        same = all(row["greedy_ids_equal"] for row in entry["per_utterance"])
        lines.append(
            f"| {name} | {entry['encoder']} | {entry['parameters']:,} | "
            f"{entry['max_abs_log_prob_difference']:.2e} | {'yes' if same else 'no'} |"
        )
    verdict = "passed" if report["passed"] else "FAILED"
    lines += ["", f"Tolerance {report['tolerance']:g}: {verdict}.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--espnet-python", default=str(ROOT.parent / "venv-espnet" / "bin" / "python"))
    default_data = os.environ.get("LIBRISPEECH_ROOT", str(ROOT.parent / "shared" / "data" / "LibriSpeech"))
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--output", default=str(ROOT / "results" / "espnet_equivalence.json"))
    parser.add_argument("--espnet-side", metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = utterance_files(Path(args.data), args.utterances)
    if args.espnet_side:
        espnet_side(Path(args.espnet_side), files, args.seed)
        return 0
    if not files:
        parser.error(f"no dev-clean utterances under {args.data}")
    with tempfile.TemporaryDirectory(prefix="check-espnet.") as work:
        command = [args.espnet_python, __file__, "--espnet-side", work, "--data", args.data,
                   "--utterances", str(args.utterances), "--seed", str(args.seed)]  # fmt: skip
        subprocess.run(command, check=True)
        report = our_side(Path(work), files, args.tolerance)
    version = subprocess.run([args.espnet_python, "-c", "import espnet; print(espnet.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    report["espnet_version"] = version
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(args.output).with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {args.output}: {'PASSED' if report['passed'] else 'FAILED'} (tolerance {args.tolerance})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
