"""K/V-state accounting of a model from its config: attention spec and K/V-state bytes per frame,
per role. Where the attention is comes from the host adapter, how big each layer's state is from
its variant's formula (:func:`mla_convert.modeling.attention_build.state_values`): nothing here
knows a host's layer paths or a variant's size."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..hosts import adapter_for_config
from ..modeling.attention_base import AttentionGeometry
from ..modeling.attention_build import layer_spec_from_dict, state_values, variant_class


def _attention_layout(config, converted: dict) -> dict[str, tuple[str, AttentionGeometry]]:
    """Every attention module: path -> (role, geometry); from the host adapter, plus any converted
    layer it does not list (counted on its own, with the config's overall geometry)."""
    try:
        layout = adapter_for_config(config).attention_layout(config)
    except UnsupportedModelError:
        layout = {}
    for path in converted:
        if path not in layout:
            hidden = int(getattr(config, "d_model", None) or getattr(config, "hidden_size", 0))
            heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "decoder_attention_heads", 1))
            layout[path] = (path.split(".", 1)[0], AttentionGeometry(hidden, heads))
    return layout


def _layer_attention(config) -> tuple[dict, bool]:
    """``(path -> stored layer dict, whether the config chooses its attention)``: converted layers,
    or for mla_convert's own model families the attention each layer was built with."""
    converted = ((getattr(config, "attention_conversion", None) or {}).get("layers")) or {}
    try:
        adapter = adapter_for_config(config)
    except UnsupportedModelError:
        return converted, False
    if not adapter.chooses_attention:
        return converted, False
    layout = adapter.attention_layout(config)
    return {path: adapter.layer_attention(config, path) for path in layout}, True


def layer_state_bytes(config, dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Per attention layer, by its variant's formula: ``{path: {role, attention, bytes_per_position,
    fixed_bytes}}`` (``fixed_bytes``: held per sequence whatever its length, linear attention's sums;
    a position is a frame of what the layer's keys come from: encoder frames for cross-attention)."""
    layers, _ = _layer_attention(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = {}
    for path, (role, geometry) in _attention_layout(config, layers).items():
        layer = layers.get(path)
        spec = layer_spec_from_dict(layer) if layer else None
        rows[path] = {
            "role": role,
            "attention": spec.attention if spec else "mha",
            "bytes_per_position": state_values(layer, geometry) * itemsize,
            "fixed_bytes": variant_class(spec.attention).fixed_values(spec, geometry) * itemsize if spec else 0,
        }
    return rows


def attention_report(config, dtype: torch.dtype = torch.float32) -> dict:
    """Attention spec and K/V-state bytes per frame of a converted model (or of one of mla_convert's
    own models, whose config chooses its attention); nulls for any other model.

    Per layer the variant's state formula (MLA ``latent_dim``, GQA ``2·kv_heads·head_dim``, linear
    0: its state is a fixed per-head sum) or multi-head attention's ``2·hidden`` for an unconverted
    layer; times the dtype's bytes, summed over layers (and per role: for Whisper, encoder frames
    and decoder tokens are different positions).
    """
    conversion = getattr(config, "attention_conversion", None)
    layers, chooses = _layer_attention(config)
    if not chooses and (not isinstance(conversion, dict) or not conversion):
        return {"attention": None, "kv_state_bytes_per_frame": None}
    conversion = conversion or {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = mha = 0
    by_role: dict[str, int] = {}
    layout = _attention_layout(config, layers)
    for path, row in layer_state_bytes(config, dtype).items():
        total += row["bytes_per_position"]
        mha += state_values(None, layout[path][1]) * itemsize
        by_role[row["role"]] = by_role.get(row["role"], 0) + row["bytes_per_position"]
    return {
        "attention": conversion.get("spec") or (getattr(config, "attention", None) if chooses else None),
        "converted_layers": len(conversion.get("layers") or {}),
        "kv_state_bytes_per_frame": total,
        "kv_state_bytes_per_frame_mha": mha,
        "kv_state_bytes_per_frame_by_role": by_role,
    }
