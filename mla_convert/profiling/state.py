"""K/V state as it is really held, measured on live tensors, to set beside the formula.

Three places a model keeps (or makes) its attention state:

- a decoder's ``generate()`` cache (:func:`cache_state_bytes`): every layer of the returned
  ``EncoderDecoderCache``, per generated token (self-attention) or per encoder frame (cross);
- a streaming encoder's cache (:func:`streaming_state_bytes`): the per-layer state a
  :class:`StreamingSession` carries from chunk to chunk;
- a full-sequence forward (:class:`StateCapture`): the state tensors each attention layer
  materialises, caught on the way (a converted layer's ``kv_state`` / linear attention's sums, an
  unconverted host layer's key and value projections).

Each gives per layer ``bytes_per_position`` (held per token or frame) and ``fixed_bytes`` (held per
sequence whatever its length: linear attention's sums), the two numbers the formula
(:func:`mla_convert.evaluation.kv_state.layer_state_bytes`) predicts.
"""

from __future__ import annotations

import torch
from torch import nn

# where an unconverted host attention keeps its key and value projections
HOST_KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj", "linear_k", "linear_v")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def is_variant(module) -> bool:
    """A converted-attention variant module. Told by its interface, not its class: a model loaded
    from its saved remote code has its own copy of the classes."""
    return isinstance(module, nn.Module) and all(
        hasattr(module, name) for name in ("kv_state", "expand_state", "state_values_per_token")
    )


def is_linear(module) -> bool:
    """Linear attention: its state is a fixed sum, not per-token tensors."""
    return is_variant(module) and hasattr(module, "_sums") and module.fixed_state_values() > 0


def converted_attention(module: nn.Module) -> nn.Module | None:
    """The variant module at an attention site: the site itself (mla_convert's own models) or the
    ``attention`` of a host wrapper (converted Whisper / wav2vec2-conformer)."""
    if is_variant(module):
        return module
    inner = getattr(module, "attention", None)
    return inner if is_variant(inner) else None


def is_running_summary(layer) -> bool:
    """A cache layer of running sums (linear attention), whichever copy of the class made it."""
    return type(layer).__name__ == "RunningSummaryLayer"


class StateCapture:
    """Records the attention state each site materialises during the forwards run inside it.

    ``with StateCapture(model, paths) as capture: model(**inputs)``; then ``capture.rows()`` gives
    per path ``{"bytes_per_position", "fixed_bytes"}`` of the last forward. Per-token tensors
    ``[B, *, T, *]`` (``kv_state``; the host's ``[B, T, d]`` projections) count per batch row and
    position; linear attention's sums count per batch row.
    """

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.model = model
        self.paths = paths
        self.per_position: dict[str, int] = {}
        self.fixed: dict[str, int] = {}
        self._undo: list = []

    def __enter__(self) -> StateCapture:
        for path in self.paths:
            site = self.model.get_submodule(path)
            attention = converted_attention(site)
            if attention is None:
                self._hook_projections(path, site)
            elif is_linear(attention):
                self._wrap(path, attention, "_sums", per_position=False)
            else:
                self._wrap(path, attention, "kv_state", per_position=True)
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _record(self, path: str, tensors, per_position: bool) -> None:
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        batch = tensors[0].shape[0]
        if per_position:
            positions = tensors[0].shape[-2] if tensors[0].dim() == 4 else tensors[0].shape[1]
            self.per_position[path] = sum(_nbytes(t) for t in tensors) // (batch * positions)
        else:
            self.fixed[path] = sum(_nbytes(t) for t in tensors) // batch

    def _wrap(self, path: str, module: nn.Module, name: str, per_position: bool) -> None:
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            result = original(*args, **kwargs)
            self._record(path, result, per_position)
            return result

        setattr(module, name, recorded)
        self._undo.append(lambda: delattr(module, name))

    def _hook_projections(self, path: str, site: nn.Module) -> None:
        seen: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, inputs, output):
                seen[name] = output
                if len(seen) == 2:  # key and value of this call
                    self._record(path, list(seen.values()), per_position=True)
                    seen.clear()

            return record

        names = [name for name in HOST_KEY_VALUE_PROJECTIONS if isinstance(getattr(site, name, None), nn.Module)]
        for name in names:
            handle = getattr(site, name).register_forward_hook(hook(name))
            self._undo.append(handle.remove)

    def rows(self) -> dict[str, dict[str, int]]:
        return {
            path: {"bytes_per_position": self.per_position.get(path, 0), "fixed_bytes": self.fixed.get(path, 0)}
            for path in self.paths
            if path in self.per_position or path in self.fixed
        }


def cache_state_bytes(cache, batch_size: int, self_paths: dict[int, str], cross_paths: dict[int, str]) -> dict:
    """Per layer path, the bytes a ``generate()`` cache holds (``EncoderDecoderCache``, or a plain
    ``DynamicCache`` of decoder self-attention): per cached position (``layer.get_seq_length()``)
    and per sequence for running-summary (linear attention) layers."""
    parts = [(getattr(cache, "self_attention_cache", cache), self_paths)]
    if hasattr(cache, "cross_attention_cache"):
        parts.append((cache.cross_attention_cache, cross_paths))
    rows = {}
    for part, paths in parts:
        for index, layer in enumerate(part.layers):
            if index not in paths or not getattr(layer, "is_initialized", True):
                continue
            held = sum(_nbytes(t) for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
            if is_running_summary(layer):
                rows[paths[index]] = {"bytes_per_position": 0, "fixed_bytes": held // batch_size}
            else:
                positions = layer.keys.shape[-2]
                rows[paths[index]] = {"bytes_per_position": held // (batch_size * positions), "fixed_bytes": 0}
    return rows


def streaming_state_bytes(model, state, chunk_size: int, left_chunks: int | None, paths: list[str]) -> dict:
    """Per encoder layer (named by ``paths``, in layer order), the bytes a streaming state holds
    after its frames: per kept frame (the left context the session keeps), and per stream for
    linear attention's summed chunks."""
    kept = state.frames if left_chunks is None else min(state.frames, left_chunks * chunk_size)
    rows = {}
    for path, layer, layer_state in zip(paths, model.encoder.layers, state.layers, strict=True):
        attention = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        held = sum(_nbytes(t) for t in (layer_state.attention or ()))
        if is_linear(attention):
            chunks = 1 if left_chunks is None else min(left_chunks, -(-state.frames // chunk_size))
            rows[path] = {"bytes_per_position": 0, "fixed_bytes": held // max(chunks, 1)}
        else:
            rows[path] = {"bytes_per_position": held // max(kept, 1), "fixed_bytes": 0}
    return rows


def compare_with_formula(formula: dict[str, dict], measured: dict[str, dict]) -> list[dict]:
    """One row per layer the measurement saw: formula and measured bytes side by side."""
    rows = []
    for path, seen in measured.items():
        expected = formula.get(path, {})
        row = {
            "path": path,
            "role": expected.get("role"),
            "attention": expected.get("attention"),
            "formula_bytes_per_position": expected.get("bytes_per_position"),
            "measured_bytes_per_position": seen["bytes_per_position"],
            "formula_fixed_bytes": expected.get("fixed_bytes"),
            "measured_fixed_bytes": seen["fixed_bytes"],
        }
        row["matches"] = (
            row["formula_bytes_per_position"] == row["measured_bytes_per_position"]
            and row["formula_fixed_bytes"] == row["measured_fixed_bytes"]
        )
        rows.append(row)
    return rows
