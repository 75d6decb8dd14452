"""``mla-convert profile``: what a model costs at run time, measured, with the formula beside it.

For each model and input length: parameters; K/V-state bytes per position and layer from the
variant formula and measured on live tensors (:mod:`.state`); forward wall time (one warm-up, the
median of ``repeats``); peak memory of the forward (CUDA max allocated, or the process's peak-RSS
rise on the CPU); and for decoders ``generate()`` throughput at ``batch_size`` × ``new_tokens``
(forced to that length, so every variant decodes the same number of steps).

The input is a fixed, seeded noise signal of each length: the costs measured here depend on
lengths and shapes, not on what is said (WER is ``evaluate``'s job).
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MlaConvertError
from ..evaluation.kv_state import layer_state_bytes
from ..evaluation.memory import peak_memory, reset_peak_memory
from ..evaluation.model import ASRModel, load_asr_model, quiet_transformers
from ..hosts import adapter_for_config
from ..version import __version__
from .state import StateCapture, cache_state_bytes, compare_with_formula, streaming_state_bytes

PROFILE_KIND = "mla_convert.profile"
DEFAULT_SECONDS = (5.0, 20.0, 60.0)
DEFAULT_NEW_TOKENS = (200,)


class ProfileError(MlaConvertError):
    """Settings a profile cannot run with (one line, before any model is loaded)."""


def check_settings(seconds: Sequence[float], batch_size: int, new_tokens: Sequence[int], repeats: int) -> None:
    if not seconds or any(s <= 0 for s in seconds):
        raise ProfileError(f"--seconds must be positive lengths of audio, got {list(seconds)}")
    if batch_size < 1:
        raise ProfileError(f"--batch-size must be at least 1, got {batch_size}")
    if not new_tokens or any(n < 1 for n in new_tokens):
        raise ProfileError(f"--new-tokens must be at least 1, got {list(new_tokens)}")
    if repeats < 1:
        raise ProfileError(f"--repeats must be at least 1, got {repeats}")


def test_signal(seconds: float, sampling_rate: int, seed: int = 0) -> np.ndarray:
    """``seconds`` of seeded low-level noise (float32), the same for every model."""
    generator = np.random.default_rng(seed)
    return (0.05 * generator.standard_normal(int(round(seconds * sampling_rate)))).astype(np.float32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def measure(run: Callable[[], Any], device: torch.device, repeats: int) -> dict:
    """One warm-up, then ``repeats`` timed runs; the peak memory of one more run: CUDA's max
    allocated (absolute), or on the CPU how far the process's peak RSS rose above its RSS before."""
    run()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    gc.collect()
    before = _current_rss() if device.type != "cuda" else None
    reset_peak_memory(device)
    run()
    _synchronize(device)
    peak, kind = peak_memory(device)
    if device.type != "cuda" and peak is not None and before is not None:
        peak, kind = max(0, peak - before), "process_peak_rss_increase"
    return {"median_s": statistics.median(times), "runs_s": times, "peak_memory_bytes": peak, "memory_kind": kind}


def _site_paths(model) -> tuple[Any, dict[str, tuple[str, Any]]]:
    """The module the adapter's attention paths are relative to, and its layout."""
    config = model.config
    layout = adapter_for_config(config).attention_layout(config)
    for root in (model.base_model, model):
        if all(_has_submodule(root, path) for path in layout):
            return root, layout
    raise ProfileError(f"cannot find the attention layers of {type(model).__name__} at the paths its adapter names")


