"""Attention benchmark: do the smaller caches pay at run time? Every variant is timed against its
original in one process, interleaved, and printed as time ratios (variant / original).

Whisper decoders (``generate()``, greedy, ``--batch-size`` x ``--new-tokens``, forced to that many
tokens so every variant decodes the same steps): the bundled tiny.en (real weights) and the
large-v3 decoder config (d_model 1280, 20 heads, 32 layers; seeded random weights; a one-layer
encoder, since only the decoder is timed), each converted to MLA (``--latent-dim``, decoder
self- and cross-attention) and GQA (``--kv-heads``). The encoder output is computed once and
handed to every variant, so the time is the decoder's alone. Targets: ratio <= 1.0 on tiny.en
and <= 0.8 on the large-v3 decoder.

The 0.6B wav2vec2-conformer (the exact config of ``facebook/wav2vec2-conformer-rel-pos-large-960h-ft``,
seeded random weights) converted to MLA (latent 512 and 256), GQA (kv 4) and linear (elu): one
forward of ``--seconds`` of audio each. Targets: MLA and GQA <= 1.0 at 20 s; linear at least
1.5x faster (ratio <= 0.67) at 60 s.

    python scripts/bench_attention.py                     # everything (2-core CPU: about 25 min)
    python scripts/bench_attention.py --only whisper-tiny --repeats 5

Nothing else should run meanwhile. Prints the table; writes ``results/bench_attention.md`` and
``results/bench_attention.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("whisper-tiny", "whisper-large", "conformer")


def large_v3_decoder():
    """Whisper large-v3's decoder (and its vocabulary), seeded random weights, a 1-layer encoder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=1, encoder_attention_heads=20,
        decoder_layers=32, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
        eos_token_id=50257, pad_token_id=50256, bos_token_id=50257,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).eval()


def tiny_en():
    from transformers import WhisperForConditionalGeneration

    from mla_convert.loading import resolve_model_id

    return WhisperForConditionalGeneration.from_pretrained(resolve_model_id("bundled:whisper-tiny.en")).eval()


def whisper_variants(base, latent_dim: int, kv_heads: int) -> dict:
    import mla_convert
    from mla_convert import GQASpec, MLASpec

    variants = {"MHA (original)": base}
    for name, spec in (
        (f"MLA d_c {latent_dim}", MLASpec(latent_dim=latent_dim)),
        (f"GQA kv {kv_heads}", GQASpec(kv_heads=kv_heads)),
    ):
        model = copy.deepcopy(base)
        mla_convert.convert(model, spec, targets=["decoder", "cross"])
        variants[name] = model.eval()
    return variants


def time_decode(models: dict, batch_size: int, new_tokens: int, repeats: int) -> dict:
    """Median seconds of ``generate()`` per model (interleaved), on one shared encoder output."""
    from transformers import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    base = next(iter(models.values()))
    config = base.config
    torch.manual_seed(1)
    features = torch.randn(batch_size, config.num_mel_bins, 2 * config.max_source_positions)
    with torch.inference_mode():
        encoded = base.get_encoder()(features).last_hidden_state
    start = torch.full((batch_size, 1), config.decoder_start_token_id)

    def run(model, tokens):
        with torch.inference_mode():
            # the plain greedy loop of GenerationMixin (Whisper's wrapper adds prompt handling only)
            output = GenerationMixin.generate(
                model, encoder_outputs=BaseModelOutput(last_hidden_state=encoded), decoder_input_ids=start,
                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                suppress_tokens=None, begin_suppress_tokens=None,
            )  # fmt: skip
        assert output.shape[1] == tokens + 1, output.shape

    for model in models.values():
        run(model, 4)  # warm-up
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            begin = time.perf_counter()
            run(model, new_tokens)
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def conformer_variants() -> dict:
    from bench_convert import rel_pos_large_config
    from transformers import Wav2Vec2ConformerForCTC

    import mla_convert
    from mla_convert import GQASpec, LinearSpec, MLASpec

    torch.manual_seed(0)
    base = Wav2Vec2ConformerForCTC(rel_pos_large_config()).eval()
    variants = {"MHA (original)": base}
    specs = {
        "MLA d_c 512": MLASpec(latent_dim=512),
        "MLA d_c 256": MLASpec(latent_dim=256),
        "GQA kv 4": GQASpec(kv_heads=4),
        "linear elu": LinearSpec(),
    }
    for name, spec in specs.items():
        model = copy.deepcopy(base)
        mla_convert.convert(model, spec)
        variants[name] = model.eval()
        gc.collect()
    return variants


