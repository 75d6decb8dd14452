"""FunASR equivalence of ``import_funasr``: a randomly initialised FunASR Paraformer (Conformer
encoder, SAN decoder, CIF predictor) against the ``ParaformerForASR`` it imports to.

Stage A (FunASR's venv, see ``scripts/funasr_env.sh``) builds FunASR's own
``Paraformer(encoder="ConformerEncoder", decoder="ParaformerSANDecoder", predictor="CifPredictorV2")``
from a seed (small: d=64, 2 encoder and 2 decoder layers, 40 tokens, latest rel_pos), randomises
every LayerNorm / BatchNorm so that none is left at an identity value, writes ``config.yaml`` +
``model.pt`` as a FunASR model directory, and records on random features (a batch of two, the
second padded) the encoder output, the CIF weights (with the tail frame), the fired token counts
and the decoder's log-probabilities (``encode`` -> ``calc_predictor`` ->
``cal_decoder_with_predictor``, as ``Paraformer.inference``), batched and one utterance at a time.
Stage B (this venv) imports the directory with ``import_funasr``, runs the model on the same
features (fed directly: no front end) and prints the largest differences over the real frames and
tokens; it exits 1 if one exceeds ``--tolerance`` or a token count differs.

    python scripts/check_funasr.py [--funasr-python ../venv-funasr/bin/python] [--tolerance 1e-4]

The encoder's convolution module in FunASR (as in ESPnet) does not mask padded frames, so a padded
utterance's last real frames see the padding in a batch; ours zeroes it. The comparison of the
padded utterance is therefore against FunASR run on that utterance alone (its batched output is
reported too, as information).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 40
TOKENS = ["<blank>", "<s>", "</s>", *[f"t{i}" for i in range(VOCAB - 4)], "<unk>"]
LENGTHS = (160, 117)  # feature frames of the two utterances (the second padded in the batch)
FEATURES = 80
MODEL_CONF = {"ctc_weight": 0.3, "lsm_weight": 0.1, "predictor_weight": 1.0, "predictor_bias": 1,
              "sampling_ratio": 0.4, "sos": 1, "eos": 2}  # fmt: skip
ENCODER_CONF = {"output_size": 64, "attention_heads": 4, "linear_units": 128, "num_blocks": 2,
                "input_layer": "conv2d", "macaron_style": True, "rel_pos_type": "latest",
                "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn",
                "activation_type": "swish", "use_cnn_module": True, "cnn_module_kernel": 7,
                "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.0}  # fmt: skip
DECODER_CONF = {"attention_heads": 4, "linear_units": 96, "num_blocks": 2, "dropout_rate": 0.1,
                "self_attention_dropout_rate": 0.0, "src_attention_dropout_rate": 0.0}  # fmt: skip
PREDICTOR_CONF = {"idim": 64, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45,
                  "smooth_factor": 1.0, "noise_threshold": 0.0}  # fmt: skip


# ------------------------------------------------------------------------ stage A: FunASR's venv


def funasr_side(work: Path, seed: int) -> None:
    import types

    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # imported, never called
    import numpy as np
    import torch
    import yaml
    from funasr.models.paraformer.model import Paraformer

    torch.manual_seed(seed)
    kwargs = {
        "encoder": "ConformerEncoder", "encoder_conf": ENCODER_CONF,
        "decoder": "ParaformerSANDecoder", "decoder_conf": DECODER_CONF,
        "predictor": "CifPredictorV2", "predictor_conf": PREDICTOR_CONF,
        "input_size": FEATURES, "vocab_size": len(TOKENS), **MODEL_CONF,
    }  # fmt: skip
    model = Paraformer(**kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        # a bias on the CIF output so that the weights are spread (not all ~0.5)
        model.predictor.cif_output.weight.mul_(3.0)
    model.eval()
    model_dir = work / "funasr_model"
    model_dir.mkdir()
    config = {
        "model": "Paraformer", "model_conf": MODEL_CONF,
        "encoder": "ConformerEncoder", "encoder_conf": ENCODER_CONF,
        "decoder": "ParaformerSANDecoder", "decoder_conf": DECODER_CONF,
        "predictor": "CifPredictorV2", "predictor_conf": PREDICTOR_CONF,
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": FEATURES, "frame_length": 25,
                          "frame_shift": 10, "lfr_m": 1, "lfr_n": 1},
        "input_size": FEATURES, "token_list": TOKENS,
    }  # fmt: skip
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    torch.save(model.state_dict(), model_dir / "model.pt")

    generator = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(len(LENGTHS), max(LENGTHS), FEATURES, generator=generator)
    for row, length in enumerate(LENGTHS):
        features[row, length:] = 0.0
    np.save(work / "features.npy", features.numpy())

    def run(feats: torch.Tensor, lengths: torch.Tensor, tag: str) -> None:
        with torch.no_grad():
            encoded, encoded_lengths = model.encode(feats, lengths)
            embeds, token_num, alphas, _ = model.calc_predictor(encoded, encoded_lengths)
            token_lengths = token_num.round().long()
            log_probs, _ = model.cal_decoder_with_predictor(encoded, encoded_lengths, embeds, token_lengths)
        for name, value in (("encoder", encoded), ("encoder_lengths", encoded_lengths), ("alphas", alphas),
                            ("token_lengths", token_lengths), ("log_probs", log_probs)):  # fmt: skip
            np.save(work / f"{tag}_{name}.npy", value.numpy())

    run(features, torch.tensor(LENGTHS), "batch")
    for row, length in enumerate(LENGTHS):
        run(features[row : row + 1, :length], torch.tensor([length]), f"single{row}")
    print(f"stage A: FunASR Paraformer written to {model_dir}")


# ------------------------------------------------------------------------ stage B: this venv

OUTPUTS = ("encoder", "encoder_lengths", "alphas", "token_lengths", "log_probs")


def run_ours(model, features, lengths) -> dict:
    """Our outputs, as FunASR's stage A saved them: the encoder, the CIF weights (tail frame
    included), the fired token counts and the decoder's log-probabilities of every fired row
    (``forward`` blanks the eos row of ``predictor_bias``; ``forward_log_probs`` is forward's)."""
    import torch

    mask = (torch.arange(features.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        output = model(input_features=features, attention_mask=mask)
        encoded = output.encoder_last_hidden_state
        frame_mask = torch.arange(encoded.shape[1])[None, :] < output.encoder_lengths[:, None]
        fired = model.model.predictor(encoded, frame_mask)
        raw = model.model.decoder(fired.embeddings, fired.token_lengths, encoded, frame_mask)
    return {
        "encoder": encoded.numpy(), "encoder_lengths": output.encoder_lengths.numpy(),
        "alphas": output.alphas.numpy(), "token_lengths": output.token_lengths.numpy(),
        "log_probs": torch.log_softmax(raw, -1).numpy(),
        "forward_log_probs": torch.log_softmax(output.logits, -1).numpy(),
    }  # fmt: skip


def compare(ours: dict, row: int, theirs: dict, index: int, bias: int) -> tuple[dict, bool, str]:
    """Max |difference| over the real frames (and the tail) and the fired tokens of one utterance."""
    import numpy as np

    frames, tokens = int(theirs["encoder_lengths"][index]), int(theirs["token_lengths"][index])
    our_frames, our_tokens = int(ours["encoder_lengths"][row]), int(ours["token_lengths"][row])
    counts = f"FunASR {frames} frames / {tokens} tokens, ours {our_frames} / {our_tokens}"
    if (frames, tokens) != (our_frames, our_tokens):
        return {}, False, counts
    ours_lp, theirs_lp = ours["log_probs"][row, :tokens], theirs["log_probs"][index, :tokens]
    differences = {
        "encoder": np.abs(ours["encoder"][row, :frames] - theirs["encoder"][index, :frames]).max(),
        "alphas": np.abs(ours["alphas"][row, : frames + 1] - theirs["alphas"][index, : frames + 1]).max(),
        "log_probs": np.abs(ours_lp - theirs_lp).max(),
        "forward_log_probs": np.abs(ours["forward_log_probs"][row, : tokens - bias] - theirs_lp[: tokens - bias]).max(),
    }  # fmt: skip
    greedy = bool((ours_lp.argmax(-1) == theirs_lp.argmax(-1)).all())
    return {name: float(value) for name, value in differences.items()}, greedy, counts


def our_side(work: Path, tolerance: float) -> bool:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from mla_convert.importers.funasr import import_funasr
    from mla_convert.modeling.modeling_paraformer import ParaformerForASR

    output = import_funasr(work / "funasr_model", work / "imported", overwrite=True)
    model = ParaformerForASR.from_pretrained(output).eval()
    bias = model.config.predictor_bias
    features = torch.from_numpy(np.load(work / "features.npy"))
    batched = run_ours(model, features, torch.tensor(LENGTHS))
    funasr_batched = {name: np.load(work / f"batch_{name}.npy") for name in OUTPUTS}
    passed = True
    for row, length in enumerate(LENGTHS):
        single = run_ours(model, features[row : row + 1, :length], torch.tensor([length]))
        funasr_single = {name: np.load(work / f"single{row}_{name}.npy") for name in OUTPUTS}
        checks = (
            ("ours alone    vs FunASR alone  ", single, 0, funasr_single, 0, True),
            ("ours batched  vs FunASR alone  ", batched, row, funasr_single, 0, True),
            ("ours batched  vs FunASR batched", batched, row, funasr_batched, row, False),
        )
        print(
            f"--- utterance {row}: {length} feature frames{' (padded in the batch)' if length < max(LENGTHS) else ''}"
        )
        for label, ours, our_row, theirs, index, required in checks:
            differences, greedy, counts = compare(ours, our_row, theirs, index, bias)
            ok = bool(differences) and greedy and max(differences.values()) <= tolerance
            line = ", ".join(f"{name} {value:.2e}" for name, value in differences.items()) or "token counts differ"
            verdict = ("ok" if ok else "FAIL") if required else "information"
            print(f"{label}: {counts}; max |diff| {line}; greedy {'equal' if greedy else 'DIFFERS'} [{verdict}]")
            passed &= ok or not required
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--funasr-python", default=str(ROOT.parent / "venv-funasr" / "bin" / "python"))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep the FunASR model, features and outputs here (an empty folder)")
    parser.add_argument("--stage-a", metavar="WORK", help=argparse.SUPPRESS)  # run by the FunASR venv
    args = parser.parse_args()
    if args.stage_a:
        funasr_side(Path(args.stage_a), args.seed)
        return 0
    with tempfile.TemporaryDirectory(prefix="check-funasr-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        command = [args.funasr_python, __file__, "--stage-a", str(work), "--seed", str(args.seed)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        passed = our_side(work, args.tolerance)
    print(f"{'PASSED' if passed else 'FAILED'} (tolerance {args.tolerance})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