def _has_submodule(root, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


class ModelProfiler:
    """Measures one loaded model (see the module docstring)."""

    def __init__(self, asr: ASRModel, batch_size: int, repeats: int) -> None:
        self.asr = asr
        self.model = asr.model
        self.batch_size = batch_size
        self.repeats = repeats
        self.root, self.layout = _site_paths(self.model)
        self.formula = layer_state_bytes(self.model.config, asr.dtype)

    # -- inputs -------------------------------------------------------------------------------
    def inputs(self, seconds: float) -> dict[str, Any]:
        audio = test_signal(seconds, self.asr.sampling_rate)
        prepared = self.asr.prepare([audio] * self.batch_size)
        inputs = self.asr._to_device(prepared["inputs"])
        if self.asr.kind == "seq2seq":
            start = self.model.generation_config.decoder_start_token_id or self.model.config.decoder_start_token_id
            inputs["decoder_input_ids"] = torch.full((self.batch_size, 1), int(start), device=self.asr.device)
        return inputs

    def input_seconds(self, seconds: float) -> float:
        """What the model sees of ``seconds`` of audio: Whisper-style extractors cut at their window."""
        window = getattr(self.asr.feature_extractor, "n_samples", None) if self.asr._fixed_length_features else None
        return min(seconds, window / self.asr.sampling_rate) if window else seconds

    # -- measurements -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seconds: float) -> dict:
        inputs = self.inputs(seconds)
        result = measure(lambda: self.model(**inputs), self.asr.device, self.repeats)
        return {
            "seconds": seconds,
            "input_seconds": self.input_seconds(seconds),
            "batch_size": self.batch_size,
            **result,
        }

    @torch.inference_mode()
    def forward_state(self, seconds: float) -> list[dict]:
        """The state each attention layer materialises in one full forward (decoder layers of a
        seq2seq model are measured in its cache instead)."""
        inputs = self.inputs(seconds)
        paths = [p for p, (role, _) in self.layout.items() if self.asr.kind != "seq2seq" or role == "encoder"]
        with StateCapture(self.root, paths) as capture:
            self.model(**inputs)
        return compare_with_formula(self.formula, capture.rows())

    @torch.inference_mode()
    def decode(self, seconds: float, new_tokens: int) -> tuple[dict, list[dict]]:
        """``generate()`` of exactly ``new_tokens`` per row, greedy; throughput and the cache."""
        inputs = self.inputs(seconds)
        inputs.pop("decoder_input_ids", None)
        options = {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "num_beams": 1,
            "do_sample": False,
        }
        last: dict[str, Any] = {}

        def run():
            with quiet_transformers():
                last["output"] = self.model.generate(**inputs, **options, return_dict_in_generate=True)

        def see_cache(module, args, kwargs):
            # the live cache the decoder steps read and write (what generate() returns may be a
            # rebuilt copy: Whisper's turns running-summary layers into plain ones)
            last["cache"] = kwargs.get("cache", None) or kwargs.get("past_key_values", None)

        hook = self.model.get_decoder().register_forward_pre_hook(see_cache, with_kwargs=True)
        try:
            result = measure(run, self.asr.device, self.repeats)
        finally:
            hook.remove()
        output = last["output"]
        generated = int(output.sequences.shape[1])
        result["tokens_per_s"] = self.batch_size * new_tokens / result["median_s"]
        # the decoder's share: generate() less the encoder forward it starts with
        encoder = self.model.get_encoder()
        features = {name: value for name, value in inputs.items() if name in ("input_features", "attention_mask")}
        result["encoder_s"] = measure(lambda: encoder(**features), self.asr.device, self.repeats)["median_s"]
        result["decode_s"] = max(result["median_s"] - result["encoder_s"], 1e-9)
        result["decode_tokens_per_s"] = self.batch_size * new_tokens / result["decode_s"]
        cache = last.get("cache")
        state = []
        if cache is not None:
            self_paths, cross_paths = {}, {}
            for path, (role, _) in self.layout.items():
                index = int(path.split(".")[2])
                if role == "decoder":
                    self_paths[index] = path
                elif role == "cross":
                    cross_paths[index] = path
            state = compare_with_formula(
                self.formula, cache_state_bytes(cache, self.batch_size, self_paths, cross_paths)
            )
        row = {"seconds": self.input_seconds(seconds), "new_tokens": new_tokens, "batch_size": self.batch_size}
        return {**row, "sequence_length": generated, **result}, state

    @torch.inference_mode()
    def streaming_state(self, seconds: float) -> list[dict] | None:
        """A streaming encoder's cache after ``seconds`` streamed; ``None`` if it cannot stream."""
        config = self.model.config
        if not getattr(config, "chunk_size", 0) or not hasattr(self.model.encoder, "forward_chunk"):
            return None
        from ..modeling.streaming_speech_encoder import StreamingConfigError, StreamingSession

        try:
            session = StreamingSession(self.model, self.asr.feature_extractor)
        except StreamingConfigError:
            return None
        session.feed(test_signal(seconds, self.asr.sampling_rate))
        session.finish()
        paths = [path for path, (role, _) in self.layout.items() if role == "encoder"]
        rows = streaming_state_bytes(self.model, session.state, session.chunk_size, session.left_chunks, paths)
        return compare_with_formula(self.formula, rows)


def profile_model(
    model_id: str,
    seconds: Sequence[float],
    batch_size: int,
    new_tokens: Sequence[int],
    repeats: int,
    device: str = "auto",
    fp16: bool = False,
    remote_code: bool = True,
    step: Callable[[str], None] | None = None,
) -> dict:
    step = step or (lambda label: None)
    asr = load_asr_model(model_id, device, fp16, remote_code=remote_code)
    try:
        profiler = ModelProfiler(asr, batch_size, repeats)
        info = asr.info
        entry: dict[str, Any] = {
            "model": model_id,
            "path": info.get("path"),
            "kind": asr.kind,
            "architecture": info.get("architecture"),
            "classes": info.get("classes"),
            "device": str(asr.device),
            "dtype": info.get("dtype"),
            "attention": info.get("attention"),
            "parameters": sum(p.numel() for p in asr.model.parameters()),
            "kv_state_formula": {
                "bytes_per_position_by_role": _by_role(profiler.formula, "bytes_per_position"),
                "fixed_bytes_by_role": _by_role(profiler.formula, "fixed_bytes"),
                "layers": profiler.formula,
            },
        }
        step(f"{model_id}: state")
        state = {"forward": profiler.forward_state(seconds[0])}
        streamed = profiler.streaming_state(seconds[0])
        if streamed is not None:
            state["streaming"] = streamed
        forward = []
        for length in seconds:
            step(f"{model_id}: forward {length:g} s")
            forward.append(profiler.forward(length))
        entry["forward"] = forward
        if asr.kind == "seq2seq":
            decode = []
            longest = max(seconds, key=profiler.input_seconds)
            for count in new_tokens:
                step(f"{model_id}: generate {batch_size} x {count}")
                row, cache = profiler.decode(longest, count)
                decode.append(row)
                state["generate_cache"] = cache
            entry["decode"] = decode
        entry["kv_state_measured"] = state
        entry["kv_state_matches_formula"] = all(row["matches"] for rows in state.values() for row in rows)
        return entry
    finally:
        asr.close()


def _by_role(formula: dict[str, dict], key: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in formula.values():
        totals[row["role"]] = totals.get(row["role"], 0) + row[key]
    return totals


def profile_models(
    models: Sequence[str],
    seconds: Sequence[float] = DEFAULT_SECONDS,
    batch_size: int = 1,
    new_tokens: Sequence[int] = DEFAULT_NEW_TOKENS,
    repeats: int = 3,
    device: str = "auto",
    fp16: bool = False,
    progress: bool = True,
    remote_code: bool = True,
) -> dict:
    """Profile every model (see the module docstring); the JSON payload."""
    check_settings(seconds, batch_size, new_tokens, repeats)
    from tqdm.auto import tqdm

    steps_per_model = 1 + len(seconds) + len(new_tokens)
    bar = tqdm(total=steps_per_model * len(models), desc="profile", unit="step", disable=not progress)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        entries = [
            profile_model(model, seconds, batch_size, new_tokens, repeats, device, fp16, remote_code, step)
            for model in models
        ]
    finally:
        bar.close()
    first = entries[0] if entries else {}
    return {
        "kind": PROFILE_KIND,
        "mla_convert_version": __version__,
        "created": started,
        "settings": {
            "seconds": list(seconds),
            "batch_size": batch_size,
            "new_tokens": list(new_tokens),
            "repeats": repeats,
            "fp16": fp16,
        },
        "machine": {
            "device": first.get("device", device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "models": entries,
    }


def format_profile(payload: dict) -> str:
    """A plain-text table of a profile payload (what ``mla-convert profile`` prints)."""
    lines = []
    for entry in payload["models"]:
        formula = entry["kv_state_formula"]["bytes_per_position_by_role"]
        roles = ", ".join(f"{role} {value} B" for role, value in formula.items())
        match = "measured = formula" if entry["kv_state_matches_formula"] else "MEASURED != FORMULA"
        lines.append(
            f"{entry['model']}: {entry['parameters'] / 1e6:.2f} M parameters; K/V state per position: {roles} ({match})"
        )
        for row in entry["forward"]:
            memory = row["peak_memory_bytes"]
            memory_text = "-" if memory is None else f"{memory / 2**20:.1f} MiB"
            lines.append(
                f"  forward {row['input_seconds']:g} s x {row['batch_size']}: {1000 * row['median_s']:.1f} ms, "
                f"peak memory {memory_text}"
            )
        for row in entry.get("decode", []):
            lines.append(
                f"  generate {row['batch_size']} x {row['new_tokens']} tokens: {row['median_s']:.2f} s, "
                f"{row['tokens_per_s']:.1f} tokens/s ({row['decode_tokens_per_s']:.1f} tokens/s after the encoder)"
            )
    return "\n".join(lines)