def time_forward(models: dict, seconds: float, repeats: int) -> dict:
    torch.manual_seed(2)
    audio = 0.05 * torch.randn(1, int(seconds * 16000))
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, model in models.items():
                begin = time.perf_counter()
                model(audio)
                times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_rows(section: str, setting: str, times: dict, target: dict[str, float]) -> list[dict]:
    base = times["MHA (original)"]
    rows = []
    for name, seconds in times.items():
        ratio = seconds / base
        goal = next((value for prefix, value in target.items() if name.startswith(prefix)), None)
        rows.append({"section": section, "setting": setting, "variant": name, "seconds": seconds, "ratio": ratio,
                     "target": goal, "met": None if goal is None else ratio <= goal})  # fmt: skip
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Attention benchmark (`scripts/bench_attention.py`)",
        "",
        f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; each variant timed against its original in one process.",
        "",
        "| model | setting | variant | time (s) | ratio to MHA | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "-" if row["target"] is None else f"≤ {row['target']:.2f}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['section']} | {row['setting']} | {row['variant']} | {row['seconds']:.2f} | "
                     f"{row['ratio']:.3f} | {target} | {met} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--latent-dim", type=int, default=192, help="Whisper MLA latent")
    parser.add_argument("--kv-heads", type=int, default=2, help="Whisper GQA K/V heads")
    parser.add_argument("--seconds", type=float, nargs="+", default=[20.0, 60.0], help="conformer input lengths")
    parser.add_argument(
        "--repeats", type=int, default=3, help="tiny.en: timed runs per variant (median), after a warm-up"
    )
    parser.add_argument("--large-repeats", type=int, default=1, help="large-v3 decoder: timed runs per variant")
    parser.add_argument(
        "--forward-repeats", type=int, default=1, help="conformer: timed forwards per variant and length"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_attention")
    args = parser.parse_args()

    import transformers

    machine = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    rows: list[dict] = []
    setting = f"generate {args.batch_size} x {args.new_tokens}"
    decode_targets = {"whisper-tiny": 1.0, "whisper-large": 0.8}
    for section, build in (("whisper-tiny", tiny_en), ("whisper-large", large_v3_decoder)):
        if section not in args.only:
            continue
        models = whisper_variants(build(), args.latent_dim, args.kv_heads)
        repeats = args.repeats if section == "whisper-tiny" else args.large_repeats
        times = time_decode(models, args.batch_size, args.new_tokens, repeats)
        target = decode_targets[section]
        rows += ratio_rows(section, setting, times, {"MLA": target, "GQA": target})
        print(markdown(rows, machine), flush=True)
        del models
        gc.collect()
    if "conformer" in args.only:
        models = conformer_variants()
        for seconds in args.seconds:
            with torch.inference_mode():
                time_forward(models, min(seconds, 2.0), 1)  # warm-up
            times = time_forward(models, seconds, args.forward_repeats)
            target = {"MLA": 1.0, "GQA": 1.0} if seconds <= 20 else {"linear": 1 / 1.5}
            rows += ratio_rows("wav2vec2-conformer 0.6B", f"forward {seconds:g} s", times, target)
            print(markdown(rows, machine), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(rows, machine))
    print(f"wrote {args.output.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
